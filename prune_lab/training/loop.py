"""Training, evaluation and BatchNorm recalibration, all mask-aware.

A mask set is a dict ``{parameter name: bool tensor of the parameter's shape}`` with ``True`` = kept.
"""
from __future__ import annotations

import copy
import math
import numbers
from typing import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call

from ..core.capture import eval_mode
from ..core.device import resolve_device
from ..core.losses import batch_loss, lm_forward_kwargs, model_loss, next_token_stats, output_logits
from ..core.validation import floating_dtype
from ..data import as_tokens, iter_batches, resolve_dataset
from ..models.hf import vocab_size

__all__ = ["OPTIMIZERS", "resolve_device", "check_masks", "train", "evaluate", "perplexity", "next_token_stats",
           "recalibrate_bn"]

#: optimizer name → (class, default learning rate, extra constructor arguments)
OPTIMIZERS: dict[str, tuple[type, float, dict]] = {
    "adam": (torch.optim.Adam, 1e-3, {}),
    "adamw": (torch.optim.AdamW, 1e-3, {}),
    "sgd": (torch.optim.SGD, 1e-2, {"momentum": 0.9}),
}
DEFAULT_BATCH_SIZE = 128


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def check_masks(model: nn.Module, masks: Mapping[str, torch.Tensor] | None, *, device=None) -> dict[str, torch.Tensor]:
    """Validate ``masks`` against ``model`` and return them as a new dict of bool tensors (on ``device`` if given).

    Raises ``TypeError`` (not a dict, not a bool tensor) or ``ValueError`` (unknown name, wrong shape), naming the
    first offending entry.

    >>> net = torch.nn.Linear(3, 2)
    >>> check_masks(net, {"weight": torch.ones(2, 3, dtype=torch.bool)})["weight"].shape
    torch.Size([2, 3])
    """
    if masks is None:
        return {}
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a dict {{parameter name: bool tensor}}, got {type(masks).__name__}")
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for name, mask in masks.items():
        if name not in params:
            import difflib

            close = difflib.get_close_matches(str(name), list(params), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"masks[{name!r}]: the model has no parameter of that name.{hint}")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"masks[{name!r}] must be a bool tensor (True = kept), got {got}")
        if mask.shape != params[name].shape:
            raise ValueError(
                f"masks[{name!r}] has shape {tuple(mask.shape)} but the parameter has shape {tuple(params[name].shape)}"
            )
        out[name] = mask.to(device) if device is not None else mask
    return out


def _nonneg_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{what} must be a non-negative int, got {value!r}")
    return int(value)


def _save_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for m, training in modes:
        m.training = training


