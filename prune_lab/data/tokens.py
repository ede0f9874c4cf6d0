"""Token-id sequences for causal language models: :class:`TokenBatches` and :func:`tokens`.

A ``TokenBatches`` is the calibration data of data-driven methods (Wanda, layerwise OBS) and the evaluation data of
:func:`prune_lab.evaluate`, which then reports next-token loss, perplexity and top-1 accuracy. It is a map-style
``Dataset`` of sequences: item ``i`` is ``(input_ids (L,), attention_mask (L,))``, both int64, so
``calibration_batch`` and ``iter_batches`` give ``(input_ids (n, L), attention_mask (n, L))``: the targets of a
causal LM are its inputs shifted by one, and the second tensor says which positions are real tokens (1) or padding
(0). Sequences of different lengths are right-padded to the longest one (``pad_id``, mask 0).

A ``TokenBatches`` has no train/test split: give the evaluation tokens to ``evaluate(..., data=...)``, or put two
of them in a bundle with :func:`token_bundle` (calibration = ``train``, evaluation = ``test``).
"""
from __future__ import annotations

import hashlib
import numbers
from collections.abc import Iterable, Mapping

import torch
from torch.utils.data import Dataset

from .bundle import DataBundle

__all__ = ["TokenBatches", "as_tokens", "token_bundle", "tokens"]

DEFAULT_BATCH_SIZE = 8


def _check_ids(t, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch tensor of token ids, got {type(t).__name__}.")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{what} must hold integer token ids (int64), got dtype {t.dtype}; tokenize the text first "
                        f"(e.g. tokenizer(texts, return_tensors='pt')['input_ids']).")
    if t.dim() != 2:
        hint = " (one sequence: use ids.unsqueeze(0))" if t.dim() == 1 else ""
        raise ValueError(f"{what} must have shape (n_sequences, seq_len), got {tuple(t.shape)}{hint}.")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{what} is empty: shape {tuple(t.shape)}.")
    if t.shape[1] < 2:
        raise ValueError(f"{what}: sequences need at least 2 tokens (a causal LM predicts each token from the ones "
                         f"before it), got seq_len {t.shape[1]}.")
    if int(t.min()) < 0:
        raise ValueError(f"{what} holds negative token ids (min {int(t.min())}).")
    return t.detach().to("cpu", torch.int64)


def _check_mask(m, ids: torch.Tensor, what: str) -> torch.Tensor:
    m = torch.as_tensor(m)
    if tuple(m.shape) != tuple(ids.shape):
        raise ValueError(f"{what}: attention_mask must have the shape of the ids {tuple(ids.shape)}, "
                         f"got {tuple(m.shape)}.")
    if m.dtype.is_floating_point and not bool(((m == 0) | (m == 1)).all()):
        raise ValueError(f"{what}: attention_mask must hold 0 (padding) and 1 (token).")
    return m.detach().to("cpu", torch.int64).clamp(0, 1)


def _is_row(x) -> bool:
    """A plain list of ints: one sequence."""
    return isinstance(x, (list, tuple)) and bool(x) and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in x)


def _parts(source, what: str, top: bool = True) -> list:
    """``[(ids, mask or None)]`` from a tensor, a tokenizer dict, or an iterable of those."""
    if isinstance(source, torch.Tensor):
        return [(_check_ids(source, what), None)]
    if isinstance(source, Mapping):
        if "input_ids" not in source:
            raise ValueError(f"{what}: a dict of token batches needs an 'input_ids' entry, got keys "
                             f"{', '.join(map(repr, source))}.")
        ids, mask = source["input_ids"], source.get("attention_mask")
        if isinstance(ids, (list, tuple)) and ids and all(_is_row(r) for r in ids):  # tokenizer without tensors
            masks = mask if mask is not None else [None] * len(ids)
            out = []
            for i, (r, m) in enumerate(zip(ids, masks)):
                row = _check_ids(torch.tensor([list(r)]), f"{what}['input_ids'][{i}]")
                out.append((row, None if m is None else _check_mask(torch.tensor([list(m)]), row, what)))
            return out
        ids = _check_ids(torch.as_tensor(ids), f"{what}['input_ids']")
        return [(ids, None if mask is None else _check_mask(mask, ids, what))]
    if _is_row(source):
        if top:
            raise ValueError(f"{what} is a flat list of {len(source)} token ids: give a list of sequences "
                             f"([ids]) or a (n_sequences, seq_len) tensor.")
        return [(_check_ids(torch.tensor([list(source)]), what), None)]
    if isinstance(source, (str, bytes)) or not isinstance(source, Iterable):
        raise TypeError(f"{what} must be a (n_sequences, seq_len) int64 tensor, a list of such batches, or an "
                        f"iterable / DataLoader of them (dicts with 'input_ids' too); got {type(source).__name__}.")
    out = []
    for i, item in enumerate(source):
        if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor) and item[0].dim() == 2:
            item = item[0]  # (ids, labels) pairs from a DataLoader over a TensorDataset
        out += _parts(item, f"{what}[{i}]", top=False)
    if not out:
        raise ValueError(f"{what} is empty: it yielded no batches.")
    return out


