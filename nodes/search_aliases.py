"""Search aliases for the node search box, passed only where the running ComfyUI's io.Schema has them.

v0.33's V3 schema has `search_aliases`; 0.3.75's has not (an unknown keyword would fail the import)."""
from __future__ import annotations

import dataclasses

from comfy_api.latest import io

PACK_ALIASES = ("quantlora", "quant lora", "QuantLoRA")


def search_aliases(*names: str) -> dict:
    """`**search_aliases("hotswap", ...)` in io.Schema(...): the pack's name plus `names`, or {}."""
    try:
        fields = {f.name for f in dataclasses.fields(io.Schema)}
    except TypeError:
        fields = set()
    if "search_aliases" not in fields:
        return {}
    return {"search_aliases": list(dict.fromkeys((*PACK_ALIASES, *names)))}
