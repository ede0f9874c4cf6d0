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