def train(
    model: nn.Module,
    data,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    optimizer: str = "adam",
    lr: float | None = None,
    batch_size: int | None = None,
    weight_decay: float = 0.0,
    masks: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    device="auto",
    progress: bool = True,
    on_step: Callable[[int, nn.Module], None] | None = None,
) -> nn.Module:
    """Train ``model`` **in place** with cross-entropy on the train split of ``data`` and return the same object.

    Args:
        model: any classifier mapping ``(B, C, H, W)`` (or the shape of ``data``) to logits ``(B, num_classes)``.
            It is moved to ``device``; its train/eval modes are restored at the end. With token data
            (:func:`prune_lab.data.tokens`) a causal LM, trained on the mean next-token loss of the real tokens
            (``batch_size`` defaults to the token data's).
        data: a ``DataBundle`` (its ``train`` split), a ``Dataset``, a ``DataLoader`` (used as is, with its own
            shuffling) or an ``(inputs, targets)`` tuple of tensors.
        epochs, steps: how long to train; give at most one (default: 1 epoch). ``steps`` counts optimizer steps.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (momentum 0.9). ``lr`` defaults to 1e-3 (Adam/AdamW) or 1e-2
            (SGD); ``batch_size`` to 128.
        masks: ``{name: bool tensor}``, True = kept. Pruned weights are zeroed first; before every step their
            gradients are zeroed and after every step they are set to zero again, so momentum or Adam state can
            never revive them: they stay exactly ``0.0``.
        seed: seeds the batch order (a private ``torch.Generator``) and, inside ``torch.random.fork_rng``, any
            randomness of the model (dropout); the caller's global RNG state is left as it was. Same seed, same data
            and same model → bit-identical weights on CPU.
        progress: show a ``tqdm.auto`` progress bar.
        on_step: called as ``on_step(step, model)`` after each optimizer step (``step`` starts at 1).

    Returns:
        ``model`` itself (trained).

    >>> from prune_lab import models, data
    >>> net = models.create("mlpnet", in_features=64, seed=0)
    >>> net = train(net, data.synthetic(), steps=5, progress=False)
    """
    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if epochs is not None and steps is not None:
        raise ValueError("give either epochs or steps, not both")
    if epochs is None and steps is None:
        epochs = 1
    if epochs is not None:
        epochs = _nonneg_int(epochs, "epochs")
    if steps is not None:
        steps = _nonneg_int(steps, "steps")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid choices: {', '.join(map(repr, OPTIMIZERS))}")
    opt_cls, default_lr, opt_extra = OPTIMIZERS[optimizer]
    lr = default_lr if lr is None else float(lr)
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    tokens = as_tokens(data, split="train")
    if batch_size is None:
        batch_size = tokens.batch_size if tokens is not None else DEFAULT_BATCH_SIZE
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")

    masks = check_masks(model, masks)  # validate before touching the model
    dev = resolve_device(device)
    model.to(dev)
    masks = {name: mask.to(dev) for name, mask in masks.items()}
    params = dict(model.named_parameters())
    masked = [(params[name], ~mask) for name, mask in masks.items()]  # (parameter, pruned positions)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = opt_cls(trainable, lr=lr, weight_decay=float(weight_decay), **opt_extra)

    with torch.no_grad():
        for p, pruned in masked:
            p.masked_fill_(pruned, 0.0)
    total = steps if steps is not None else None
    if total is None:
        try:
            ds = resolve_dataset(data, split="train")
            n_batches = len(ds) if isinstance(ds, torch.utils.data.DataLoader) else -(-len(ds) // batch_size)
            total = epochs * n_batches
        except TypeError:
            total = None
    if total == 0:
        return model

    fork_devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    modes = _save_modes(model)
    step = 0
    bar = tqdm(total=total, disable=not progress, desc="train", unit="step")
    try:
        with torch.random.fork_rng(devices=fork_devices):
            torch.random.default_generator.manual_seed(int(seed))
            if dev.type == "cuda":
                with torch.cuda.device(dev):
                    torch.cuda.manual_seed(int(seed))
            order = torch.Generator().manual_seed(int(seed))
            model.train()
            epoch = 0
            log_every = max(1, (total or 100) // 100)
            while (steps is None and epoch < epochs) or (steps is not None and step < steps):
                seen = 0
                for x, y in iter_batches(data, split="train", batch_size=batch_size, shuffle=True, generator=order):
                    seen += 1
                    x = x.to(dev, non_blocking=True)
                    y = y.to(dev, non_blocking=True)
                    opt.zero_grad(set_to_none=True)
                    if tokens is not None:  # y: the attention mask; the mean next-token loss over real tokens
                        loss = model_loss(model, None, x, y)
                    else:
                        loss = batch_loss(_run(model, {}, x, first=step == 0 and seen == 1), x, y)
                    loss.backward()
                    for p, pruned in masked:
                        if p.grad is not None:
                            p.grad.masked_fill_(pruned, 0.0)
                    opt.step()
                    with torch.no_grad():
                        for p, pruned in masked:
                            p.masked_fill_(pruned, 0.0)
                    step += 1
                    if step % log_every == 0 or step == total:
                        value = float(loss.detach())
                        if value != value or value in (float("inf"), float("-inf")):
                            raise FloatingPointError(
                                f"training loss became {value} at step {step}; lower lr (now {lr}) or check the data"
                            )
                        bar.set_postfix(loss=f"{value:.4f}", refresh=False)
                    bar.update(1)
                    if on_step is not None:
                        on_step(step, model)
                    if steps is not None and step >= steps:
                        break
                if seen == 0:
                    raise ValueError("data yielded no training batches")
                epoch += 1
    finally:
        bar.close()
        _restore_modes(modes)
    return model


def _check_runnable(model: nn.Module) -> None:
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for n, t in items:
            if t.device.type == "meta":
                raise ValueError(f"model: {kind} {n!r} is on the 'meta' device (a placeholder without values); "
                                 f"materialise and load the weights first.")


def _overrides(model: nn.Module, masks: dict[str, torch.Tensor], dev: torch.device,
               weights: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Tensors to pass to ``functional_call``: masked (or updated) weights, and every tensor not on ``dev``."""
    out: dict[str, torch.Tensor] = {}
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device != dev:
            out[n] = t.to(dev)
    params = dict(model.named_parameters())
    for name, w in (weights or {}).items():
        if name not in params or tuple(w.shape) != tuple(params[name].shape):
            raise ValueError(f"weights: {name!r} does not fit the model (unknown name or shape "
                             f"{tuple(w.shape)}).")
        out[name] = w.detach().to(dev, params[name].dtype)
    for name, mask in masks.items():
        out[name] = out.get(name, params[name]).masked_fill(~mask, 0.0)
    return out


def _run(model: nn.Module, overrides: dict, x: torch.Tensor, first: bool) -> torch.Tensor:
    """One forward pass; the first one turns a shape mismatch into a clear error about the data."""
    if first and not x.is_floating_point():
        raise TypeError(f"data: inputs must be floating point, got dtype {x.dtype}; token ids of a language model: "
                        f"wrap them with prune_lab.data.tokens(ids).")
    try:
        return functional_call(model, overrides, (x,)) if overrides else model(x)
    except RuntimeError as exc:
        if not first or isinstance(exc, torch.cuda.OutOfMemoryError):
            raise
        raise ValueError(f"data: the model could not run on inputs of shape {tuple(x.shape)} and dtype "
                         f"{x.dtype}: {exc}") from exc


def _evaluate_tokens(model, tokens, overrides, dev, batch_size) -> dict[str, float]:
    """Next-token loss, perplexity and top-1 accuracy over every real token of ``tokens`` (see :func:`evaluate`)."""
    tokens.check_vocab(vocab_size(model))
    nll = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    n = 0
    for ids, mask in tokens.batches(batch_size):
        ids, mask = ids.to(dev), mask.to(dev)
        kw = lm_forward_kwargs(model, mask)
        out = functional_call(model, overrides, (ids,), kw) if overrides else model(ids, **kw)
        a, b, c = next_token_stats(output_logits(out), ids, mask)
        nll += a
        correct += b
        n += c
    if n == 0:
        raise ValueError("data: no next-token prediction to evaluate (every sequence has fewer than 2 real tokens)")
    loss = float(nll) / n
    return {"accuracy": int(correct) / n, "loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def evaluate(model: nn.Module, data, *, masks=None, weights=None, device="auto", batch_size: int | None = None
             ) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on the test split of ``data`` (or the given dataset / loader /
    ``(inputs, targets)`` tuple), in eval mode and without gradients.

    Token data (:func:`prune_lab.data.tokens`, or a bundle of them) evaluates a causal LM instead: the next-token
    loss over every real token (``logits[:, :-1]`` vs ``ids[:, 1:]``, padding excluded, mean over tokens) and
    ``{"loss", "perplexity": exp(loss), "accuracy": next-token top-1 accuracy}``. The model may return a tensor
    ``(B, L, V)``, an output with ``.logits`` (``transformers``) or a tuple starting with the logits.
    ``batch_size``: samples (default 512) or sequences (default: the token data's ``batch_size``) per pass.

    The model is neither modified nor copied: masked weights are applied through
    ``torch.func.functional_call(model, {name: w * m, ...}, x)``, and every submodule's train/eval mode is restored.
    ``weights``: ``{name: Tensor}`` replacing those weights (a method's updated kept weights), masked too when
    ``masks`` are given. ``device="auto"`` evaluates where the model lives; another device runs on copies.

    Returns:
        ``{"accuracy": float in [0, 1], "loss": float}`` (``"perplexity"`` too for token data).

    >>> from prune_lab import models, data
    >>> sorted(evaluate(models.create("mlpnet", in_features=64), data.digits()))
    ['accuracy', 'loss']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_runnable(model)
    dev = _model_device(model) if (device is None or device == "auto") else resolve_device(device)
    masks = check_masks(model, masks, device=dev)
    overrides = _overrides(model, masks, dev, weights)
    tokens = as_tokens(data, split="test")
    if tokens is not None:
        with eval_mode(model), torch.no_grad():
            return _evaluate_tokens(model, tokens, overrides, dev, batch_size)
    batch_size = 512 if batch_size is None else batch_size
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    n = 0
    with eval_mode(model):
        with torch.no_grad():
            dtype = floating_dtype(model.parameters())
            for x, y in iter_batches(data, split="test", batch_size=batch_size):
                # labels checked where they are (on the host: no device synchronisation), before the loss
                lo, hi = (int(y.min()), int(y.max())) if y.numel() else (0, 0)
                x, y = x.to(dev), y.to(dev)
                if dtype is not None and x.is_floating_point() and x.dtype != dtype:
                    x = x.to(dtype)  # float32 data, half-precision model: evaluated in the model's precision
                out = _run(model, overrides, x, first=n == 0)
                if out.dim() == 2 and (lo < 0 or hi >= out.shape[1]):
                    raise ValueError(f"data: labels must be class indices in [0, {out.shape[1]}) for a model with "
                                     f"{out.shape[1]} outputs; got labels from {lo} to {hi}. Do the data and the "
                                     f"model match?")
                loss_sum += batch_loss(out, x, y, reduction="sum").double()
                correct += (out.argmax(dim=1) == y).sum()
                n += int(y.shape[0])
    if n == 0:
        raise ValueError("data yielded no evaluation samples")
    return {"accuracy": int(correct) / n, "loss": float(loss_sum) / n}


def perplexity(model: nn.Module, tokens, *, masks=None, weights=None, device="auto", batch_size: int | None = None
               ) -> float:
    """Perplexity ``exp(mean next-token NLL)`` of a causal LM on ``tokens`` (a :class:`~prune_lab.data.TokenBatches`,
    a bundle of them, or anything :func:`prune_lab.data.tokens` accepts), with ``masks`` / ``weights`` applied
    through ``functional_call`` (the model is not modified). See :func:`evaluate`.

    >>> lm = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16))
    >>> perplexity(lm, torch.randint(0, 16, (4, 10))) > 1.0
    True
    """
    if as_tokens(tokens, split="test") is None:
        from ..data import tokens as wrap

        tokens = wrap(tokens)
    return evaluate(model, tokens, masks=masks, weights=weights, device=device, batch_size=batch_size)["perplexity"]


def recalibrate_bn(
    model: nn.Module,
    data,
    *,
    masks=None,
    batches: int = 20,
    batch_size: int = 256,
    inplace: bool = False,
    seed: int = 0,
) -> nn.Module:
    """Re-estimate every BatchNorm's running mean and variance from ``batches`` training batches (one no-grad pass,
    cumulative average), with ``masks`` applied through ``functional_call``. Useful after pruning without
    fine-tuning. Returns a deep copy unless ``inplace``; the weights themselves are never changed.

    >>> from prune_lab import models, data
    >>> net = models.create("resnet20_cifar", in_channels=1)
    >>> fresh = recalibrate_bn(net, data.synthetic(n_train=16, n_test=4, input_shape=(1, 8, 8)), batches=1)
    >>> fresh is net
    False
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    batches = _nonneg_int(batches, "batches")
    target = model if inplace else copy.deepcopy(model)
    bns = [m for m in target.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or batches == 0:
        return target
    dev = _model_device(target)
    masks = check_masks(target, masks, device=dev)
    overrides = _overrides(target, masks, dev)
    modes = _save_modes(target)
    momenta = [bn.momentum for bn in bns]
    try:
        target.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average over the pass
            bn.train()
        g = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for i, (x, _) in enumerate(iter_batches(data, split="train", batch_size=batch_size, shuffle=True, generator=g)):
                if i >= batches:
                    break
                x = x.to(dev)
                functional_call(target, overrides, (x,)) if overrides else target(x)
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        _restore_modes(modes)
    return target
