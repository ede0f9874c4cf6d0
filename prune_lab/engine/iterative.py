"""Iterative pruning with fine-tuning (and optional weight rewinding), as in LAMP's and the lottery-ticket
experiments: round r prunes to sparsity ``1 − (1 − rate)^r`` starting from the previous masks, then fine-tunes.
"""
from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from ..training import evaluate, train

__all__ = ["IterativeResult", "iterative_prune", "schedule"]

_RESERVED = ("masks", "epochs", "steps", "seed", "on_step", "progress")


@dataclass
class IterativeResult:
    """What :func:`iterative_prune` returns.

    Attributes:
        table: one row per round (round 0 = the starting model) with columns ``round``, ``sparsity`` (achieved,
            over the prunable weights), ``accuracy`` and ``loss`` (test split, after fine-tuning).
        masks: the final ``{name: bool tensor}``, True = kept.
        model: the final fine-tuned copy (pruned weights are exactly zero); the caller's model is untouched.
        results: the engine's ``PruneResult`` of every round.
    """

    table: pd.DataFrame
    masks: dict
    model: nn.Module
    results: list = field(default_factory=list, repr=False)

    def __repr__(self) -> str:
        last = self.table.iloc[-1]
        return (f"IterativeResult(rounds={len(self.table) - 1}, sparsity={last['sparsity']:.4f}, "
                f"accuracy={last['accuracy']:.4f})")


def schedule(rounds: int, rate: float = 0.2) -> list[float]:
    """Target sparsities of rounds ``1..rounds``: ``1 − (1 − rate)^r`` (each round removes ``rate`` of the survivors).

    >>> [round(s, 3) for s in schedule(3, 0.2)]
    [0.2, 0.36, 0.488]
    """
    if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 < float(rate) < 1.0:
        raise ValueError(f"rate must be in (0, 1) (the fraction of surviving weights removed per round), got {rate!r}")
    return [1.0 - (1.0 - float(rate)) ** r for r in range(1, int(rounds) + 1)]


def _engine_prune():
    """The engine's one-shot ``prune`` (imported lazily; tests may substitute it)."""
    from .prune import prune

    return prune


def _clone_state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _apply_masks(model: nn.Module, masks: dict) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].masked_fill_(~mask.to(params[name].device), 0.0)


