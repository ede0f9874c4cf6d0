"""Reproduce the small-scale claims of robust pruning at initialization (Hayou, Ton, Doucet, Teh, ICLR 2021).

A deep narrow ReLU FFNN is initialised in the ordered phase or on the edge of chaos (EOC), pruned at initialization
(SNIP; also GraSP, SynFlow, random and magnitude), optionally rescaled (the rescaling trick), then trained with the
masks enforced. For every point we record the critical sparsity of the method's scores, how many layers the masks
empty, the effective sparsity, and the test accuracy after training. A second experiment prunes a Stable ResNet
(residual branches × 1/√L) and its plain counterpart with SNIP.

    python benchmarks/reproduce_rpi.py            # full run (results in benchmarks/results/rpi.*)
    python benchmarks/reproduce_rpi.py --quick    # seconds; a smoke test of the whole pipeline

Finished points are appended to a JSON-lines cache next to the results: an interrupted run resumes where it
stopped (a point's key holds its whole protocol, so changing the protocol recomputes). Data: the MNIST test-file
split (``--mnist-root``, default ``../shared/data/mnist-t10k`` next to the repository) when present, otherwise the
scikit-learn digits, with a note in the report.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import prune_lab as pl  # noqa: E402
from prune_lab.analysis.collapse import critical_sparsity, effective_sparsity, layer_collapse  # noqa: E402
from prune_lab.core import pai  # noqa: E402
from prune_lab.models import stable  # noqa: E402,F401  (registers stable_resnet / plain_resnet)

METHOD_LABELS = {"snip": "SNIP", "grasp": "GraSP", "synflow": "SynFlow", "random": "Random",
                 "global_magnitude": "Magnitude", "dense": "Dense"}
from prune_lab.viz import color  # noqa: E402  (the library's one palette, shared by every figure)

#: methods in their library colours, the dense lines black (the two ResNets: SNIP's colour, two line styles)
COLORS = {**{m: color(m) for m in ("snip", "grasp", "synflow", "random", "global_magnitude")}, "dense": "#000000"}
# ReLU: EOC (σ_w, σ_b) = (√2, 0). Ordered phase: σ_w < √2 with σ_b > 0: the forward variance settles at a fixed
# point while gradients shrink by σ_w²/2 per layer (with σ_b = 0 forward and backward shrink alike and SNIP's
# per-layer score scale stays flat).
INIT_SIGMA = {"eoc": (2 ** 0.5, 0.0), "ordered": (1.0, 0.2)}

FULL = dict(depth=20, width=100, epochs=3, seeds=(0, 1, 2), sparsities=(0.9, 0.95, 0.98), synflow_rounds=100,
            others_sparsities=(0.9, 0.98), resnet_depth=32, resnet_width=8, resnet_epochs=10,
            resnet_sparsities=(0.9, 0.95, 0.98), lr=1e-3, batch_size=128, samples=256)
QUICK = dict(depth=6, width=24, epochs=1, seeds=(0,), sparsities=(0.9,), synflow_rounds=5, others_sparsities=(0.9,),
             resnet_depth=8, resnet_width=4, resnet_epochs=1, resnet_sparsities=(0.9,), lr=1e-3, batch_size=128,
             samples=64)


# ---------------------------------------------------------------------------------------------------------------
def load_data(mnist_root: str | None, quick: bool):
    """(bundle, note). The product never reads shared paths; this script may, and falls back to digits."""
    if not quick:
        root = Path(mnist_root) if mnist_root else ROOT.parent / "shared" / "data" / "mnist-t10k"
        if root.exists():
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                bundle = pl.data.mnist(str(root))
            return bundle, f"MNIST official test files split {len(bundle.train)}/{len(bundle.test)} (seed 0)"
        note = f"MNIST files not found at {root}: scikit-learn digits (8x8) used instead"
    else:
        note = "quick mode: scikit-learn digits (8x8)"
    bundle = pl.data.digits()
    return bundle, f"{note}; split {len(bundle.train)}/{len(bundle.test)}"


class Cache:
    """Finished points, one JSON object per line; ``key`` identifies a point with its whole protocol."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.rows[row["key"]] = row

    def __contains__(self, key):
        return key in self.rows

    def add(self, row: dict):
        self.rows[row["key"]] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def point_key(point: dict, proto: dict) -> str:
    blob = json.dumps({"point": point, "proto": proto}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------------------------------------------
def ffnn_points(cfg) -> list:
    """Every FFNN point: SNIP over init × rescale × sparsity; the other methods at EOC with and without rescaling;
    dense baselines."""
    pts = []
    for seed in cfg["seeds"]:
        for init in ("ordered", "eoc"):
            pts.append(dict(experiment="ffnn", method="dense", init=init, rescale=False, sparsity=0.0, seed=seed))
            for s in cfg["sparsities"]:
                for rescale in (False, True):
                    pts.append(dict(experiment="ffnn", method="snip", init=init, rescale=rescale, sparsity=s,
                                    seed=seed))
        for method in ("grasp", "synflow", "random", "global_magnitude"):
            for s in cfg["others_sparsities"]:
                for rescale in (False, True):
                    pts.append(dict(experiment="ffnn", method=method, init="eoc", rescale=rescale, sparsity=s,
                                    seed=seed))
    return pts


def collapse_points(cfg) -> list:
    """Scores only (no training): critical sparsity, collapsed layers and effective sparsity of every method at
    both inits."""
    return [dict(experiment="collapse", method=m, init=init, rescale=False, sparsity=s, seed=seed)
            for seed in cfg["seeds"] for init in ("ordered", "eoc")
            for m in ("snip", "grasp", "synflow", "random", "global_magnitude") for s in cfg["sparsities"]]


def resnet_points(cfg) -> list:
    return [dict(experiment="resnet", method="snip", model=model, init="eoc", rescale=False, sparsity=s, seed=seed)
            for seed in cfg["seeds"] for model in ("stable_resnet", "plain_resnet")
            for s in cfg["resnet_sparsities"]]


def _ffnn(cfg, bundle, init, seed):
    shape = bundle.input_shape
    net = pl.models.create("ffnn", depth=cfg["depth"], width=cfg["width"], in_features=int(np.prod(shape)),
                           num_classes=bundle.num_classes)
    if init == "eoc":
        pai.eoc_init_(net, seed=seed)
    else:
        pai.ordered_init_(net, *INIT_SIGMA["ordered"], seed=seed)
    return net


def _masks_and_scores(method, net, session, sparsity, cfg, bundle, seed):
    """(masks, scores used for the critical sparsity)."""
    if method == "synflow":
        # Tanaka et al.'s global iterative SynFlow: global threshold each round; s_cr of the one-shot scores.
        ranking = session.ranking("synflow", rounds=cfg["synflow_rounds"])  # one-shot scores: a split of the total
        k = int(sparsity * ranking.total + 0.5)
        counts = dict(zip(ranking.names, (int(c) for c in ranking.global_counts(k))))
        masks = pai.synflow_masks(net, bundle.input_shape, counts, rounds=cfg["synflow_rounds"], scope="global")
        scores = session.scores("synflow", rounds=cfg["synflow_rounds"])
        return masks, scores
    hp = {"samples": cfg["samples"]} if method in ("snip", "grasp") else {}
    seed_kw = {"seed": seed} if method == "random" else {}
    res = session.prune(method, sparsity, **hp, **seed_kw)
    return res.masks, session.scores(method, **hp, **seed_kw)


def run_ffnn_point(pt, cfg, bundle, models_cache):
    key = (pt["init"], pt["seed"])
    if key not in models_cache:
        net = _ffnn(cfg, bundle, pt["init"], pt["seed"])
        models_cache.clear()
        models_cache[key] = (net, pl.PruneSession(net, bundle, device="cpu"))
    net, session = models_cache[key]
    sigma_w2 = INIT_SIGMA[pt["init"]][0] ** 2
    t0 = time.perf_counter()
    if pt["method"] == "dense":
        masks, s_cr, collapsed, eff = None, float("nan"), 0, 0.0
    else:
        masks, scores = _masks_and_scores(pt["method"], net, session, pt["sparsity"], cfg, bundle, pt["seed"])
        s_cr = critical_sparsity(scores)
        collapsed = len(layer_collapse(masks))
        eff = effective_sparsity(net, masks)
    if pt["experiment"] == "collapse":
        return dict(critical_sparsity=s_cr, collapsed_layers=collapsed, n_layers=cfg["depth"] + 1,
                    effective_sparsity=eff, accuracy=float("nan"), loss=float("nan"),
                    seconds=time.perf_counter() - t0)
    model = copy.deepcopy(net)
    if masks is not None and pt["rescale"]:
        pai.rescale_(model, masks, sigma_w2=sigma_w2)
    pl.train(model, bundle, epochs=cfg["epochs"], lr=cfg["lr"], batch_size=cfg["batch_size"], masks=masks,
             seed=pt["seed"], device="cpu", progress=False)
    ev = pl.evaluate(model, bundle, masks=masks)
    return dict(critical_sparsity=s_cr, collapsed_layers=collapsed, n_layers=cfg["depth"] + 1,
                effective_sparsity=eff, accuracy=ev["accuracy"], loss=ev["loss"],
                seconds=time.perf_counter() - t0)


def run_resnet_point(pt, cfg, bundle):
    shape = bundle.input_shape
    net = pl.models.create(pt["model"], depth=cfg["resnet_depth"], width=cfg["resnet_width"], in_channels=shape[0],
                           num_classes=bundle.num_classes, seed=pt["seed"])
    t0 = time.perf_counter()
    session = pl.PruneSession(net, bundle, device="cpu")
    res = session.prune("snip", pt["sparsity"], samples=cfg["samples"])
    s_cr = critical_sparsity(session.scores("snip", samples=cfg["samples"]))
    model = copy.deepcopy(net)
    pl.train(model, bundle, epochs=cfg["resnet_epochs"], lr=cfg["lr"], batch_size=cfg["batch_size"],
             masks=res.masks, seed=pt["seed"], device="cpu", progress=False)
    ev = pl.evaluate(model, bundle, masks=res.masks)
    return dict(critical_sparsity=s_cr, collapsed_layers=len(layer_collapse(res)), n_layers=len(res.layers),
                effective_sparsity=effective_sparsity(net, res.masks), accuracy=ev["accuracy"], loss=ev["loss"],
                seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------------------
def summarise(df: pd.DataFrame) -> pd.DataFrame:
    keys = ["experiment", "model", "method", "init", "rescale", "sparsity"]
    g = df.fillna({"model": "ffnn"}).groupby(keys, dropna=False)
    out = g.agg(acc_mean=("accuracy", "mean"), acc_std=("accuracy", "std"), acc_min=("accuracy", "min"),
                acc_max=("accuracy", "max"), s_cr=("critical_sparsity", "mean"),
                s_cr_std=("critical_sparsity", "std"), collapsed=("collapsed_layers", "mean"),
                collapsed_max=("collapsed_layers", "max"), eff=("effective_sparsity", "mean"),
                seeds=("seed", "count"))
    return out.reset_index()


def _fmt_acc(r) -> str:
    if np.isnan(r.acc_mean):
        return "—"
    return f"{100 * r.acc_mean:.1f} ± {100 * (0 if np.isnan(r.acc_std) else r.acc_std):.1f}"


def verdicts(summary: pd.DataFrame, chance: float) -> list:
    """Claims of the paper checked against the measured summary: (claim, our numbers, verdict)."""
    snip = summary[(summary.experiment == "ffnn") & (summary.method == "snip")]
    out = []
    ordered = snip[snip.init == "ordered"]
    if len(ordered):
        near_chance = (ordered.acc_mean < chance + 0.1).all()
        coll = (ordered.collapsed > 0).any()
        nums = "; ".join(f"s={r.sparsity:g}{' +rescale' if r.rescale else ''}: acc {_fmt_acc(r)} %, "
                         f"collapsed {r.collapsed:.1f}, s_cr {r.s_cr:.3f}" for r in ordered.itertuples())
        v = "confirmed" if near_chance and coll else ("partly confirmed" if near_chance or coll else "not confirmed")
        out.append(("Ordered-phase init + SNIP collapses layers and trains to chance", nums, v))
    eoc_r = snip[(snip.init == "eoc") & snip.rescale]
    if len(eoc_r):
        trains = eoc_r.acc_mean > chance + 0.5
        nums = "; ".join(f"s={r.sparsity:g}: acc {_fmt_acc(r)} %, collapsed {r.collapsed:.1f}"
                         for r in eoc_r.itertuples())
        v = "confirmed" if trains.all() else ("partly confirmed" if trains.any() else "not confirmed")
        out.append(("EOC init + SNIP + rescaling trains", nums, v))
    eoc = snip[(snip.init == "eoc") & ~snip.rescale]
    if len(eoc) and len(eoc_r):
        m = eoc.set_index("sparsity").acc_mean
        mr = eoc_r.set_index("sparsity").acc_mean
        gain = [(s, mr[s] - m[s]) for s in m.index if s in mr.index]
        nums = "; ".join(f"s={s:g}: {100 * m[s]:.1f} → {100 * mr[s]:.1f} %" for s, _ in gain)
        v = "confirmed" if all(d > 0.02 for _, d in gain) else (
            "partly confirmed" if any(d > 0.02 for _, d in gain) else "not confirmed")
        out.append(("Rescaling helps EOC-initialised SNIP (without it accuracy drops)", nums, v))
    res = summary[summary.experiment == "resnet"]
    if len(res):
        st_ = res[res.model == "stable_resnet"].set_index("sparsity")
        pn = res[res.model == "plain_resnet"].set_index("sparsity")
        common = [s for s in st_.index if s in pn.index]
        nums = "; ".join(f"s={s:g}: stable {100 * st_.acc_mean[s]:.1f} % (s_cr {st_.s_cr[s]:.3f}) vs plain "
                         f"{100 * pn.acc_mean[s]:.1f} % (s_cr {pn.s_cr[s]:.3f})" for s in common)
        better = [st_.acc_mean[s] > pn.acc_mean[s] + 0.01 for s in common]
        v = "confirmed" if all(better) else ("partly confirmed" if any(better) else "not confirmed")
        out.append(("SNIP on a Stable ResNet (branches × 1/√L) beats the plain ResNet", nums, v))
    return out


#: the four FFNN set-ups: (line style, marker, name in the legend) by (init, rescaled)
SETUPS = {("eoc", True): ("-", "o", "EOC + rescaling"), ("eoc", False): ("--", "s", "EOC"),
          ("ordered", True): (":", "^", "ordered + rescaling"), ("ordered", False): ("-.", "v", "ordered")}
INIT_NAMES = {"eoc": "EOC", "ordered": "ordered"}


def figure(summary: pd.DataFrame):
    """Three panels: FFNN accuracy vs sparsity (colour = method, line style and marker = init and rescaling, the
    dense networks as black lines), the critical sparsity of each method's scores, SNIP on the Stable vs plain
    ResNet. Library colours and display names; every legend below its panel, outside the data. Returns the
    figure."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from prune_lab.viz.plots import PlotFigure, method_label, paper_style

    def ordered(names):  # this script's method order, then any other name
        names = set(names)
        return [m for m in METHOD_LABELS if m in names] + sorted(names - set(METHOD_LABELS))

    below = dict(loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)  # under the x-axis label
    with paper_style():
        fig = PlotFigure(figsize=(15, 5.6), layout="constrained")
        ax1, ax2, ax3 = fig.subplots(1, 3)
        ff = summary[(summary.experiment == "ffnn") & (summary.method != "dense")]
        methods = ordered(ff.method)
        for (method, init, rescale), grp in ff.groupby(["method", "init", "rescale"]):
            ls, mk, _ = SETUPS[(init, bool(rescale))]
            grp = grp.sort_values("sparsity")
            c = color(method)
            bars = ax1.errorbar(100 * grp.sparsity, 100 * grp.acc_mean, yerr=100 * grp.acc_std.fillna(0), color=c,
                                ls=ls, marker=mk, ms=5, mfc="none", mec=c, mew=1.1, lw=1.4, capsize=3,
                                elinewidth=0.9)
            for b in bars[2]:
                b.set_alpha(0.6)
        dense = summary[(summary.experiment == "ffnn") & (summary.method == "dense")]
        for r in dense.itertuples():
            ax1.axhline(100 * r.acc_mean, color=COLORS["dense"], lw=1.0, ls="-" if r.init == "eoc" else "-.")
        ax1.set_xlabel("sparsity (% of weights removed)")
        ax1.set_ylabel("test accuracy after training (%)")
        ax1.set_ylim(0, 100)
        ax1.set_title("Deep ReLU FFNN, pruned at init")
        used = set(zip(ff.init, ff.rescale.astype(bool)))
        method_handles = [Line2D([], [], color=color(m), lw=2.5, label=method_label(m)) for m in methods]
        setup_handles = [Line2D([], [], color="0.45", ls=ls, marker=mk, mfc="none", lw=1.4, label=name)
                         for key, (ls, mk, name) in SETUPS.items() if key in used]
        dense_handles = [Line2D([], [], color=COLORS["dense"], lw=1.0, ls="-" if r.init == "eoc" else "-.",
                                label=f"dense network, {INIT_NAMES.get(r.init, r.init)}") for r in dense.itertuples()]
        # two legends side by side under the panel: colour = method, line style = init (and the dense lines)
        ax1.add_artist(ax1.legend(handles=method_handles, title="method", loc="upper right",
                                  bbox_to_anchor=(0.48, -0.2), frameon=False))
        ax1.legend(handles=setup_handles + dense_handles, title="initialization", loc="upper left",
                   bbox_to_anchor=(0.52, -0.2), frameon=False)

        col = summary[summary.experiment == "collapse"]
        crit = (col if len(col) else ff).groupby(["method", "init"]).s_cr.mean()
        crit_methods = ordered(crit.index.get_level_values("method"))
        inits = [i for i in INIT_NAMES if i in set(crit.index.get_level_values("init"))]
        width = 0.8 / max(len(inits), 1)
        for j, init in enumerate(inits):
            xs = [k + (j - (len(inits) - 1) / 2) * width for k, m in enumerate(crit_methods) if (m, init) in crit]
            ms = [m for m in crit_methods if (m, init) in crit]
            ax2.bar(xs, [100 * crit[(m, init)] for m in ms], width * 0.92, color=[color(m) for m in ms],
                    edgecolor="black", linewidth=0.8, hatch="//" if init == "ordered" else None)
        ax2.set_xticks(range(len(crit_methods)), [method_label(m).replace(" ", "\n") for m in crit_methods])
        ax2.set_xlabel("method")
        ax2.set_ylabel("critical sparsity of the scores (%)")
        ax2.set_ylim(min(80.0, float(100 * crit.min()) - 2), 100)
        ax2.set_xlim(-0.6, len(crit_methods) - 0.4)
        ax2.grid(False, axis="x")
        ax2.set_title("Critical sparsity at initialization")
        ax2.legend(handles=[Patch(facecolor="white", edgecolor="black", label="EOC"),
                            Patch(facecolor="white", edgecolor="black", hatch="//", label="ordered")],
                   title="initialization", ncol=2, **below)

        res = summary[summary.experiment == "resnet"]
        snip = color("snip")
        model_styles = {"stable_resnet": ("-", "o", "Stable ResNet (branches × 1/√L)"),
                        "plain_resnet": ("--", "s", "plain ResNet")}
        models = set(res.model)
        for model in [m for m in model_styles if m in models] + sorted(models - set(model_styles)):
            ls, mk, name = model_styles.get(model, (":", "^", str(model).replace("_", " ")))
            grp = res[res.model == model].sort_values("sparsity")
            ax3.errorbar(100 * grp.sparsity, 100 * grp.acc_mean, yerr=100 * grp.acc_std.fillna(0), color=snip, ls=ls,
                         marker=mk, ms=5, mfc="none", mec=snip, mew=1.1, lw=1.4, capsize=3, elinewidth=0.9,
                         label=name)
        ax3.set_xlabel("sparsity (% of weights removed)")
        ax3.set_ylabel("test accuracy after training (%)")
        ax3.set_title(f"{method_label('snip')} on Stable vs plain ResNet")
        if len(res):
            ax3.legend(title="model", **below)
        # the legends hang from the axes, which the layout then moves: one layout pass now, so that the first
        # drawing (the saved image) already has room for them
        fig.draw_without_rendering()
    return fig


def report(df, summary, cfg, note, chance, quick, elapsed) -> str:
    lines = ["# Robust pruning at initialization (Hayou et al., ICLR 2021): small-scale reproduction", ""]
    if quick:
        lines += ["**Quick mode** (pipeline smoke test): numbers below mean nothing.", ""]
    lines += [f"Data: {note}. Chance accuracy ≈ {100 * chance:.0f} %.", "",
              f"FFNN: `ffnn(depth={cfg['depth']}, width={cfg['width']})` ReLU ({cfg['depth'] + 1} linear layers, "
              f"zero biases); ordered init (σ_w, σ_b) = {INIT_SIGMA['ordered']}, EOC (√2, 0) (W ~ N(0, σ_w²/fan_in), b ~ N(0, σ_b²)). "
              f"Pruning at init with the global allocation (random: uniform), SNIP/GraSP on {cfg['samples']} "
              f"training images, SynFlow {cfg['synflow_rounds']} rounds (global, iterative). Rescaling: "
              f"`rescale_(model, masks, σ_w²)` with the init's σ_w². Training: Adam lr {cfg['lr']:g}, batch "
              f"{cfg['batch_size']}, {cfg['epochs']} epochs, masks enforced; seeds {list(cfg['seeds'])}.",
              "",
              f"ResNet: `stable_resnet` / `plain_resnet` depth {cfg['resnet_depth']} width {cfg['resnet_width']} "
              f"(BatchNorm, N(0, 2/fan_in) init), SNIP (global), {cfg['resnet_epochs']} epochs Adam lr {cfg['lr']:g} "
              f"on scikit-learn digits (8x8, 1,347/450 split).", "", f"Wall time of the points (sum over points, including "
              f"cached ones): {df.seconds.sum() / 60:.1f} min; this invocation: {elapsed / 60:.1f} min.", "", "## Claims vs our numbers", "", "| claim (paper) | ours (mean ± std over seeds) | verdict |",
              "|---|---|---|"]
    for claim, nums, v in verdicts(summary, chance):
        lines.append(f"| {claim} | {nums} | **{v}** |")
    ff = summary[(summary.experiment == "ffnn") & (summary.init == "eoc") & (summary.method != "dense")]
    if len(ff):
        lines += ["", "## Effect of the rescaling trick (EOC init, test accuracy %)", "",
                  "| method | sparsity | without rescaling | with rescaling | change (points) |", "|---|---|---|---|---|"]
        for (method, sp), grp in ff.groupby(["method", "sparsity"]):
            by = {bool(r.rescale): r for r in grp.itertuples()}
            if True in by and False in by:
                a, b = by[False].acc_mean, by[True].acc_mean
                lines.append(f"| {METHOD_LABELS[method]} | {sp:g} | {_fmt_acc(by[False])} | {_fmt_acc(by[True])} | "
                             f"{100 * (b - a):+.1f} |")
    lines += ["", "## All points (mean over seeds)", "",
              "| experiment | model | method | init | rescale | sparsity | test acc % | s_cr | collapsed layers "
              "(mean / max) | effective sparsity | seeds |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        lines.append(f"| {r.experiment} | {r.model} | {METHOD_LABELS.get(r.method, r.method)} | {r.init} | "
                     f"{'yes' if r.rescale else 'no'} | {r.sparsity:g} | {_fmt_acc(r)} | "
                     f"{'' if np.isnan(r.s_cr) else f'{r.s_cr:.4f}'} | {r.collapsed:.1f} / {r.collapsed_max:.0f} | "
                     f"{r.eff:.4f} | {r.seeds} |")
    dense = summary[(summary.experiment == "ffnn") & (summary.method == "dense")]
    dense_txt = ", ".join(f"{r.init} {_fmt_acc(r)} %" for r in dense.itertuples())
    lines += ["", "## Deviations from the paper's protocol", "",
              "- Scale: the paper trains deeper/wider FFNNs on full MNIST and CIFAR-10 for many epochs; here "
              f"depth {cfg['depth']}, width {cfg['width']}, {cfg['epochs']} epochs on a 8,000-image training "
              "split of the MNIST test files (CPU budget of about 20 minutes on 2 shared cores). Training is short: "
              f"the dense networks reach {dense_txt}; pruned deep narrow networks learn more slowly, so low "
              "accuracies here mean 'not trained after this budget' as much as 'untrainable'.",
              "- Optimiser: Adam (lr 1e-3) for every run instead of the paper's SGD schedules; Adam rescales "
              "gradients per weight and so can partly train networks whose gradients vanish, which makes the "
              "ordered phase look less hopeless than under SGD.",
              f"- Ordered phase: (σ_w, σ_b) = {INIT_SIGMA['ordered']} (our choice; with σ_b = 0 a ReLU net's forward "
              "signal and gradients shrink alike and SNIP's scores stay balanced across layers).",
              "- SNIP scores use one batch; SynFlow's critical sparsity is that of its one-shot scores (the masks come "
              "from the iterative global procedure).",
              "- Stable vs plain ResNet: small CIFAR-style ResNets with BatchNorm on the same small images, not "
              "ResNet-32/50/104 on CIFAR-10/100 and Tiny ImageNet.",
              "", "Figure: `rpi.png`; raw rows: `rpi.csv`; resumable cache: `rpi_cache.jsonl`."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    """Run the reproduction (see the module docstring); the process's denormal setting is restored afterwards."""
    try:
        return _main(argv)
    finally:
        torch.set_flush_denormal(False)  # the default: leave no global processor state behind


def _main(argv=None):
    from tqdm.auto import tqdm

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny settings, seconds (a smoke test)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results, quick: "
                                                "benchmarks/results/rpi_quick)")
    ap.add_argument("--mnist-root", default=None, help="folder with the MNIST IDX files")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest for these small nets on a shared machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    # Ordered-phase nets carry tiny activations and gradients: denormal floats make the CPU ~100x slower (Adam's
    # sqrt of squared gradients above all). Flushing them to zero changes nothing measurable here.
    torch.set_flush_denormal(True)
    cfg = dict(QUICK if args.quick else FULL)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / ("rpi_quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    bundle, note = load_data(args.mnist_root, args.quick)
    digits = pl.data.digits()  # the ResNet experiment: small images, small scale
    chance = 1.0 / bundle.num_classes
    proto = {k: v for k, v in cfg.items()} | {"data": pl.data.data_identity(bundle),
                                               "resnet_data": pl.data.data_identity(digits)}
    cache = Cache(out / "rpi_cache.jsonl")
    points = sorted(collapse_points(cfg) + ffnn_points(cfg), key=lambda p: (p["seed"], p["init"])) + \
        resnet_points(cfg)
    todo = [p for p in points if point_key(p, proto) not in cache]
    t0 = time.perf_counter()
    models_cache: dict = {}
    bar = tqdm(todo, desc="rpi points", unit="pt")
    for pt in bar:
        bar.set_postfix_str(f"{pt['experiment']} {pt['method']} {pt['init']} s={pt['sparsity']:g}", refresh=False)
        row = run_resnet_point(pt, cfg, digits) if pt["experiment"] == "resnet" else \
            run_ffnn_point(pt, cfg, bundle, models_cache)
        cache.add({"key": point_key(pt, proto), **pt, **row})
    elapsed = time.perf_counter() - t0
    rows = [cache.rows[point_key(p, proto)] for p in points]
    df = pd.DataFrame(rows).drop(columns=["key"])
    if "model" not in df:
        df["model"] = None
    df.to_csv(out / "rpi.csv", index=False)
    summary = summarise(df)
    (out / "rpi.md").write_text(report(df, summary, cfg, note, chance, args.quick, elapsed))
    fig = figure(summary)
    fig.savefig(out / "rpi.png", dpi=120)
    print(f"wrote {out / 'rpi.csv'}, {out / 'rpi.md'}, {out / 'rpi.png'} ({len(todo)} new points, "
          f"{elapsed:.0f} s)")
    return df, summary


if __name__ == "__main__":
    main()
