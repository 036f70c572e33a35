from .._stub import module_getattr, Unavailable

roi_align = Unavailable("torchvision.ops.roi_align")
deform_conv2d = Unavailable("torchvision.ops.deform_conv2d")
__getattr__ = module_getattr("torchvision.ops")
