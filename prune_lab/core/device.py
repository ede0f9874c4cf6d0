"""Resolving a device argument, once, with a clear error. Nothing here changes global torch settings."""
from __future__ import annotations

import torch


def resolve_device(device="auto") -> torch.device:
    """``"auto"`` (or ``None``) → CUDA when present, else CPU; anything else through ``torch.device``, with a clear
    error for a malformed name or CUDA asked for where there is none.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available here; use 'auto' or 'cpu'.")
    return dev
