"""Reproduce the CBS paper's MLPNet experiment (Yu et al., ICML 2022, arXiv 2203.04466): one-shot pruning of MLPNet
784-40-20-10 (no biases) on MNIST at sparsities 0.5 … 0.98 without retraining, comparing global magnitude (MP),
WoodFisher (WF), CBS and the update ablation (MP+U, WF+U, CBS-S without update; CBS = CBS-S + CBS-U).

    python benchmarks/reproduce_cbs.py            # full run: the MNIST t10k files, 5 seeds, N = 1000 gradients
    python benchmarks/reproduce_cbs.py --quick    # seconds: scikit-learn digits, 1 seed, 2 sparsities

Every finished (seed, method, sparsity) point is appended to ``<out>/cbs_mlpnet[_quick]_points.csv`` at once, so
an interrupted run resumes where it stopped (points are keyed by the run's settings). At the end the script writes
``cbs_mlpnet[_quick].csv`` (mean ± std per method and sparsity), ``.json`` (settings, timings, peak memory), ``.md``
(the table, the costs and where the setup differs from the paper's) and ``.png`` (accuracy vs sparsity).

The paper's accuracy table is not restated here: only what could be checked against a primary source is. The
qualitative claims are the paper's abstract (arXiv 2203.04466): CBS's selection outperforms the other methods at high
sparsity, and its weight update helps even when combined with the other methods. The MLPNet setup is the authors'
code (github.com/yuxwind/CBS, ``scripts/mnist-mlpnet-*.sh`` and ``scripts/sweep_mnist_mlpnet_woodfisher.sh``): a dense
checkpoint ``mnist_25_epoch_93.97.ckpt``, N = 10,000 gradient samples (``FISHER_SUBSAMPLE_SIZE``), damping 1e-3
(``FISHER_DAMP``), sparsities 0.1 … 0.98 (``scripts/option.py``).

Each seed trains its own dense model (``pl.pretrained("mlpnet", data, seed=s)``, cached on disk) and draws its own
N gradient samples. Wall time and peak memory (resident set size above the level at the call's start, sampled
every 5 ms) are recorded per pruning call.
"""
from __future__ import annotations

import sys
import copy
import csv
import json
import os
import platform
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import prune_lab as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared points cache, beside this script
from _points import points_key, read_points, results_folder, script_parser, write_table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist-t10k"
SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)
#: The authors' MLPNet setup, read from their code (github.com/yuxwind/CBS, scripts/mnist-mlpnet-*.sh): the dense
#: checkpoint's name gives its accuracy, the Fisher uses FISHER_SUBSAMPLE_SIZE gradients and FISHER_DAMP.
AUTHORS_SETUP = {"dense_checkpoint": "mnist_25_epoch_93.97.ckpt", "n_samples": 10_000, "damping": 1e-3}
#: Sparsities taken as "high" for the paper's claim that CBS's selection wins at high sparsity.
HIGH = (0.9, 0.95, 0.98)
METHODS = ("MP", "MP+U", "WF", "WF+U", "CBS-S", "CBS")
from prune_lab.viz import color  # noqa: E402  (the library's one palette: the same colours as every figure)

#: each method in its library colour; a "+U" variant (the CBS-U weight update added) in a lighter shade of it
COLOURS = {"MP": color("magnitude"), "WF": color("woodfisher"), "CBS-S": color("cbs_select"), "CBS": color("cbs"),
           "dense": (0.5, 0.5, 0.5)}
COLOURS.update({f"{m}+U": tuple(1 - 0.5 * (1 - v) for v in COLOURS[m]) for m in ("MP", "WF")})


# ------------------------------------------------------------------------------------------------ measurement
def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux: fall back to the lifetime peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes() - self.base)
            self._stop.wait(self.interval)

    def __enter__(self):
        self.base = _rss_bytes()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_bytes() - self.base)


def timed(fn):
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    return out, seconds, mem.peak / 2**20


