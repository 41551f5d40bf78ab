"""Turning the configured `device` option into a torch device: the one place that resolves `auto`."""

from __future__ import annotations

import torch


def torch_device(device: str) -> torch.device:
    """`auto` is cuda when a CUDA device is visible, else cpu; any other value is taken as torch spells it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the work queued there. A plain `.to(cuda)` (or
    `torch.tensor(..., device=cuda)`) of pageable memory synchronizes the stream: in the middle of a step's launch
    it makes the host wait for the forward it just queued, and the next step cannot be scheduled meanwhile (bert
    embedding steps kept the H200 52% busy that way). From pinned memory the copy is queued like a kernel."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
