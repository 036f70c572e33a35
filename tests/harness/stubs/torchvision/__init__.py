"""Import-only stand-in (test harness): every real use raises."""
__version__ = "0.0.0+quantlora-stub"
from . import models, ops, transforms  # noqa: E402,F401