def iterative_prune(
    model: nn.Module,
    data,
    method: str,
    *,
    rounds: int,
    rate: float = 0.2,
    finetune_epochs: int = 1,
    finetune_steps: int | None = None,
    rewind_to=None,
    allocation: str | None = None,
    seed: int = 0,
    progress: bool = True,
    prune_kw: dict | None = None,
    **train_kw,
) -> IterativeResult:
    """Prune ``model`` in ``rounds`` rounds, each removing ``rate`` of the surviving weights, with fine-tuning.

    Works on a deep copy. Round ``r`` (1-based) calls the engine's ``prune(copy, method, 1 − (1 − rate)^r,
    allocation=allocation, data=data, seed=seed, masks=<previous masks>, **prune_kw)`` (so already-pruned weights
    stay pruned and the new masks nest inside the old ones), writes the method's updated weights when it returns
    some (OBS, CBS-U), optionally rewinds, then fine-tunes with ``train(copy, data, masks=..., seed=seed + r,
    **train_kw)`` for ``finetune_steps`` steps or else ``finetune_epochs`` epochs (0 = no fine-tuning) and evaluates
    on the test split.

    Args:
        rewind_to: ``None`` keeps the fine-tuned weights; ``"init"`` resets every parameter and buffer to its value
            at the start (the caller's model) before each round's fine-tuning; an int ``k`` resets them to their
            values after ``k`` steps of the first fine-tuning (round 1), from round 2 on. Pruned weights are zeroed
            after rewinding.
        prune_kw: method hyperparameters (and ``include``/``exclude``) for the engine.
        **train_kw: :func:`~prune_lab.training.train` arguments (``optimizer``, ``lr``, ``batch_size``,
            ``weight_decay``, ``device``).

    Returns:
        :class:`IterativeResult` (``.table`` with columns ``round, sparsity, accuracy, loss``; ``.masks``;
        ``.model``; ``.results``).

    >>> import prune_lab as pl
    >>> bundle = pl.data.digits()
    >>> net = pl.train(pl.models.create("mlpnet", in_features=64, seed=0), bundle, epochs=5, progress=False)
    >>> res = iterative_prune(net, bundle, "magnitude", rounds=2, rate=0.5, progress=False)
    >>> res.table["round"].tolist()
    [0, 1, 2]
    """
    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    targets = schedule(rounds, rate)
    for bad in _RESERVED:
        if bad in train_kw:
            raise TypeError(
                f"iterative_prune() sets train's {bad}= itself; use finetune_epochs / finetune_steps / seed / progress"
            )
    if finetune_steps is not None:
        if isinstance(finetune_steps, bool) or not isinstance(finetune_steps, numbers.Integral) or finetune_steps < 0:
            raise ValueError(f"finetune_steps must be a non-negative int, got {finetune_steps!r}")
        length = {"steps": int(finetune_steps)}
    else:
        if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, numbers.Integral) or finetune_epochs < 0:
            raise ValueError(f"finetune_epochs must be a non-negative int, got {finetune_epochs!r}")
        length = {"epochs": int(finetune_epochs)}
    if rewind_to is not None and rewind_to != "init":
        if isinstance(rewind_to, bool) or not isinstance(rewind_to, numbers.Integral) or rewind_to < 0:
            raise ValueError(f"rewind_to must be None, 'init' or a non-negative step count, got {rewind_to!r}")
        if finetune_steps is not None and rewind_to > finetune_steps:
            raise ValueError(f"rewind_to={rewind_to} is beyond the {finetune_steps} steps of the first fine-tuning")
    prune = _engine_prune()
    prune_kw = dict(prune_kw or {})
    device = train_kw.get("device", "auto")

    work = copy.deepcopy(model)
    start_state = _clone_state(work) if rewind_to is not None else None
    rewind_state = start_state if rewind_to in ("init", 0) else None
    first = evaluate(work, data)
    rows = [{"round": 0, "sparsity": 0.0, "accuracy": first["accuracy"], "loss": first["loss"]}]
    masks = None
    results = []
    bar = tqdm(total=len(targets), disable=not progress, desc=f"iterative {method}", unit="round")
    try:
        for r, target in enumerate(targets, start=1):
            res = prune(work, method, target, allocation=allocation, data=data, seed=seed, masks=masks,
                        device=device, **prune_kw)
            results.append(res)
            masks = {n: m.detach().clone() for n, m in res.masks.items()}
            if res.weights is not None:
                params = dict(work.named_parameters())
                with torch.no_grad():
                    for name, w in res.weights.items():
                        params[name].copy_(w.to(params[name].device))
            if rewind_state is not None:
                work.load_state_dict(rewind_state)
            _apply_masks(work, masks)

            on_step = None
            if isinstance(rewind_to, int) and rewind_to > 0 and rewind_state is None:
                def on_step(step, m, _k=int(rewind_to)):
                    nonlocal rewind_state
                    if step == _k:
                        rewind_state = _clone_state(m)

            if next(iter(length.values())) > 0:
                train(work, data, masks=masks, seed=seed + r, progress=False, on_step=on_step, **length, **train_kw)
            if isinstance(rewind_to, int) and rewind_to > 0 and rewind_state is None:
                raise ValueError(f"rewind_to={rewind_to} is beyond the steps of the first fine-tuning ({length})")
            metrics = evaluate(work, data, masks=masks)
            rows.append({"round": r, "sparsity": float(res.sparsity), "accuracy": metrics["accuracy"],
                         "loss": metrics["loss"]})
            bar.set_postfix(sparsity=f"{res.sparsity:.3f}", acc=f"{metrics['accuracy']:.4f}", refresh=False)
            bar.update(1)
    finally:
        bar.close()
    table = pd.DataFrame(rows, columns=["round", "sparsity", "accuracy", "loss"])
    return IterativeResult(table=table, masks=masks, model=work, results=results)
