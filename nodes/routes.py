"""HTTP routes the pack adds under its own prefix (/quantlora/...). Each feature registers here."""

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
