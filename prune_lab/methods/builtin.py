"""The built-in score methods: magnitude, global magnitude, LAMP, lookahead (one-shot and sequential), random."""
from __future__ import annotations

from ..core import scores as S
from .registry import MethodSpec, register_method

LAP_REF = "Park, Lee, Mo, Shin: Lookahead, ICLR 2020 (arXiv 2002.04809)"
LAMP_REF = "Lee, Park, Mo, Ahn, Shin: Layer-adaptive sparsity for magnitude-based pruning, ICLR 2021 (arXiv 2010.07611)"


def _magnitude(ctx, hp):
    return S.magnitude_scores({n: ctx.weights[n] for n in ctx.prunable})


def _lamp(ctx, hp):
    return S.lamp_scores({n: ctx.weights[n] for n in ctx.prunable})


def _lamp_sorted(ctx, hp, orders):
    return {n: S.lamp_sorted_values(ctx.weights[n], orders[n]) for n in ctx.prunable}


def _lap(ctx, hp):
    return S.lap_scores(ctx.weights, ctx.graph, ctx.bn_scales, names=ctx.prunable)


def _random(ctx, hp):
    return S.random_scores({n: ctx.weights[n] for n in ctx.prunable}, seed=ctx.seed)


def _lap_sequential(direction):
    def masks(ctx, counts, hp):
        return S.lap_sequential_masks(ctx.weights, ctx.graph, counts, ctx.bn_scales, direction=direction,
                                      start_masks=ctx.start_masks)

    return masks


register_method(MethodSpec(
    "magnitude", "Magnitude (MP)", "Han et al. 2015; LAP and LAMP baselines", _magnitude, "uniform",
    description="|w|, each layer pruned to the same sparsity."))
register_method(MethodSpec(
    "global_magnitude", "Global magnitude", "Han et al. 2015; LAMP baseline", _magnitude, "global",
    description="|w| with one threshold across all layers."))
register_method(MethodSpec(
    "lamp", "LAMP", LAMP_REF, _lamp, "global", order_of="magnitude", sorted_values=_lamp_sorted,
    keeps_every_layer=True,
    description="w_u² / Σ_{v≥u} w_v² within each layer, one global threshold."))
register_method(MethodSpec(
    "lap", "LAP", LAP_REF, _lap, "uniform", needs=frozenset({"graph"}),
    description="|W_i[j,k]|·‖W_{i−1}[k,:]‖·‖W_{i+1}[:,j]‖: the three-layer Frobenius distortion of removing a weight."))
register_method(MethodSpec(
    "lap_forward", "LAP-forward", LAP_REF, _lap, "uniform", needs=frozenset({"graph"}), sparsity_dependent=True,
    masks=_lap_sequential("forward"),
    description="Sequential LAP, first layer to last, each layer scored with its already-pruned predecessor."))
register_method(MethodSpec(
    "lap_backward", "LAP-backward", LAP_REF, _lap, "uniform", needs=frozenset({"graph"}), sparsity_dependent=True,
    masks=_lap_sequential("backward"),
    description="Sequential LAP, last layer to first, each layer scored with its already-pruned successor."))
register_method(MethodSpec(
    "random", "Random", "baseline", _random, "uniform", stochastic=True,
    description="I.i.d. uniform scores from a seeded generator."))
