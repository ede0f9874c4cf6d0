"""Masks in and out of prune_lab: ``torch.nn.utils.prune`` form, zeros written into a copy, masks read from
checkpoints.

A mask set is ``{parameter name: BoolTensor}`` of the parameters' shapes, True = kept (names from
``model.named_parameters()``). Every function here leaves the model it is given untouched, except
:func:`apply` with ``inplace=True``, which says so. A mask set that does not fit the model (a name the model does
not have, a shape that differs) raises ``ValueError`` naming the first mismatch.

>>> import torch, prune_lab as pl
>>> from prune_lab import export
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
>>> res = pl.prune(net, "magnitude", 0.5)
>>> tp = export.to_torch_prune(net, res)          # a copy with weight_orig / weight_mask
>>> sorted(export.from_torch_prune(tp)) == sorted(res.masks)
True
"""
from __future__ import annotations

import copy
import difflib
from typing import Mapping

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

__all__ = ["apply", "from_torch_prune", "masks_from_state_dict", "to_torch_prune"]


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def _masks_and_weights(result) -> tuple[dict, dict | None]:
    """``(masks, updated weights or None)`` from a PruneResult or a plain ``{name: mask}`` dict."""
    if isinstance(result, Mapping):
        return dict(result), None
    if hasattr(result, "masks") and hasattr(result, "layers"):
        return dict(result.masks), (dict(result.weights) if getattr(result, "weights", None) is not None else None)
    raise TypeError(f"result must be a PruneResult or a dict {{name: BoolTensor}}, got {type(result).__name__}.")


def _as_bool_mask(name: str, mask) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask {name!r} must be a torch.Tensor (bool, True = kept), got {type(mask).__name__}.")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"mask {name!r} has values other than 0 and 1 (dtype {mask.dtype}); a mask is a bool "
                             f"tensor, True = kept.")
        return mask != 0
    raise TypeError(f"mask {name!r} must be a bool tensor (True = kept), got dtype {mask.dtype}.")


def check_fit(model: nn.Module, masks: Mapping, *, what: str = "masks") -> dict:
    """``{name: BoolTensor}`` after checking every entry of ``masks`` names a parameter of ``model`` with the same
    shape; ``ValueError`` naming the first mismatch (with the closest name) otherwise. Masks may be bool or 0/1.

    >>> net = nn.Linear(3, 2)
    >>> check_fit(net, {"weight": torch.ones(2, 3, dtype=torch.bool)})["weight"].shape
    torch.Size([2, 3])
    """
    if not isinstance(masks, Mapping):
        raise TypeError(f"{what} must be a dict {{name: BoolTensor}}, got {type(masks).__name__}.")
    params = dict(model.named_parameters())
    out = {}
    for name, mask in masks.items():
        if name not in params:
            close = difflib.get_close_matches(str(name), list(params), n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            valid = ", ".join(map(repr, list(params)[:6])) + (", …" if len(params) > 6 else "")
            raise ValueError(f"{what} do not fit the model {type(model).__name__}: it has no parameter {name!r}."
                             f"{hint} Its parameters: {valid}.")
        m = _as_bool_mask(name, mask)
        if tuple(m.shape) != tuple(params[name].shape):
            raise ValueError(f"{what} do not fit the model {type(model).__name__}: the mask of {name!r} has shape "
                             f"{tuple(m.shape)}, the parameter {tuple(params[name].shape)}.")
        out[name] = m
    return out


def _check_weights(model: nn.Module, weights: dict | None) -> dict:
    if weights is None:
        return {}
    params = dict(model.named_parameters())
    for name, w in weights.items():
        if name not in params or tuple(w.shape) != tuple(params[name].shape):
            got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            want = tuple(params[name].shape) if name in params else "no such parameter"
            raise ValueError(f"the result's updated weights do not fit the model: {name!r} is {got}, the model "
                             f"has {want}.")
    return weights


def _check_origin(model: nn.Module, result, weights: dict | None, what: str) -> None:
    """Updated weights replace the model's values: they must come from this model. ``ValueError`` when the result
    records the fingerprint of a model with other weights (:attr:`PruneSession.fingerprint`)."""
    recorded = getattr(result, "model_fingerprint", None)
    if weights is None or not recorded:
        return
    from .engine import fingerprint

    current = fingerprint(model)  # tied-weight notes were given when the result was made
    if current != recorded:
        raise ValueError(
            f"{what}: this result carries updated weights (method {getattr(result, 'method', '?')!r}) computed on a "
            f"model with other weights (fingerprint {recorded[:12]}…, this model {current[:12]}…); writing them "
            f"would put that model's values into this one. Use the model the result was computed on, or apply "
            f"only the masks: {what}(model, result.masks).")


def _aliases(model: nn.Module) -> dict:
    """``{canonical parameter name: [(module, attribute)]}``: every place a parameter is registered (tied weights
    appear under several modules, ``named_parameters()`` lists them once)."""
    canonical = {}
    for name, p in model.named_parameters():
        canonical.setdefault(id(p), name)
    out: dict = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None and id(p) in canonical:
                entry = out.setdefault(canonical[id(p)], [])
                if not any(m is module and a == attr for m, a in entry):
                    entry.append((module, attr))
    return out


# ----------------------------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------------------------
def to_torch_prune(model: nn.Module, result) -> nn.Module:
    """A deep copy of ``model`` in ``torch.nn.utils.prune`` form: for every masked parameter ``p`` of a module, the
    copy holds ``p_orig`` (a Parameter: the result's updated weights when it has them, else the model's) and a
    ``p_mask`` buffer (float, the parameter's shape), and a forward pre-hook computes ``p = p_orig * p_mask``.

    ``result``: a :class:`~prune_lab.PruneResult` or a dict ``{name: BoolTensor}``. Tied weights get the mask on
    every module that shares them. ``model`` is not modified.

    >>> import torch, prune_lab as pl
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    >>> tp = to_torch_prune(net, pl.prune(net, "magnitude", 0.5))
    >>> sorted(n for n, _ in tp.named_buffers())
    ['0.weight_mask']
    >>> torch.nn.utils.prune.is_pruned(tp)
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    masks, weights = _masks_and_weights(result)
    masks = check_fit(model, masks)
    weights = _check_weights(model, weights)
    _check_origin(model, result, weights or None, "to_torch_prune")
    out = copy.deepcopy(model)
    aliases = _aliases(out)
    for name, mask in masks.items():
        targets = aliases[name]
        param = targets[0][0]._parameters[targets[0][1]]
        if name in weights:
            with torch.no_grad():
                param.copy_(weights[name].to(param.device, param.dtype))
        for module, attr in targets:
            torch_prune.custom_from_mask(module, attr, mask.to(param.device))
    return out


def from_torch_prune(module: nn.Module) -> dict:
    """The masks ``{name: BoolTensor}`` of a module pruned with ``torch.nn.utils.prune`` (``*_orig`` parameters and
    ``*_mask`` buffers), keyed by the names the unpruned model would use (``"fc.weight"``, not
    ``"fc.weight_orig"``). An unpruned module gives ``{}``. The module is not modified.

    >>> import torch
    >>> net = torch.nn.Linear(3, 2)
    >>> _ = torch.nn.utils.prune.l1_unstructured(net, "weight", amount=2)
    >>> m = from_torch_prune(net)
    >>> list(m), int((~m["weight"]).sum())
    (['weight'], 2)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}.")
    out = {}
    for mname, sub in module.named_modules():
        for bname, mask in sub._buffers.items():
            if mask is None or not bname.endswith("_mask"):
                continue
            attr = bname[: -len("_mask")]
            if attr + "_orig" not in sub._parameters:
                continue
            key = f"{mname}.{attr}" if mname else attr
            out.setdefault(key, mask.detach() != 0)
    return {k: v.clone() for k, v in out.items()}