class TokenBatches(Dataset):
    """Token-id sequences (right-padded to one length) with their attention mask, read in batches of
    ``batch_size`` sequences.

    Attributes: ``input_ids`` ``(N, L)`` int64, ``attention_mask`` ``(N, L)`` int64 (1 = token, 0 = padding),
    ``batch_size``, ``vocab_size`` (``None`` unless given), ``name``. Build it with :func:`tokens`.

    >>> tb = TokenBatches(torch.tensor([[1, 2, 3], [4, 5, 6]]), batch_size=1)
    >>> len(tb), tb.n_tokens, [ids.shape for ids, _ in tb.batches()]
    (2, 6, [torch.Size([1, 3]), torch.Size([1, 3])])
    """

    def __init__(self, ids, *, batch_size: int = DEFAULT_BATCH_SIZE, attention_mask=None, vocab_size=None,
                 pad_id: int = 0, name: str = "tokens"):
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral)
                                       or vocab_size < 1):
            raise ValueError(f"vocab_size must be a positive int or None, got {vocab_size!r}.")
        parts = _parts(ids, "ids")
        if attention_mask is not None:
            if len(parts) != 1 or parts[0][1] is not None:
                raise ValueError("attention_mask= goes with one (n_sequences, seq_len) tensor of ids; batches from a "
                                 "tokenizer carry their own 'attention_mask'.")
            parts = [(parts[0][0], _check_mask(attention_mask, parts[0][0], "ids"))]
        length = max(p.shape[1] for p, _ in parts)
        all_ids, all_masks = [], []
        for p, m in parts:
            m = torch.ones_like(p) if m is None else m
            pad = length - p.shape[1]
            all_ids.append(torch.nn.functional.pad(p, (0, pad), value=int(pad_id)))
            all_masks.append(torch.nn.functional.pad(m, (0, pad), value=0))
        self.input_ids = torch.cat(all_ids)
        self.attention_mask = torch.cat(all_masks)
        if int((self.attention_mask.sum(1) == 0).sum()):
            raise ValueError("ids: some sequences are all padding (attention_mask all 0).")
        self.batch_size = int(batch_size)
        self.vocab_size = None if vocab_size is None else int(vocab_size)
        self.name = str(name)
        self.max_id = int(self.input_ids[self.attention_mask.bool()].max())
        if self.vocab_size is not None:
            self.check_vocab(self.vocab_size)
        self._identity = None

    # ---------------------------------------------------------------------------------------- Dataset protocol
    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __getitem__(self, index):
        return self.input_ids[index], self.attention_mask[index]

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences ``indices`` as ``(input_ids (B, L), attention_mask (B, L))``, trimmed of all-padding columns
        at the right."""
        ids, mask = self.input_ids[indices], self.attention_mask[indices]
        keep = int(mask.any(0).nonzero().max()) + 1 if mask.numel() else mask.shape[1]
        return ids[:, :keep], mask[:, :keep]

    def batches(self, batch_size: int | None = None):
        """Yield ``(input_ids, attention_mask)`` batches of at most ``batch_size`` (default ``self.batch_size``)
        sequences, in order."""
        bs = self.batch_size if batch_size is None else int(batch_size)
        for a in range(0, len(self), bs):
            yield self.batch(slice(a, a + bs))

    # ---------------------------------------------------------------------------------------- facts and checks
    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.attention_mask.sum())

    @property
    def padded(self) -> bool:
        return not bool(self.attention_mask.all())

    def check_vocab(self, vocab_size: int | None, what: str = "the model") -> None:
        """``ValueError`` when a token id is ≥ ``vocab_size`` (no-op for ``None``)."""
        if vocab_size is not None and self.max_id >= int(vocab_size):
            raise ValueError(f"token ids go up to {self.max_id} but {what} has a vocabulary of {int(vocab_size)} "
                             f"(ids 0..{int(vocab_size) - 1}); were the ids made by another tokenizer?")

    def identity(self) -> str:
        """A content hash of ids and mask (32 hex characters; ``batch_size`` and ``name`` do not enter)."""
        if self._identity is None:
            h = hashlib.sha256(b"TokenBatches|")
            for t in (self.input_ids, self.attention_mask):
                h.update(f"{tuple(t.shape)}|".encode())
                h.update(t.contiguous().numpy().tobytes())
            self._identity = h.hexdigest()[:32]
        return self._identity

    def __repr__(self) -> str:
        pad = ", padded" if self.padded else ""
        return (f"TokenBatches(name={self.name!r}, sequences={len(self)}, seq_len={self.seq_len}, "
                f"tokens={self.n_tokens}, batch_size={self.batch_size}{pad})")


def tokens(ids, *, batch_size: int = DEFAULT_BATCH_SIZE, attention_mask=None, vocab_size: int | None = None,
           pad_id: int = 0, name: str = "tokens") -> TokenBatches:
    """Wrap token ids as :class:`TokenBatches`: calibration and evaluation data for causal LMs.

    ``ids``: an integer tensor ``(n_sequences, seq_len)``, a list of such batches, an iterable / ``DataLoader``
    of them, or a tokenizer's output (a dict with ``input_ids`` and optionally ``attention_mask``; a list of such
    dicts too). ``batch_size``: sequences per forward pass when evaluating or calibrating. ``vocab_size``: check the
    ids against it now (the model's vocabulary is checked anyway when it is known).

    Errors name the problem: float or bool ids, a 1-D tensor, an empty set, sequences shorter than 2 tokens,
    negative ids, ids beyond ``vocab_size``.

    >>> tb = tokens(torch.randint(0, 100, (4, 16)), batch_size=2)
    >>> ids, mask = next(tb.batches()); ids.shape, bool(mask.all())
    (torch.Size([2, 16]), True)
    """
    return TokenBatches(ids, batch_size=batch_size, attention_mask=attention_mask, vocab_size=vocab_size,
                        pad_id=pad_id, name=name)


def token_bundle(train, test, *, name: str = "tokens", **kw) -> DataBundle:
    """A :class:`DataBundle` with calibration tokens as ``train`` and evaluation tokens as ``test`` (each anything
    :func:`tokens` accepts, or a ``TokenBatches``); ``kw`` go to :func:`tokens`. ``num_classes`` is the
    vocabulary size when given, else the largest id + 1; ``input_shape`` is ``(seq_len,)`` of ``train``.

    >>> b = token_bundle(torch.randint(0, 50, (8, 12)), torch.randint(0, 50, (2, 12)), vocab_size=50)
    >>> len(b.train), len(b.test), b.num_classes
    (8, 2, 50)
    """
    tr = train if isinstance(train, TokenBatches) else tokens(train, name=f"{name}.train", **kw)
    te = test if isinstance(test, TokenBatches) else tokens(test, name=f"{name}.test", **kw)
    vocab = kw.get("vocab_size") or max(tr.max_id, te.max_id) + 1
    return DataBundle(name, tr, te, vocab, (tr.seq_len,), notes="token ids for a causal LM")


def as_tokens(data, split: str = "test") -> TokenBatches | None:
    """The :class:`TokenBatches` behind ``data`` (itself, or a bundle's ``split``), else ``None``.

    >>> as_tokens(tokens(torch.ones(1, 4, dtype=torch.long))) is not None, as_tokens((torch.ones(2, 3), None))
    (True, None)
    """
    if isinstance(data, TokenBatches):
        return data
    if isinstance(data, DataBundle):
        part = getattr(data, split, None)
        return part if isinstance(part, TokenBatches) else None
    return None
