from .._stub import module_getattr
from . import optical_flow  # noqa: F401

__getattr__ = module_getattr("torchvision.models")
