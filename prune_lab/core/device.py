"""Devices: resolving a device argument, once, with a clear error, and bringing tensors to the host in one
transfer (with the content key of bool masks built that way). Nothing here changes global torch settings."""
from __future__ import annotations

import hashlib

import numpy as np
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


def host_cat(parts: list) -> np.ndarray:
    """1-d tensors concatenated on the host: one transfer per device (not one per tensor)."""
    if not parts:
        return np.zeros(0)
    by_device: dict = {}
    for i, t in enumerate(parts):
        by_device.setdefault(t.device, []).append(i)
    if len(by_device) == 1:
        return torch.cat(parts).cpu().numpy()
    host = [None] * len(parts)
    for idx in by_device.values():
        joined = torch.cat([parts[i] for i in idx]).cpu()
        a = 0
        for i in idx:
            host[i] = joined[a:a + parts[i].numel()]
            a += parts[i].numel()
    return torch.cat(host).numpy()


def masks_key(masks: dict | None) -> str:
    """The content key of bool masks ``{name: BoolTensor}`` (``""`` for ``None``): names and bits, one transfer.

    >>> masks_key(None), len(masks_key({"w": torch.ones(2, 2, dtype=torch.bool)}))
    ('', 32)
    """
    if masks is None:
        return ""
    h = hashlib.blake2b(digest_size=16)
    names = sorted(masks)
    flat = host_cat([masks[n].reshape(-1) for n in names])  # one transfer for all layers
    a = 0
    for n in names:
        size = masks[n].numel()
        h.update(n.encode())
        h.update(np.packbits(flat[a:a + size]).tobytes())
        a += size
    return h.hexdigest()
