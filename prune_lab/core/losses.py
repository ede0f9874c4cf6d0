"""The one loss of prune_lab: what training, evaluation and every data-driven method (SNIP, GraSP, the empirical
Fisher of WoodFisher / CBS, CBS's training-loss judge) compute on a batch.

A batch is ``(inputs, targets)``:

- a classifier's: ``inputs (N, ...)`` floating point, ``targets (N,)`` class indices; the loss is the
  cross-entropy of the logits ``(N, C)``;
- a causal LM's (token data, :func:`prune_lab.data.tokens`): ``inputs (N, L)`` integer token ids and ``targets
  (N, L)`` their attention mask (1 = real token, 0 = padding); the loss is the next-token cross-entropy
  (``logits[:, :-1]`` against ``ids[:, 1:]``) averaged over the positions whose input and target tokens are both
  real. :func:`is_token_batch` tells them apart (class labels are 1-D; a token batch's mask has the ids' shape).

The model may return a tensor, an output with ``.logits`` (``transformers``) or a tuple starting with the logits.
Functions here never modify the model or the tensors they are given.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

__all__ = ["is_token_batch", "output_logits", "lm_forward_kwargs", "next_token_stats", "batch_loss", "model_loss",
           "loss_terms", "right_padded"]


def is_token_batch(inputs: torch.Tensor, targets: torch.Tensor) -> bool:
    """Whether ``(inputs, targets)`` is a causal LM's token batch: integer ids ``(N, L)`` and a mask of the same
    shape (a classifier's targets are ``(N,)``).

    >>> is_token_batch(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long))
    True
    >>> is_token_batch(torch.zeros(2, 5), torch.tensor([0, 1]))
    False
    """
    return (isinstance(inputs, torch.Tensor) and isinstance(targets, torch.Tensor) and inputs.dim() == 2
            and not inputs.is_floating_point() and not inputs.is_complex() and inputs.dtype != torch.bool
            and tuple(targets.shape) == tuple(inputs.shape))


def output_logits(out) -> torch.Tensor:
    """The logits in a model's output: a tensor as is, ``out.logits``, ``out["logits"]`` or the first element of a
    tuple.

    >>> output_logits((torch.zeros(1, 2, 3), None)).shape
    torch.Size([1, 2, 3])
    """
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, dict):
        logits = out.get("logits")
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model returned {type(out).__name__}; expected logits: a tensor, an output with "
                        f".logits, or a tuple whose first element is the logits.")
    return logits


def lm_forward_kwargs(model: nn.Module, attention_mask: torch.Tensor | None = None) -> dict:
    """Keyword arguments of an LM forward pass: ``use_cache=False`` when ``forward`` takes it, ``attention_mask``
    when there is padding and ``forward`` takes it.

    >>> lm_forward_kwargs(nn.Linear(2, 2), torch.ones(1, 2))
    {}
    """
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    kw = {}
    if "use_cache" in params:
        kw["use_cache"] = False
    if attention_mask is not None and "attention_mask" in params and not bool(attention_mask.all()):
        kw["attention_mask"] = attention_mask
    return kw


def right_padded(mask: torch.Tensor) -> bool:
    """Whether every row of an attention mask ``(N, L)`` is real tokens followed by padding only (then a causal
    LM's logits at the real positions do not depend on the padding, with or without the mask).

    >>> right_padded(torch.tensor([[1, 1, 0], [1, 1, 1]])), right_padded(torch.tensor([[0, 1, 1]]))
    (True, False)
    """
    m = (mask > 0).to(torch.int8)
    return bool((m[:, 1:] <= m[:, :-1]).all())


def next_token_stats(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(nll_sum float64, correct int64, n_predicted)`` of a causal LM's next-token predictions:
    ``logits[:, :-1]`` against ``ids[:, 1:]``, counting the positions where both the input and the target token are
    real (``mask`` 1; padding excluded). ``logits: (B, L, V)``, ``ids``, ``mask: (B, L)``. Differentiable in
    ``logits``.

    >>> nll, correct, n = next_token_stats(torch.zeros(1, 3, 4), torch.tensor([[0, 1, 2]]))
    >>> round(float(nll) / n, 4), n   # uniform over 4 tokens: log 4
    (1.3863, 2)
    """
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
        raise ValueError(f"a causal LM must return logits (batch, seq_len, vocab) = {tuple(ids.shape)} + (V,); got "
                         f"{tuple(logits.shape)}.")
    pred, target = logits[:, :-1].float(), ids[:, 1:]
    valid = torch.ones_like(target, dtype=torch.bool) if mask is None else (mask[:, :-1] > 0) & (mask[:, 1:] > 0)
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
    valid = valid.reshape(-1)
    correct = ((pred.argmax(-1).reshape(-1) == target.reshape(-1)) & valid).sum()
    return (nll * valid).sum(dtype=torch.float64), correct, int(valid.sum())


def _token_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ nll over real next-token positions, their count)`` as tensors (no host synchronisation, vmap-safe)."""
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
        raise ValueError(f"a causal LM must return logits (batch, seq_len, vocab) = {tuple(ids.shape)} + (V,); got "
                         f"{tuple(logits.shape)}.")
    pred, target = logits[:, :-1], ids[:, 1:]
    if pred.dtype in (torch.float16, torch.bfloat16):
        pred = pred.float()
    valid = ((mask[:, :-1] > 0) & (mask[:, 1:] > 0)).to(pred.dtype)
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
    return (nll * valid.reshape(-1)).sum(), valid.sum()


def loss_terms(inputs: torch.Tensor, targets: torch.Tensor) -> int:
    """How many terms the ``"mean"`` loss of a batch averages: its samples (classifier) or its real next-token
    positions (token batch). ``batch_loss(..., reduction="sum") / loss_terms(...)`` is the mean.

    >>> loss_terms(torch.zeros(2, 4, dtype=torch.long), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    5
    """
    if is_token_batch(inputs, targets):
        return int(((targets[:, :-1] > 0) & (targets[:, 1:] > 0)).sum())
    return int(inputs.shape[0])


def batch_loss(out, inputs: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean",
               temperature: float = 1.0) -> torch.Tensor:
    """The loss of a model output ``out`` on the batch ``(inputs, targets)`` (see the module docstring).

    ``reduction="mean"``: the mean over samples (classifier) or over real next-token positions (token batch);
    ``"sum"``: the sum (classifier: over samples; token batch: over positions). ``temperature`` divides the logits.
    A token batch without any real next-token position has loss 0.

    >>> ids = torch.tensor([[0, 1, 2]]); round(float(batch_loss(torch.zeros(1, 3, 4), ids, torch.ones_like(ids))), 4)
    1.3863
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
    logits = output_logits(out)
    if temperature != 1.0:
        logits = logits / temperature
    if is_token_batch(inputs, targets):
        total, count = _token_nll(logits, inputs, targets)
        return total if reduction == "sum" else total / count.clamp(min=1)
    return F.cross_entropy(logits, targets.long(), reduction=reduction)


def model_loss(model: nn.Module, params: dict | None, inputs: torch.Tensor, targets: torch.Tensor, *,
               reduction: str = "mean", temperature: float = 1.0, mask_kwargs: bool = True) -> torch.Tensor:
    """Run ``model`` on ``inputs`` (``functional_call`` with ``params`` when given) and return :func:`batch_loss`.
    A token batch runs with :func:`lm_forward_kwargs` (``mask_kwargs=False`` leaves the attention mask out: exact
    for right-padded batches, and what ``vmap`` needs).

    >>> net = nn.Linear(3, 2)
    >>> model_loss(net, None, torch.zeros(4, 3), torch.tensor([0, 1, 0, 1])).shape
    torch.Size([])
    """
    kw = {}
    if is_token_batch(inputs, targets):
        kw = lm_forward_kwargs(model, targets if mask_kwargs else None)
    out = functional_call(model, params, (inputs,), kw) if params else model(inputs, **kw)
    return batch_loss(out, inputs, targets, reduction=reduction, temperature=temperature)
