class Unavailable:
    def __init__(self, what):
        self._what = what

    def __call__(self, *a, **k):
        raise RuntimeError(f"{self._what} is a test-harness stand-in; install the real package")

    def __getattr__(self, name):
        return Unavailable(f"{self._what}.{name}")


def module_getattr(prefix):
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Unavailable(f"{prefix}.{name}")
    return __getattr__
