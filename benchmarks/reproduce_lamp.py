"""Reproduce LAMP's iterative-pruning comparison (Lee, Park, Mo, Ahn, Shin, *Layer-adaptive sparsity for the
magnitude-based pruning*, ICLR 2021, arXiv 2010.07611) at CPU scale.

Conv-6 (conv64-64-128-128-256-256 + fc256-256-10, VGG-like, no BatchNorm) adapted to the 8×8 scikit-learn digits
(``in_channels=1, input_size=8``). Iterative magnitude pruning with LAMP's protocol: each round removes 20 % of the
surviving weights, then retrains with AdamW (lr 3e-4, batch 100), for 20 rounds (down to 1.15 % remaining). Magnitude
scores with five layerwise allocations: global (= global MP), uniform, uniform_plus (Gale et al.), erk and lamp
(= LAMP). For every round we record the test accuracy, the per-layer sparsity and the collapsed (fully pruned)
layers.

    python benchmarks/reproduce_lamp.py            # full run: 3 seeds × 5 allocations × 20 rounds (≈ 10 min)
    python benchmarks/reproduce_lamp.py --quick    # seconds: 1 seed, 2 rounds (rate 0.5), few steps

Every finished (seed, allocation) trajectory is appended at once to ``<out>/lamp_conv6[_quick]_points.csv`` (one row
per round, keyed by the run's settings): an interrupted run resumes where it stopped. At the end the script writes
``lamp_conv6[_quick].csv`` (mean ± std of accuracy per allocation and round, with collapsed-layer counts),
``lamp_conv6[_quick]_layers.csv`` (per-layer sparsity at the last round), ``.md``, ``.json`` and two figures:
``.png`` (accuracy vs remaining weights) and ``_layers.png`` (layerwise sparsity at the last round).

Allocation colours: the library's palette (``prune_lab.viz.color``), the same as in every prune_lab figure.
"""
from __future__ import annotations

import sys
import csv
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

import prune_lab as pl
from prune_lab.analysis.collapse import layer_collapse
from prune_lab.engine.iterative import iterative_prune

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared points cache, beside this script
from _points import points_key, read_points, results_folder, script_parser, write_table  # noqa: E402

ALLOCATIONS = ("global", "uniform", "uniform_plus", "erk", "lamp")
LABELS = {"global": "Global MP", "uniform": "Uniform", "uniform_plus": "Uniform+", "erk": "ERK", "lamp": "LAMP"}
from prune_lab.viz import color  # noqa: E402  (the library's one palette, shared by every figure)

FIELDS = ["key", "seed", "allocation", "round", "remaining_pct", "accuracy", "loss", "n_collapsed", "collapsed",
          "layer_sparsity", "seconds"]


def settings(args) -> dict:
    return dict(quick=args.quick, model="conv6(in_channels=1,input_size=8)", data="digits",
                pretrain_steps=args.pretrain_steps, rounds=args.rounds, rate=args.rate,
                finetune_steps=args.finetune_steps, optimizer="adamw", lr=3e-4, batch_size=100, score="magnitude")


def load_points(path: Path, key: str) -> dict:
    """{(seed, allocation): [rows by round]} for complete trajectories of this key."""
    done: dict = {}
    for row in read_points(path, key):
        done.setdefault((int(row["seed"]), row["allocation"]), []).append(row)
    return done


