from ..._stub import module_getattr, Unavailable

raft_large = Unavailable("torchvision.models.optical_flow.raft_large")
__getattr__ = module_getattr("torchvision.models.optical_flow")
