"""Every input of every QuantLoRA node has a tooltip, and the nodes are found by searching the pack's name,
as the frontend sees them: over /object_info of a real server."""
import pytest

pytestmark = [pytest.mark.server, pytest.mark.no_demo_models]

PACK_NODES = {"QuantizedFluxLoader", "LoRAHotswap", "FP8LayerwiseCast", "CPUOffloadSampler"}


@pytest.fixture(scope="module")
def pack_info(server):
    info = server.get("/object_info")
    nodes = {k: v for k, v in info.items() if v.get("category", "").startswith("QuantLoRA")
             or "quantlora" in str(v.get("python_module", "")).lower()}
    assert PACK_NODES <= set(nodes), f"pack nodes missing from /object_info: {PACK_NODES - set(nodes)}"
    return nodes


def test_every_input_has_a_tooltip(pack_info):
    missing = []
    for name, node in pack_info.items():
        assert node.get("description"), f"{name} has no description"
        for section in ("required", "optional"):
            for inp, spec in node.get("input", {}).get(section, {}).items():
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if not str(opts.get("tooltip", "")).strip():
                    missing.append(f"{name}.{inp}")
    assert not missing, f"inputs without a tooltip: {missing}"


def test_search_aliases_name_the_pack(server, pack_info):
    """Typing "quantlora" in the node search finds every pack node: v0.33's schema sends search_aliases
    (the frontend's search matches them); 0.3.75's has no such field, and the nodes must still load there."""
    for name, node in pack_info.items():
        assert node["category"] == "QuantLoRA"
        if server.version_tuple > (0, 3, 75):
            assert "quantlora" in [a.lower() for a in node.get("search_aliases") or []], (name, node.get("search_aliases"))
