"""Pruning-at-initialization methods (SNIP, GraSP, SynFlow): registered here.

``data`` (the session's) may be a prune_lab data bundle, a ``DataLoader`` (a seeded sample of its dataset) or one
``(inputs, targets)`` batch, used as given. On token data (a causal LM) SNIP and GraSP use the mean next-token loss
(:mod:`prune_lab.core.losses`, ``samples`` = sequences); SynFlow refuses language models
(``SYNFLOW_LM_REASON``, recorded in its registry entry's ``unsupported``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import pai as P
from ..models.hf import vocab_size
from ._data import method_batch
from .registry import MethodSpec, data_kind, hparam, register_method

SNIP_REF = "Lee, Ajanthan, Torr: SNIP, ICLR 2019 (arXiv 1810.02340); SBP in Hayou et al., ICLR 2021 (arXiv 2002.08797)"
GRASP_REF = "Wang, Zhang, Grosse: Picking winning tickets before training by preserving gradient flow, ICLR 2020 " \
            "(arXiv 2002.07376)"
SYNFLOW_REF = "Tanaka, Kunin, Yamins, Ganguli: Pruning neural networks without any data by iteratively conserving " \
              "synaptic flow, NeurIPS 2020 (arXiv 2006.05467)"


def data_batch(data, samples: int, *, method: str | None = None, model=None) -> tuple:
    """``(inputs: (N, ...), targets: (N,))`` from ``data``: an ``(inputs, targets)`` pair is used as given; a bundle,
    dataset or ``DataLoader`` gives a deterministic sample of ``samples`` training examples (token data: ``samples``
    sequences, as ``(input_ids, attention_mask)``). Empty data, or token ids beyond ``model``'s vocabulary, raise a
    ``ValueError`` naming ``method``.

    >>> x, y = data_batch((torch.zeros(3, 4), torch.tensor([0, 1, 1])), 256)
    >>> x.shape
    torch.Size([3, 4])
    """
    return method_batch(data, samples, method=method, model=model)


def _model_inputs(ctx):
    return {n: ctx.weights[n] for n in ctx.weights}


@dataclass(frozen=True)
class SnipHP:
    samples: int = hparam(256, low=1, high=100_000, log=True,
                          help="training examples (token data: sequences) in the scoring batch (an (inputs, targets) "
                               "batch is used whole)")


@dataclass(frozen=True)
class GraspHP:
    samples: int = hparam(256, low=1, high=100_000, log=True,
                          help="training examples (token data: sequences) in the scoring batch (an (inputs, targets) "
                               "batch is used whole)")
    temperature: float = hparam(1.0, low=1e-3, high=1e3, log=True,
                                help="logits are divided by this (Wang et al.'s code uses 200)")


@dataclass(frozen=True)
class SynflowHP:
    rounds: int = hparam(100, low=1, high=1000, log=True, help="pruning rounds on the exponential schedule")
    input_shape: tuple | None = hparam(None, help="shape of one input sample, e.g. (1, 28, 28); taken from the "
                                                  "data when the session has data")

    def __post_init__(self):
        if self.input_shape is not None:  # hashable, validated
            object.__setattr__(self, "input_shape", P.check_input_shape(self.input_shape))


def _snip(ctx, hp):
    x, y = data_batch(ctx.data, hp.samples, method="snip", model=ctx.model)
    scores = P.snip_scores(ctx.model, x, y, weights=_model_inputs(ctx), names=ctx.prunable)
    return {n: s.to(ctx.weights[n].device) for n, s in scores.items()}


def _grasp(ctx, hp):
    x, y = data_batch(ctx.data, hp.samples, method="grasp", model=ctx.model)
    scores = P.grasp_scores(ctx.model, x, y, weights=_model_inputs(ctx), names=ctx.prunable,
                            temperature=hp.temperature)
    return {n: s.to(ctx.weights[n].device) for n, s in scores.items()}


SYNFLOW_LM_REASON = ("SynFlow is not defined for language models: it feeds an all-ones input through the network "
                     "with |w| weights, but a causal LM reads token ids (an embedding lookup, which has no all-ones "
                     "input), and its normalisation layers and softmax attention break the synaptic-flow "
                     "conservation the method rests on")


def _refuse_language_models(ctx) -> None:
    if data_kind(ctx.data) == "tokens" or (ctx.model is not None and vocab_size(ctx.model) is not None):
        raise ValueError(f"method 'synflow': {SYNFLOW_LM_REASON}. Use a data-driven method (wanda, obs_layerwise, "
                         f"snip) or magnitude.")


def _input_shape(ctx, hp) -> tuple:
    _refuse_language_models(ctx)
    if hp.input_shape is not None:
        return tuple(int(d) for d in hp.input_shape)
    if ctx.data is not None:
        x, _ = data_batch(ctx.data, 1, method="synflow")
        return tuple(x.shape[1:])
    raise ValueError("method 'synflow' needs the shape of one input: pass data=... or the hyperparameter "
                     "input_shape=(C, H, W) (e.g. input_shape=(1, 28, 28)).")


def _synflow(ctx, hp):
    # One-shot scores, normalised by R (same order; they give the global allocation its per-layer counts).
    scores = P.synflow_scores(ctx.model, _input_shape(ctx, hp), weights=_model_inputs(ctx), names=ctx.prunable,
                              masks=ctx.start_masks, normalize=True)
    return {n: s.float().to(ctx.weights[n].device) for n, s in scores.items()}


def _synflow_masks(ctx, counts, hp):
    # Under the global allocation Tanaka et al. rescore and threshold globally every round (the per-layer split is
    # SynFlow's own); that needs the engine to say which allocation is in use (``ctx.allocation``) and to count the
    # returned masks. Otherwise every layer follows its own schedule down to exactly its budget.
    scope = "global" if getattr(ctx, "allocation", None) == "global" else "layerwise"
    masks = P.synflow_masks(ctx.model, _input_shape(ctx, hp), {n: int(counts[n]) for n in ctx.prunable},
                            rounds=hp.rounds, scope=scope, weights=_model_inputs(ctx), masks=ctx.start_masks)
    return {n: m.to(ctx.weights[n].device) for n, m in masks.items()}


register_method(MethodSpec(
    "snip", "SNIP (SBP)", SNIP_REF, _snip, "global", needs=frozenset({"data", "gradients"}),
    hyperparameters=SnipHP,
    description="|w · ∂L/∂w| on a batch, at the weights given (usually at initialization); on token data L is the "
                "next-token loss."))
register_method(MethodSpec(
    "grasp", "GraSP", GRASP_REF, _grasp, "global", needs=frozenset({"data", "hessian"}),
    hyperparameters=GraspHP,
    description="w · (H g) by double backprop (keep the highest; Wang et al. prune the highest −w·Hg)."))
register_method(MethodSpec(
    "synflow", "SynFlow", SYNFLOW_REF, _synflow, "global", sparsity_dependent=True, masks=_synflow_masks,
    hyperparameters=SynflowHP, unsupported=(("tokens", SYNFLOW_LM_REASON),),
    description="Data-free |w · ∂R/∂w| with |w| weights and an all-ones input, pruned iteratively over rounds "
                "on an exponential schedule down to each layer's budget."))
