"""The data batch of a data-driven method, with errors that name the method and the problem (no data, empty data,
data of the wrong kind) before any score is computed from it."""
from __future__ import annotations

import torch

from ..data import as_tokens, calibration_batch, data_identity, resolve_dataset
from ..models.hf import vocab_size

__all__ = ["data_id", "method_batch"]


def _is_pair(data) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)


def method_batch(data, n: int, *, method: str | None, seed: int = 0, whole_pair: bool = True,
                 model=None) -> tuple:
    """``(inputs, targets)`` for ``method`` from ``data``: an ``(inputs, targets)`` pair is validated and used whole
    (``whole_pair``) or sampled like any dataset; a bundle, dataset or ``DataLoader`` gives a seeded sample of
    ``n`` training examples. ``ValueError`` naming ``method`` when there is no data or it is empty (scores from an
    empty batch would be all zero: a silently arbitrary mask), or when token ids go beyond ``model``'s vocabulary.
    Token data (:func:`prune_lab.data.tokens`) gives ``(input_ids (n, L), attention_mask (n, L))``: the batch of
    the next-token loss (:mod:`prune_lab.core.losses`).

    >>> x, y = method_batch((torch.zeros(3, 4), torch.tensor([0, 1, 1])), 256, method="snip")
    >>> x.shape
    torch.Size([3, 4])
    """
    who = f"method {method!r}" if method else "scoring"
    if data is None:
        raise ValueError(f"{who} needs data (a batch, a DataLoader or a prune_lab dataset); pass "
                         f"data=... to the session or to prune().")
    try:
        if _is_pair(data) and whole_pair:
            resolve_dataset(data, what="data")  # validates shapes, label dtype and emptiness
            x, y = data
        else:
            x, y = calibration_batch(data, n=int(n), split="train", seed=seed)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{who}: {exc}") from exc
    if x.shape[0] == 0:
        raise ValueError(f"{who}: data is empty (0 samples); it needs at least one.")
    tokens = as_tokens(data, split="train")
    if tokens is not None and model is not None:
        try:
            tokens.check_vocab(vocab_size(model))
        except ValueError as exc:
            raise ValueError(f"{who}: {exc}") from exc
    return x, y


def data_id(ctx, method: str | None = None) -> str:
    """The content identity of ``ctx.data`` (:func:`prune_lab.data.data_identity`), computed once per data object
    and kept in ``ctx.cache``: the data part of the keys of a method's cached intermediates. Bad data (empty, wrong
    types) raises here, on its first reading, with ``method`` named."""
    key = ("second_order.data_identity", id(ctx.data))
    hit = ctx.cache.get(key)
    if hit is None or hit[0] is not ctx.data:
        try:
            ident = data_identity(ctx.data)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"method {method!r}: {exc}" if method else str(exc)) from exc
        hit = (ctx.data, ident)
        ctx.cache[key] = hit
    return hit[1]
