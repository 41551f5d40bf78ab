"""Turning the configured `device` option into a torch device: the one place that resolves `auto`."""

from __future__ import annotations

import torch


def torch_device(device: str) -> torch.device:
    """`auto` is cuda when a CUDA device is visible, else cpu; any other value is taken as torch spells it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
