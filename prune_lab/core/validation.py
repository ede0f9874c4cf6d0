"""Argument checks shared by every public entry point: clear errors that name the argument, the bad value and the
valid choices (with a "did you mean" suggestion)."""
from __future__ import annotations

import difflib
import math
import numbers
from typing import Iterable


def check_choice(value, choices: Iterable[str], *, what: str) -> str:
    """Return ``value`` when it is one of ``choices``; otherwise raise ``ValueError`` naming them.

    >>> check_choice("lamp", ["lamp", "lap"], what="method")
    'lamp'
    """
    choices = list(choices)
    if isinstance(value, str) and value in choices:
        return value
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
        if close:
            hint = f" Did you mean {close[0]!r}?"
    raise ValueError(f"unknown {what} {value!r}.{hint} Valid choices: {', '.join(map(repr, choices))}.")


def check_sparsity(sparsity, *, what: str = "sparsity") -> float:
    """Return ``sparsity`` as a float after checking it is a real number in [0, 1).

    >>> check_sparsity(0.9)
    0.9
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        try:  # 0-d tensors and numpy scalars are welcome
            import torch

            if isinstance(sparsity, torch.Tensor) and sparsity.numel() == 1 and not sparsity.dtype == torch.bool:
                return check_sparsity(float(sparsity.item()), what=what)
        except ImportError:  # pragma: no cover
            pass
        raise TypeError(
            f"{what} must be a real number in [0, 1) (the fraction of weights removed), got {sparsity!r} "
            f"of type {type(sparsity).__name__}."
        )
    value = float(sparsity)
    if math.isnan(value) or not 0.0 <= value < 1.0:
        raise ValueError(
            f"{what} must be in [0, 1) (the fraction of weights removed; 0.9 keeps 10 %), got {sparsity!r}."
        )
    return value


def round_half_up(x: float) -> int:
    """The budget rounding of METHODS.md: ``round(s·n)`` with halves going up, independent of banker's rounding.

    >>> round_half_up(2.5), round_half_up(2.4999)
    (3, 2)
    """
    return int(math.floor(x + 0.5))


def check_int(value, *, what: str, low: int | None = None) -> int:
    """Return ``value`` as an int after checking it is an integer (not a bool; a float with an integral value is
    accepted) at least ``low``; ``TypeError`` / ``ValueError`` naming ``what`` otherwise.

    >>> check_int(3, what="seed"), check_int(2.0, what="rounds", low=1)
    (3, 2)
    """
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and (
        isinstance(value, numbers.Integral) or (math.isfinite(float(value)) and float(value).is_integer()))
    if not ok:
        try:  # numpy integers and 0-d integer tensors are welcome
            import torch

            if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_floating_point \
                    and value.dtype != torch.bool:
                return check_int(int(value.item()), what=what, low=low)
        except ImportError:  # pragma: no cover
            pass
        raise TypeError(f"{what} must be an int, got {value!r} of type {type(value).__name__}.")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{what} must be an int >= {low}, got {value!r}.")
    return value


def floating_dtype(tensors):
    """The one floating dtype of ``tensors`` (an iterable of tensors), or ``None`` when they have none or several."""
    kinds = {t.dtype for t in tensors if t.is_floating_point()}
    return kinds.pop() if len(kinds) == 1 else None


def match_input_dtype(x, tensors):
    """Floating inputs ``x`` cast to the one floating dtype of a model's ``tensors`` (its parameters) when they
    differ: float32 data for a half-precision or bfloat16 model runs in the model's precision. Other inputs (ints,
    token ids; models of mixed precision) are returned unchanged."""
    if not x.is_floating_point():
        return x
    dtype = floating_dtype(tensors)
    return x if dtype is None or dtype == x.dtype else x.to(dtype)


def input_error(exc: BaseException, x, *, what: str) -> ValueError:
    """A ``ValueError`` for a model that could not run on ``x``: names the inputs' shape and dtype and keeps torch's
    own explanation."""
    return ValueError(f"{what}: the model could not run on inputs of shape {tuple(x.shape)} (one sample: "
                      f"{tuple(x.shape[1:])}) and dtype {x.dtype}; do the data and the model match? ({exc})")


def check_labels(y, out, *, what: str) -> None:
    """``ValueError`` unless the class labels ``y`` index the model's outputs ``out: (N, C)`` (``0 <= y < C``)."""
    if out.dim() < 2 or y.numel() == 0:
        return
    n_out = int(out.shape[1])
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= n_out:
        raise ValueError(f"{what}: labels must be class indices in [0, {n_out}) for a model with {n_out} outputs; "
                         f"got labels from {lo} to {hi}. Do the data and the model match?")