def apply(model: nn.Module, result, *, inplace: bool = False) -> nn.Module:
    """A model with the masks written in: pruned weights set to exactly ``0.0`` (kept weights replaced by the
    result's updated weights when it has them). Returns a deep copy unless ``inplace=True`` (then ``model`` itself
    is changed and returned). Plain parameters: no hooks, no extra buffers.

    ``result``: a :class:`~prune_lab.PruneResult` or a dict ``{name: BoolTensor}`` (parameter shapes). A result
    with updated weights (``result.weights``) must have been computed on ``model`` (same weights fingerprint), else
    ``ValueError``: its weights would overwrite this model's values; masks alone apply to any model of that shape.

    >>> import torch, prune_lab as pl
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> pruned = apply(net, pl.prune(net, "magnitude", 0.75))
    >>> int((pruned[0].weight == 0).sum()), pruned is net
    (12, False)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {inplace!r}.")
    masks, weights = _masks_and_weights(result)
    masks = check_fit(model, masks)
    weights = _check_weights(model, weights)
    _check_origin(model, result, weights or None, "apply")
    out = model if inplace else copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            p = params[name]
            if name in weights:
                p.copy_(weights[name].to(p.device, p.dtype))
            p.masked_fill_(~mask.to(p.device), 0.0)
    return out


def masks_from_state_dict(state_dict: Mapping, *, model: nn.Module | None = None) -> dict:
    """Masks ``{name: BoolTensor}`` read from a checkpoint's state dict.

    When the state dict holds ``torch.nn.utils.prune`` entries (``"fc.weight_mask"``), those are the masks, under
    the unpruned names (``"fc.weight"``). Otherwise pruning is read from zeros: every floating-point tensor of two
    or more dimensions whose key ends in ``weight`` (Linear / Conv weights) gets ``mask = (w != 0)``.
    ``model``: when given, only its Linear / Conv weights are read and the masks are checked against it (names and
    shapes; the first mismatch raises ``ValueError``). The state dict is not modified.

    >>> import torch
    >>> sd = {"fc.weight": torch.tensor([[0.0, 1.5], [2.0, 0.0]]), "fc.bias": torch.zeros(2)}
    >>> masks_from_state_dict(sd)["fc.weight"].tolist()
    [[False, True], [True, False]]
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping {{name: Tensor}} (e.g. model.state_dict() or a loaded "
                        f"checkpoint), got {type(state_dict).__name__}.")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}.")
    explicit = {k[: -len("_mask")]: v for k, v in state_dict.items()
                if isinstance(k, str) and k.endswith("_mask") and isinstance(v, torch.Tensor)}
    if explicit:
        masks = {k: _as_bool_mask(k, v).clone() for k, v in explicit.items()}
    else:
        masks = {k: (v != 0) for k, v in state_dict.items()
                 if isinstance(k, str) and isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 2
                 and k.rsplit(".", 1)[-1] == "weight"}
    if model is not None:
        from .core.graph import prunable_parameters

        if not explicit:
            prunable = set(prunable_parameters(model))
            unknown = [k for k in masks if k not in prunable and k not in dict(model.named_parameters())]
            if unknown:
                check_fit(model, {unknown[0]: masks[unknown[0]]}, what="the state dict's masks")
            masks = {k: v for k, v in masks.items() if k in prunable}
        masks = check_fit(model, masks, what="the state dict's masks")
    if not masks:
        raise ValueError("found no masks in the state dict: it has neither '*_mask' entries nor floating-point "
                         "'*weight' tensors of two or more dimensions.")
    return masks