def accuracy(net, data, res, use_weights: bool) -> dict:
    """Test accuracy of ``net`` pruned by ``res``: masks only, or the updated weights when ``use_weights``."""
    if not use_weights or res.weights is None:
        return pl.evaluate(net, data, masks=res.masks)
    pruned = copy.deepcopy(net)  # a copy: the user's model is never modified
    params = dict(pruned.named_parameters())
    with torch.no_grad():
        for n, w in res.weights.items():
            params[n].copy_(w * res.masks[n])
    return pl.evaluate(pruned, data)


# ------------------------------------------------------------------------------------------------ the run
def settings(args) -> dict:
    return dict(quick=args.quick, n_samples=args.n_samples, damping=args.damping, seeds=list(args.seeds),
                sparsities=list(args.sparsities), cbs=dict(scope=args.scope, max_swaps=args.max_swaps),
                data="digits" if args.quick else str(args.data_root))


def load_points(path: Path, key: str) -> dict:
    done = {}
    for row in read_points(path, key):
        done[(int(row["seed"]), row["method"], float(row["sparsity"]))] = row
    return done


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    out, stem, points_path = results_folder(args, "cbs_mlpnet")
    cfg = settings(args)
    # seeds and sparsities are part of each point, not of the settings they share
    key = points_key({k: v for k, v in cfg.items() if k not in ("seeds", "sparsities")})
    done = load_points(points_path, key) if not args.fresh else {}
    fields = ["key", "seed", "method", "sparsity", "accuracy", "loss", "seconds", "peak_mb", "dense_accuracy"]
    new_file = not points_path.is_file() or args.fresh
    with open(points_path, "w" if args.fresh else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new_file:
            writer.writeheader()
        if args.quick:
            data = pl.data.digits()
        else:
            if not (Path(args.data_root) / "t10k-images-idx3-ubyte.gz").is_file():
                raise SystemExit(f"MNIST files not found in {args.data_root}; pass --data-root (a folder with the "
                                 f"IDX files) or use --quick.")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data = pl.data.mnist(args.data_root)
        extra_path = out / f"{stem}_timings.json"  # per-seed Fisher / training timings, kept for resumed runs
        saved = json.loads(extra_path.read_text()) if extra_path.is_file() and not args.fresh else {}
        per_seed = saved.get(key, {})
        from tqdm.auto import tqdm

        todo = [(s, sp) for s in args.seeds for sp in args.sparsities]
        bar = tqdm(total=len(todo) * len(METHODS), desc="CBS reproduction", initial=len(done))
        for seed in args.seeds:
            if all((seed, m, sp) in done for m in METHODS for sp in args.sparsities):
                continue
            (net, t_train, _) = timed(lambda: pl.pretrained("mlpnet", data, seed=seed, progress=False))
            dense = pl.evaluate(net, data)["accuracy"]
            session = pl.PruneSession(net, data, device="cpu")
            fhp = dict(n_samples=args.n_samples, damping=args.damping)
            cbs_hp = dict(fhp, scope=args.scope, max_swaps=args.max_swaps)
            # the Fisher (per-sample gradients + factorisation) is shared by WF, the updates and CBS: time it alone
            _, t_fisher, m_fisher = timed(lambda: session.scores("woodfisher", seed=seed, **fhp))
            per_seed[str(seed)] = dict(fisher_seconds=t_fisher, fisher_peak_mb=m_fisher, train_seconds=t_train)
            saved[key] = per_seed
            extra_path.write_text(json.dumps(saved, indent=2))
            for sp in args.sparsities:
                calls = {
                    "MP": (lambda: session.prune("global_magnitude", sp), False),
                    "MP+U": (lambda: session.prune("global_magnitude", sp, update="cbs_u", seed=seed), True),
                    "WF": (lambda: session.prune("woodfisher", sp, seed=seed, **fhp), True),
                    "WF+U": (lambda: session.prune("woodfisher", sp, seed=seed, update="cbs_u", **fhp), True),
                    "CBS": (lambda: session.prune("cbs", sp, seed=seed, **cbs_hp), True),
                }
                cbs_call = None
                for name in METHODS:
                    if (seed, name, sp) in done:
                        continue
                    if name in ("CBS-S", "CBS"):  # one `cbs` call: its selection (= cbs_select) and its update
                        if cbs_call is None:
                            cbs_call = timed(calls["CBS"][0])
                        (res, secs, mb), use = cbs_call, name == "CBS"
                    else:
                        (res, secs, mb), use = timed(calls[name][0]), calls[name][1]
                    ev = accuracy(net, data, res, use)
                    row = dict(key=key, seed=seed, method=name, sparsity=sp, accuracy=ev["accuracy"],
                               loss=ev["loss"], seconds=secs, peak_mb=mb, dense_accuracy=dense)
                    writer.writerow(row)
                    f.flush()
                    done[(seed, name, sp)] = {k: str(v) for k, v in row.items()}
                    bar.update(1)
        bar.close()
    runs = [per_seed[str(x)] for x in args.seeds if str(x) in per_seed]
    extra = {k: [r[k] for r in runs] for k in ("fisher_seconds", "fisher_peak_mb", "train_seconds")} if runs else {}
    done = {k: v for k, v in done.items() if k[0] in args.seeds and k[2] in args.sparsities}
    return summarise(out, stem, cfg, done, extra)


# ------------------------------------------------------------------------------------------------ reporting
def summarise(out: Path, stem: str, cfg: dict, done: dict, extra: dict) -> dict:
    rows = []
    for (seed, method, sp), r in done.items():
        rows.append(dict(seed=seed, method=method, sparsity=sp, accuracy=float(r["accuracy"]),
                         seconds=float(r["seconds"]), peak_mb=float(r["peak_mb"]),
                         dense=float(r["dense_accuracy"])))
    table = []
    for m in METHODS:
        for sp in cfg["sparsities"]:
            sel = [r for r in rows if r["method"] == m and r["sparsity"] == sp]
            if not sel:
                continue
            acc = np.array([r["accuracy"] for r in sel]) * 100
            table.append(dict(method=m, sparsity=sp, n_seeds=len(sel), accuracy_mean=float(acc.mean()),
                              accuracy_std=float(acc.std(ddof=1)) if len(sel) > 1 else 0.0,
                              seconds_mean=float(np.mean([r["seconds"] for r in sel])),
                              peak_mb_max=float(np.max([r["peak_mb"] for r in sel]))))
    write_table(out / f"{stem}.csv", table)
    dense = sorted({(r["seed"], r["dense"]) for r in rows})
    dense_acc = np.array([d for _, d in dense]) * 100
    summary = dict(settings=cfg, table=table, dense_accuracy_mean=float(dense_acc.mean()),
                   dense_accuracy_std=float(dense_acc.std(ddof=1)) if len(dense_acc) > 1 else 0.0,
                   fisher_seconds=extra.get("fisher_seconds"), fisher_peak_mb=extra.get("fisher_peak_mb"),
                   train_seconds=extra.get("train_seconds"),
                   cbs_sweep_seconds_per_seed=float(sum(t["seconds_mean"] for t in table if t["method"] == "CBS")),
                   machine=dict(python=platform.python_version(), torch=torch.__version__,
                                threads=torch.get_num_threads(), cpu_count=os.cpu_count()))
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    write_markdown(out / f"{stem}.md", summary)
    plot(summary, out / f"{stem}.png")
    return summary


def write_markdown(path: Path, s: dict):
    cfg = s["settings"]
    sps = cfg["sparsities"]
    cell = {(t["method"], t["sparsity"]): t for t in s["table"]}
    lines = [f"# CBS reproduction: MLPNet on {'digits (quick smoke run)' if cfg['quick'] else 'MNIST'}", "",
             f"One-shot, no retraining. Test accuracy (%) mean ± std over {len(cfg['seeds'])} seed(s) "
             f"(each seed: its own trained dense model and its own N = {cfg['n_samples']} gradient samples), "
             f"λ = {cfg['damping']:g}, full Fisher, CBS swaps {cfg['cbs']['scope']} (≤ {cfg['cbs']['max_swaps']}). "
             f"Dense: {s['dense_accuracy_mean']:.2f} ± {s['dense_accuracy_std']:.2f} %.", "",
             "| method | " + " | ".join(f"{x:g}" for x in sps) + " |", "|---|" + "---|" * len(sps)]
    for m in METHODS:
        vals = [cell.get((m, x)) for x in sps]
        lines.append(f"| {m} | " + " | ".join(f"{v['accuracy_mean']:.2f} ± {v['accuracy_std']:.2f}" if v else "–"
                                              for v in vals) + " |")
    lines += ["", "MP = global magnitude; WF = WoodFisher saliency and its own (summed OBS) update; +U = the CBS-U "
              "update δw_R = F_RR⁻¹F_RP w_P after that selection (the `cbs_u` update with its defaults: N = 1000, "
              "λ = 1e-3, full Fisher); CBS-S = CBS's selection without update; CBS = "
              "CBS-S + CBS-U (`cbs`; identical to `cbs_select` + `update='cbs_u'`). CBS-S and CBS come from one `cbs` "
              "call (its masks alone, then with its update), so they share its time.", "",
              "The paper's claims, from its abstract (arXiv 2203.04466): CBS's selection outperforms the other "
              "methods at high sparsity, and the CBS-U weight update helps even when combined with the other methods. "
              "The paper's accuracy table is not restated here (it could not be checked against the paper's text); "
              "the setup below is the authors' code (github.com/yuxwind/CBS, `scripts/mnist-mlpnet-*.sh`).", "",
              "## Cost (per pruning call, mean over seeds)", "",
              "| method | " + " | ".join(f"{x:g}" for x in sps) + " | peak MB |", "|---|" + "---|" * (len(sps) + 1)]
    for m in METHODS:
        vals = [cell.get((m, x)) for x in sps]
        peak = max((v["peak_mb_max"] for v in vals if v), default=0)
        lines.append(f"| {m} | " + " | ".join(f"{v['seconds_mean']:.2f} s" if v else "–" for v in vals)
                     + f" | {peak:.0f} |")
    if not cfg["quick"]:
        lines += ["", "## The paper's claims against our numbers, and where we differ", ""]
        acc = {k: v["accuracy_mean"] for k, v in cell.items()}
        high = [x for x in sps if x in HIGH and all((m, x) in cell for m in METHODS)]
        if high:
            sel = [x for x in high if acc[("CBS-S", x)] >= max(acc[("MP", x)], acc[("WF", x)])]
            withu = [x for x in high if acc[("CBS", x)] >= max(acc[("MP+U", x)], acc[("WF+U", x)])]
            lines.append(
                f"- Selection at high sparsity ({', '.join(f'{x:g}' for x in high)}): CBS-S ≥ MP and WF (no update) "
                f"at {len(sel)} of {len(high)} (" + ", ".join(
                    f"{x:g}: {acc[('CBS-S', x)]:.1f} vs {acc[('WF', x)]:.1f} / {acc[('MP', x)]:.1f}" for x in high)
                + f" for CBS-S vs WF / MP); with the same update, CBS ≥ MP+U and WF+U at {len(withu)} of {len(high)}.")
        both = [x for x in sps if all((m, x) in cell for m in ("MP", "MP+U", "WF", "WF+U"))]
        helps = [x for x in both if acc[("MP+U", x)] > acc[("MP", x)] and acc[("WF+U", x)] > acc[("WF", x)]]
        lines.append(f"- The CBS-U update raises both MP and WF at {len(helps)} of {len(both)} sparsities "
                     f"(at 0.9: MP {acc.get(('MP', 0.9), float('nan')):.1f} → {acc.get(('MP+U', 0.9), float('nan')):.1f}, "
                     f"WF {acc.get(('WF', 0.9), float('nan')):.1f} → {acc.get(('WF+U', 0.9), float('nan')):.1f}).")
        order = [x for x in sps if all((m, x) in cell for m in ("MP", "WF", "CBS"))]
        holds = [x for x in order if cell[("CBS", x)]["accuracy_mean"] >= cell[("WF", x)]["accuracy_mean"]
                 >= cell[("MP", x)]["accuracy_mean"]]
        lines.append(f"- The ordering CBS ≥ WF ≥ MP holds (in the mean) at sparsities "
                     f"{', '.join(f'{x:g}' for x in holds) or 'none'} of {', '.join(f'{x:g}' for x in order)}.")
        upd = [x for x in order if all((m, x) in cell for m in ("MP+U", "WF+U"))]
        lines.append("- CBS minus the better of MP+U / WF+U: " + ", ".join(
            f"{x:g}: {cell[('CBS', x)]['accuracy_mean'] - max(cell[('MP+U', x)]['accuracy_mean'], cell[('WF+U', x)]['accuracy_mean']):+.2f}"
            for x in upd) + " points (compare with the std columns above).")
        lines += [
            "- Why: our dense MLPNet is trained on 8,000 images (the official 10,000 MNIST test images split "
            "8,000 / 2,000; Adam, 20 epochs) and tested on the other 2,000; the authors' code trains on MNIST's "
            "60,000 training images (`utils/datasets.py`) and its dense checkpoint is named for 93.97 % test "
            "accuracy. Magnitude pruning alone costs our dense models "
            f"{s['dense_accuracy_mean'] - acc.get(('MP', 0.9), float('nan')):.1f} points at 0.9 sparsity. The "
            "2,000-image test set makes each accuracy uncertain by about ±0.5 points (binomial) on top of the "
            "seed-to-seed spread shown.",
            "- The empirical Fisher uses N = 1,000 gradient samples (the authors' MLPNet scripts use "
            f"N = {AUTHORS_SETUP['n_samples']:,} and damping {AUTHORS_SETUP['damping']:g}; we have only 8,000 training "
            "images), so F is rank ≤ 1,000 + λI over 32,360 weights.",
            "- Most of the gain at high sparsity here comes from the CBS-U update: MP+U, WF+U and CBS are close, "
            "while CBS-S (selection alone) clearly beats MP; a gain of CBS's selection over the updated baselines "
            "is not resolved by our measurements.", ""]
    if s.get("fisher_seconds"):
        lines += ["", f"Per-sample gradients + Fisher factorisation (shared by WF, the updates and CBS): "
                      f"{np.mean(s['fisher_seconds']):.1f} s on average (max {np.max(s['fisher_seconds']):.1f} s), "
                      f"peak +{np.max(s['fisher_peak_mb']):.0f} MB, per seed. Timings were taken on a shared 2-core "
                      f"CPU while other jobs ran, so they are upper bounds."]
    lines += [f"A whole CBS sweep over the {len(sps)} sparsities: {s['cbs_sweep_seconds_per_seed']:.1f} s per seed "
              f"(Fisher excluded). Machine: {s['machine']}."]
    path.write_text("\n".join(lines) + "\n")


def plot(s: dict, path: Path):
    from matplotlib.figure import Figure

    cfg = s["settings"]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for m in METHODS:
        pts = sorted((t["sparsity"], t["accuracy_mean"], t["accuracy_std"]) for t in s["table"] if t["method"] == m)
        if pts:
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, marker="o", ms=4, capsize=3, color=COLOURS[m], label=m)
    ax.axhline(s["dense_accuracy_mean"], color=COLOURS["dense"], lw=0.8, ls=":", label="dense")
    ax.set_xlabel("sparsity (fraction of weights removed)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"MLPNet one-shot pruning, no retraining ({'digits, quick' if cfg['quick'] else 'MNIST t10k split'})")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv=None):
    p = script_parser(__doc__, quick_help="seconds-long smoke run on scikit-learn digits", data_root=SHARED_MNIST)
    p.add_argument("--sparsities", type=float, nargs="+", default=None)
    p.add_argument("--n-samples", type=int, default=None, help="N gradients for the Fisher (default 1000)")
    p.add_argument("--damping", type=float, default=1e-3)
    p.add_argument("--scope", choices=("global", "layer"), default="global", help="CBS swap scope")
    p.add_argument("--max-swaps", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fresh", action="store_true", help="ignore (and overwrite) finished points")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds or [0]
        args.sparsities = args.sparsities or [0.5, 0.9]
        args.n_samples = args.n_samples or 64
        args.max_swaps = min(args.max_swaps, 50)
    else:
        args.seeds = args.seeds or [0, 1, 2, 3, 4]
        args.sparsities = args.sparsities or list(SPARSITIES)
        args.n_samples = args.n_samples or 1000
    summary = run(args)
    print((Path(args.out) / ("cbs_mlpnet_quick.md" if args.quick else "cbs_mlpnet.md")).read_text())
    return summary


if __name__ == "__main__":
    main()
