"""Bytes a module really holds, through tensor subclasses (torchao, quanto) and bnb states."""
from __future__ import annotations

import torch
from torch import nn


def tensor_bytes(t: torch.Tensor) -> int:
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        total = sum(tensor_bytes(getattr(t, n)) for n in names)
    else:
        total = t.numel() * t.element_size()
    qs = getattr(t, "quant_state", None)  # bitsandbytes 4-bit
    if qs is not None:
        for part in (qs.absmax, getattr(qs, "code", None)):
            if isinstance(part, torch.Tensor):
                total += part.numel() * part.element_size()
        if getattr(qs, "state2", None) is not None:
            total += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    scb = getattr(t, "SCB", None)  # bitsandbytes int8 row scales
    if isinstance(scb, torch.Tensor):
        total += scb.numel() * scb.element_size()
    return total


def module_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total