def run(args) -> dict:
    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    out, stem, points_path = results_folder(args, "lamp_conv6")
    cfg = settings(args)
    key = points_key(cfg)
    done = {} if args.fresh else load_points(points_path, key)
    done = {k: v for k, v in done.items() if len(v) == args.rounds + 1}  # complete trajectories only
    data = pl.data.digits()
    train_kw = dict(optimizer="adamw", lr=3e-4, batch_size=100)
    todo = [(s, a) for s in args.seeds for a in args.allocations]
    new_file = args.fresh or not points_path.is_file()
    computed = 0
    with open(points_path, "w" if args.fresh else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        bar = tqdm(total=len(todo) * args.rounds, desc="LAMP reproduction", unit="round",
                   initial=args.rounds * sum(t in done for t in todo))
        for seed in args.seeds:
            if all((seed, a) in done for a in args.allocations):
                continue
            net = pl.models.create_for("conv6", tuple(data.input_shape), data.num_classes, seed=seed)
            pl.train(net, data, steps=args.pretrain_steps, seed=seed, progress=False, **train_kw)
            net.eval()
            for alloc in args.allocations:
                if (seed, alloc) in done:
                    continue
                t0 = time.perf_counter()
                res = iterative_prune(net, data, "magnitude", rounds=args.rounds, rate=args.rate,
                                      finetune_steps=args.finetune_steps, allocation=alloc, seed=seed,
                                      progress=False, **train_kw)
                secs = time.perf_counter() - t0
                rows = []
                for _, t in res.table.iterrows():
                    r = int(t["round"])
                    if r == 0:
                        coll, lsp = [], {}
                    else:
                        pr = res.results[r - 1]
                        coll, lsp = layer_collapse(pr.masks), {n: float(v) for n, v in pr.layer_sparsity.items()}
                    rows.append(dict(key=key, seed=seed, allocation=alloc, round=r,
                                     remaining_pct=100 * (1 - float(t["sparsity"])), accuracy=float(t["accuracy"]),
                                     loss=float(t["loss"]), n_collapsed=len(coll), collapsed=json.dumps(coll),
                                     layer_sparsity=json.dumps(lsp), seconds=secs))
                writer.writerows(rows)
                f.flush()
                done[(seed, alloc)] = [{k: str(v) for k, v in row.items()} for row in rows]
                computed += 1
                bar.set_postfix(seed=seed, allocation=alloc, acc=f"{rows[-1]['accuracy']:.3f}", refresh=False)
                bar.update(args.rounds)
        bar.close()
    done = {t: done[t] for t in todo if t in done}
    summary = summarise(out, stem, cfg, args, done)
    summary["computed_trajectories"] = computed
    return summary


# ------------------------------------------------------------------------------------------------ reporting
def summarise(out: Path, stem: str, cfg: dict, args, done: dict) -> dict:
    table = []
    for a in args.allocations:
        for r in range(args.rounds + 1):
            sel = [row for (s, aa), rows in done.items() if aa == a for row in rows if int(row["round"]) == r]
            if not sel:
                continue
            acc = np.array([float(x["accuracy"]) for x in sel]) * 100
            nc = np.array([int(x["n_collapsed"]) for x in sel])
            dens = [100 * (1 - max(json.loads(x["layer_sparsity"]).values(), default=0.0)) for x in sel]
            table.append(dict(allocation=a, label=LABELS[a], round=r,
                              remaining_pct=float(np.mean([float(x["remaining_pct"]) for x in sel])),
                              n_seeds=len(sel), accuracy_mean=float(acc.mean()),
                              accuracy_std=float(acc.std(ddof=1)) if len(sel) > 1 else 0.0,
                              n_collapsed_mean=float(nc.mean()), n_collapsed_max=int(nc.max()),
                              seeds_with_collapse=int((nc > 0).sum()),
                              min_layer_density_pct=float(np.mean(dens))))
    write_table(out / f"{stem}.csv", table)
    # per-layer sparsity at the last round, mean over seeds
    layers = []
    for a in args.allocations:
        sel = [json.loads(row["layer_sparsity"]) for (s, aa), rows in done.items() if aa == a
               for row in rows if int(row["round"]) == args.rounds]
        if not sel:
            continue
        for name in sel[0]:
            v = np.array([d[name] for d in sel])
            layers.append(dict(allocation=a, label=LABELS[a], layer=name, round=args.rounds,
                               sparsity_mean=float(v.mean()), sparsity_min=float(v.min()),
                               sparsity_max=float(v.max()), n_seeds=len(sel)))
    write_table(out / f"{stem}_layers.csv", layers)
    sizes = {n: int(p.numel()) for n, p in
             pl.models.create("conv6", in_channels=1, input_size=8).named_parameters() if n.endswith("weight")}
    cell = {(t["allocation"], t["round"]): t for t in table}
    summary = dict(settings=cfg, seeds=list(args.seeds), table=table, layers=layers, layer_sizes=sizes,
                   verdict=claim_verdict(cell, args), seconds_per_trajectory=float(np.mean(
                       [float(rows[0]["seconds"]) for rows in done.values()])),
                   machine=dict(python=platform.python_version(), torch=torch.__version__,
                                threads=torch.get_num_threads(), cpu_count=os.cpu_count()))
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    write_markdown(out / f"{stem}.md", summary, args)
    plot(summary, out / f"{stem}.png", args)
    plot_layers(summary, out / f"{stem}_layers.png")
    return summary


def claim_verdict(cell: dict, args) -> dict:
    """(a) LAMP best or tied (within the larger std) at the last rounds (≤ 2 % remaining); (b) global MP collapses."""
    extreme = [r for r in range(1, args.rounds + 1) if ("lamp", r) in cell and cell[("lamp", r)]["remaining_pct"] <= 2.0]
    if not extreme:
        extreme = [args.rounds]
    best_or_tied = []
    for r in extreme:
        lamp = cell[("lamp", r)]
        others = [cell[(a, r)] for a in args.allocations if a != "lamp" and (a, r) in cell]
        best = max(others, key=lambda t: t["accuracy_mean"]) if others else None
        tied = best is None or lamp["accuracy_mean"] >= best["accuracy_mean"] - max(lamp["accuracy_std"],
                                                                                    best["accuracy_std"])
        best_or_tied.append(dict(round=r, remaining_pct=lamp["remaining_pct"], lamp=lamp["accuracy_mean"],
                                 lamp_std=lamp["accuracy_std"], best_other=best["allocation"] if best else None,
                                 best_other_acc=best["accuracy_mean"] if best else None,
                                 best_other_std=best["accuracy_std"] if best else None, best_or_tied=bool(tied)))
    n_ok = sum(x["best_or_tied"] for x in best_or_tied)
    n_best = sum(x["best_other_acc"] is None or x["lamp"] >= x["best_other_acc"] for x in best_or_tied)
    v_a = "holds" if n_ok == len(best_or_tied) else ("partly" if n_ok else "does not")
    coll = {a: next((cell[(a, r)]["remaining_pct"] for r in range(1, args.rounds + 1)
                     if (a, r) in cell and cell[(a, r)]["n_collapsed_max"] > 0), None) for a in args.allocations}
    last = {a: cell[(a, args.rounds)]["n_collapsed_mean"] for a in args.allocations if (a, args.rounds) in cell}
    g = coll.get("global")
    others_collapse = [a for a in args.allocations if a != "global" and coll.get(a) is not None]
    v_b = "holds" if g is not None and not others_collapse else ("partly" if g is not None else "does not")
    return dict(lamp_best_or_tied=dict(verdict=v_a, points=best_or_tied, best_in_mean=n_best),
                global_collapse=dict(verdict=v_b, first_collapse_remaining_pct=coll,
                                     collapsed_layers_at_last_round_mean=last))


def write_markdown(path: Path, s: dict, args):
    cfg = s["settings"]
    cell = {(t["allocation"], t["round"]): t for t in s["table"]}
    show = sorted({r for r in (0, args.rounds // 2, args.rounds - 3, args.rounds - 2, args.rounds - 1, args.rounds)
                   if 0 <= r <= args.rounds})
    rem = {r: np.mean([cell[(a, r)]["remaining_pct"] for a in args.allocations if (a, r) in cell]) for r in show}
    lines = [f"# LAMP reproduction: Conv-6 on 8×8 digits{' (quick smoke run)' if cfg['quick'] else ''}", "",
             f"Iterative magnitude pruning, {100 * cfg['rate']:g} % of the survivors per round, {cfg['rounds']} "
             f"rounds, each followed by {cfg['finetune_steps']} AdamW steps (lr 3e-4, batch 100, masks enforced); "
             f"dense model: {cfg['pretrain_steps']} AdamW steps. Test accuracy (%) mean ± std over "
             f"{len(s['seeds'])} seed(s) {s['seeds']}; [c] = mean number of collapsed (fully pruned) layers.", "",
             "| allocation | " + " | ".join(f"round {r} ({rem[r]:.2f} %)" for r in show) + " |",
             "|---|" + "---|" * len(show)]
    for a in args.allocations:
        cells = []
        for r in show:
            t = cell.get((a, r))
            cells.append("–" if t is None else f"{t['accuracy_mean']:.2f} ± {t['accuracy_std']:.2f}"
                         + (f" [{t['n_collapsed_mean']:.1f}]" if t["n_collapsed_max"] else ""))
        lines.append(f"| {LABELS[a]} | " + " | ".join(cells) + " |")
    v = s["verdict"]
    va, vb = v["lamp_best_or_tied"], v["global_collapse"]
    lines += ["", "## The paper's claims", "",
              f"1. *LAMP is best or tied at extreme sparsity.* **Verdict: {va['verdict']}** (tied = within the "
              f"larger of the two std's). LAMP's mean is the highest at {va['best_in_mean']} of "
              f"{len(va['points'])} of these points: a tie within a large seed spread is weak evidence."]
    for p in va["points"]:
        lines.append(f"   - {p['remaining_pct']:.2f} % remaining: LAMP {p['lamp']:.2f} ± {p['lamp_std']:.2f}, best "
                     f"other {LABELS.get(p['best_other'], p['best_other'])} {p['best_other_acc']:.2f} ± "
                     f"{p['best_other_std']:.2f} → {'best or tied' if p['best_or_tied'] else 'behind'}.")
    lines += [f"2. *Global MP collapses layers on VGG-like nets.* **Verdict: {vb['verdict']}.** First round with a "
              "collapsed layer (remaining %, any seed): " + ", ".join(
                  f"{LABELS[a]} {'never' if x is None else f'{x:.2f} %'}"
                  for a, x in vb["first_collapse_remaining_pct"].items())
              + "; collapsed layers at the last round (mean over seeds): " + ", ".join(
                  f"{LABELS[a]} {x:.1f}" for a, x in vb["collapsed_layers_at_last_round_mean"].items())
              + "; the sparsest layer keeps (mean over seeds): " + ", ".join(
                  f"{LABELS[a]} {cell[(a, args.rounds)]['min_layer_density_pct']:.3f} %" for a in args.allocations
                  if (a, args.rounds) in cell) + ".", "",
              "A layer counts as collapsed only when every one of its weights is pruned (`layer_collapse`); the "
              "table below shows how close each allocation comes (smallest kept fraction per layer).", "",
              "## Layerwise sparsity at the last round (mean over seeds)", "",
              "| layer (weights) | " + " | ".join(LABELS[a] for a in args.allocations) + " |",
              "|---|" + "---|" * len(args.allocations)]
    lay = {(x["allocation"], x["layer"]): x for x in s["layers"]}
    for name, n in s["layer_sizes"].items():
        lines.append(f"| {name} ({n:,}) | " + " | ".join(
            f"{100 * lay[(a, name)]['sparsity_mean']:.2f} %" if (a, name) in lay else "–"
            for a in args.allocations) + " |")
    lines += ["", "## Deviations from the paper's protocol", "",
              "- Model and data: Conv-6 adapted to the 1,797 real 8×8 scikit-learn digits (1,347 train / 450 test; "
              "first conv reads 1 channel, the first linear layer 256 features after three poolings) instead of "
              "VGG-16 / ResNet / EfficientNet on CIFAR-10 (needs a GPU). The 450-image test set makes one "
              "accuracy uncertain by about ±1 point (binomial).",
              f"- Steps: {cfg['finetune_steps']} retraining steps per round (the paper retrains tens of thousands of "
              f"steps per round); dense model {cfg['pretrain_steps']} steps.",
              "- Scores: magnitude with each allocation (LAMP = magnitude + `lamp` allocation, identical to global "
              "LAMP scores); already-pruned weights stay pruned (masks nest round to round).",
              "- The paper's own numbers are not reproduced here (only its claims); check them in the PDF.",
              "- Colours: the library's palette (`prune_lab.viz.color`), the same as in every prune_lab figure.",
              "",
              f"One trajectory ({cfg['rounds']} rounds) took {s['seconds_per_trajectory']:.1f} s on average. "
              f"Machine: {s['machine']}."]
    path.write_text("\n".join(lines) + "\n")


def _remaining_axis(ax, values):
    """Remaining weights (%) on a log axis, falling to the right, ticks at 1-2-5 steps inside the data's range (the
    data's own values when the range holds fewer than three of them)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    lo, hi = min(values), max(values)
    ax.set_xscale("log")
    ax.set_xlim(hi * 1.15, lo / 1.15)  # inverted: sparser to the right
    ticks = [m * 10.0 ** e for e in range(-3, 3) for m in (1, 2, 5) if lo / 1.15 <= m * 10.0 ** e <= hi * 1.15]
    if len(ticks) < 3:
        ticks = sorted({round(float(v), 2) for v in values})
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("remaining weights (%, log scale)")


def _log_percent_axis(ax, values):
    """A log y-axis of percentages labelled in plain numbers (0.1, 1, 10, 100; 1-2-5 steps within two decades)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    ax.set_yscale("log")
    values = [v for v in values if v > 0]
    wide = not values or max(values) / min(values) > 100
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0,) if wide else (1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(NullLocator())


def _style(i: int, a: str) -> dict:
    """An allocation's line: its library colour, its own open marker, its display name."""
    from prune_lab.viz.plots import MARKERS, method_label

    c = color(a)
    return dict(color=c, marker=MARKERS[i % len(MARKERS)], ms=4.5, mfc="none", mec=c, mew=1.1, lw=1.4,
                label=method_label(a))


def plot(s: dict, path: Path, args):
    """Accuracy (mean ± std over seeds) and the sparsest layer's density vs remaining weights, one line per
    allocation; one legend beside both panels. Returns the figure."""
    from prune_lab.viz.plots import PlotFigure, paper_style

    allocs = [a for a in args.allocations if any(t["allocation"] == a and t["round"] > 0 for t in s["table"])]
    with paper_style():
        fig = PlotFigure(figsize=(12, 4.2), layout="constrained")
        ax, ax2 = fig.subplots(1, 2)
        xs, dens = [], []
        for i, a in enumerate(allocs):
            pts = sorted((t["remaining_pct"], t["accuracy_mean"], t["accuracy_std"], t["min_layer_density_pct"])
                         for t in s["table"] if t["allocation"] == a and t["round"] > 0)
            x, y, e, c = zip(*pts)
            xs += x
            dens += c
            bars = ax.errorbar(x, y, yerr=e, capsize=2, elinewidth=0.9, **_style(i, a))
            for b in bars[2]:
                b.set_alpha(0.55)  # the spread stays readable where five lines cross
            ax2.plot(x, c, **_style(i, a))
        for a_ in (ax, ax2):
            if xs:
                _remaining_axis(a_, xs)
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title("Conv-6 on digits: iterative magnitude pruning")
        _log_percent_axis(ax2, dens)
        ax2.set_ylabel("remaining weights in the\nsparsest layer (%, log scale)")
        ax2.set_title("Toward layer collapse (a collapsed layer: 0 %)")
        handles, labels = ax.get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right upper", frameon=False,
                   title="allocation\n(magnitude scores)")
        fig.savefig(path, dpi=130)
    return fig


def plot_layers(s: dict, path: Path):
    """Remaining weights per layer at the last round, allocations side by side; legend beside the axes. Returns
    the figure."""
    from prune_lab.viz.plots import PlotFigure, method_label, paper_style

    names = list(s["layer_sizes"])
    allocs = list(dict.fromkeys(x["allocation"] for x in s["layers"]))
    lay = {(x["allocation"], x["layer"]): x for x in s["layers"]}
    with paper_style():
        fig = PlotFigure(figsize=(11, 4.2), layout="constrained")
        ax = fig.add_subplot()
        width = 0.8 / max(len(allocs), 1)
        x = np.arange(len(names))
        for i, a in enumerate(allocs):
            dens = [100 * (1 - lay[(a, n)]["sparsity_mean"]) for n in names]
            ax.bar(x + (i - (len(allocs) - 1) / 2) * width, dens, width * 0.95, color=color(a),
                   label=method_label(a), linewidth=0)
        _log_percent_axis(ax, [100 * (1 - row["sparsity_mean"]) for row in s["layers"]])
        ax.set_xticks(x, [f"{n.replace('.weight', '')}\n{s['layer_sizes'][n]:,}" for n in names])
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_xlabel("layer (number of weights), input → output")
        ax.set_ylabel("remaining weights in the layer\n(%, log scale)")
        rounds = s["settings"]["rounds"]
        rem = np.mean([t["remaining_pct"] for t in s["table"] if t["round"] == rounds])
        ax.set_title(f"Layerwise density at {rem:.2f} % remaining (round {rounds}, mean over seeds)")
        ax.grid(False, axis="x")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                  title="allocation\n(magnitude scores)")
        fig.savefig(path, dpi=130)
    return fig


def main(argv=None):
    p = script_parser(__doc__, quick_help="seconds-long smoke run")
    p.add_argument("--allocations", nargs="+", default=list(ALLOCATIONS), choices=ALLOCATIONS)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--rate", type=float, default=None, help="fraction of survivors pruned per round (LAMP: 0.2)")
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument("--finetune-steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fresh", action="store_true", help="ignore (and overwrite) finished trajectories")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds or [0]
        args.rounds = args.rounds or 2
        args.rate = args.rate or 0.5
        args.pretrain_steps = args.pretrain_steps or 20
        args.finetune_steps = args.finetune_steps or 2
    else:
        args.seeds = args.seeds or [0, 1, 2]
        args.rounds = args.rounds or 20
        args.rate = args.rate or 0.2
        args.pretrain_steps = args.pretrain_steps or 300
        args.finetune_steps = args.finetune_steps or 15
    summary = run(args)
    print((Path(args.out) / ("lamp_conv6_quick.md" if args.quick else "lamp_conv6.md")).read_text())
    return summary


if __name__ == "__main__":
    main()
