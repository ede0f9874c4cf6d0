"""Running a model to read what its layers see, without changing it: every submodule in eval mode for a block
(each one's own flag restored), forward pre-hooks that hand over each layer's input (always removed), and a layer
input as the rows its weight multiplies (a convolution's input unfolded into patches, a language model's padding
positions left out). Used by the layer Hessians of layerwise OBS, Wanda's input norms, the per-sample gradients,
SynFlow's forward pass and the layer graph's fallback trace.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .losses import lm_forward_kwargs
from .validation import input_error

__all__ = ["calibration_pass", "conv_patches", "eval_mode", "input_hooks", "token_rows"]


@contextlib.contextmanager
def eval_mode(*modules: nn.Module):
    """Every one of ``modules`` and their submodules in eval mode inside the block; each submodule's own
    ``training`` flag is restored afterwards, also on an error.

    >>> net = nn.Sequential(nn.Dropout(), nn.Linear(2, 2)).train()
    >>> net[1].eval()
    Linear(in_features=2, out_features=2, bias=True)
    >>> with eval_mode(net):
    ...     net.training, net[0].training
    (False, False)
    >>> net.training, net[0].training, net[1].training
    (True, True, False)
    """
    modes = [(m, m.training) for mod in modules for m in mod.modules()]
    try:
        for mod in modules:
            mod.eval()
        yield modules[0] if len(modules) == 1 else modules
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def input_hooks(pairs, fn):
    """Inside the block, ``fn(key, module, x)`` runs with the first positional input ``x`` (``None`` for a call
    with keyword arguments only) of every ``(key, module)`` of ``pairs`` each time that module is called (forward
    pre-hooks); the hooks are removed on leaving, also on an error. A module may appear under several keys and a
    key with several modules.

    >>> seen = []
    >>> lin = nn.Linear(2, 1)
    >>> with input_hooks([("a", lin)], lambda k, m, x: seen.append((k, tuple(x.shape)))):
    ...     _ = lin(torch.zeros(3, 2))
    >>> _ = lin(torch.zeros(1, 2))  # removed
    >>> seen
    [('a', (3, 2))]
    """
    handles = []
    try:
        for key, mod in pairs:
            handles.append(mod.register_forward_pre_hook(
                lambda m, inputs, _k=key: fn(_k, m, inputs[0] if inputs else None)))
        yield
    finally:
        for h in handles:
            h.remove()


def calibration_pass(model: nn.Module, run, x: torch.Tensor, *, chunk: int, device, mask=None, current=None,
                     data_errors: bool = True, skip=()):
    """Feed ``x`` through ``run(xb, kwargs)`` (a forward pass of ``model``) in chunks of ``chunk`` rows on
    ``device``; the caller's :func:`input_hooks` record what they need. ``mask``: the attention mask of token ids
    ``x``: each chunk's goes to ``current["mask"]`` (for the hooks) and into the forward pass's keyword arguments.
    A ``RuntimeError`` on the first chunk is reported as the data's (:func:`~prune_lab.core.validation.input_error`)
    when ``data_errors``; out of memory is raised as it is. ``skip``: exceptions that end one chunk's pass early (a
    hook that has seen what it needs)."""
    for a in range(0, x.shape[0], chunk):
        xb = x[a:a + chunk].to(device)
        kw = {}
        if mask is not None:
            current["mask"] = mask[a:a + chunk].to(device)
            kw = lm_forward_kwargs(model, current["mask"])
        try:
            run(xb, kw)
        except skip:
            pass
        except RuntimeError as exc:
            if a or not data_errors or isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            raise input_error(exc, x, what="data") from exc


def conv_patches(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input ``x`` of a Conv1d / Conv2d ``mod`` unfolded into the patches its kernel multiplies:
    ``(B, C_in·k, P)`` (k: kernel entries, P: output positions), its padding applied as the layer does (padding
    mode and ``padding="same"`` included). ``ValueError`` for any other module (Conv3d included).

    >>> conv_patches(nn.Conv1d(2, 1, 3, padding=1), torch.ones(1, 2, 4)).shape
    torch.Size([1, 6, 4])
    """
    if isinstance(mod, nn.Conv3d) or not isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        raise ValueError(f"only Linear, Conv1d and Conv2d layers' inputs are read; {type(mod).__name__} is not "
                         f"supported.")
    pad = list(mod._reversed_padding_repeated_twice)
    if any(pad):
        x = F.pad(x, pad, mode="constant" if mod.padding_mode == "zeros" else mod.padding_mode)
    kernel, dilation, stride = mod.kernel_size, mod.dilation, mod.stride
    if isinstance(mod, nn.Conv1d):
        x, kernel, dilation, stride = x.unsqueeze(2), (1,) + kernel, (1,) + dilation, (1,) + stride
    return F.unfold(x, kernel, dilation=dilation, stride=stride)


def token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A Linear layer's input as rows of features ``(n, in)``: every leading dimension flattened; with the
    attention ``mask: (N, L)`` of a token batch, the rows at padding positions are left out (inputs ``(N, L, …)``
    or already flattened to ``(N·L, in)``).

    >>> token_rows(torch.ones(2, 3, 4), torch.tensor([[1, 1, 0], [1, 0, 0]])).shape
    torch.Size([3, 4])
    """
    if mask is not None:
        if x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            x = x[mask.bool()]
        elif x.dim() == 2 and x.shape[0] == mask.numel():
            x = x[mask.reshape(-1).bool()]
    return x.reshape(-1, x.shape[-1])
