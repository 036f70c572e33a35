"""Import-only stand-in (test harness): every real use raises."""
import sys
import types

__version__ = "0.0.0+quantlora-stub"


def _getattr(prefix):
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*a, **k):
            raise RuntimeError(f"{prefix}.{name} is a test-harness stand-in; install the real torchaudio")
        return unavailable
    return __getattr__


for _sub in ("functional", "transforms"):
    _m = types.ModuleType(f"torchaudio.{_sub}")
    _m.__getattr__ = _getattr(f"torchaudio.{_sub}")
    sys.modules[_m.__name__] = _m
    globals()[_sub] = _m
__getattr__ = _getattr("torchaudio")
