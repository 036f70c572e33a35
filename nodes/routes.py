"""HTTP routes the pack adds under its own prefix (/quantlora/...). Each feature registers here."""

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from . import vram_routes

    # None: no PromptServer yet (nodes imported outside a running ComfyUI); try again later.
    if vram_routes.register() is not None:
        _registered = True
