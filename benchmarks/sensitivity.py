"""Layer sensitivity: 20 layers × 10 sparsities of ResNet-20 (CIFAR layout) trained on the digits, each layer pruned
alone (magnitude) and the network evaluated on the 450 test digits.

Three ways to compute the same 200 points, in one run on one torch thread:
- ``ranking``: ``session.sensitivity`` (default path): the session's cached magnitude ranking, one layer's mask from
  a lookup, evaluation with that mask through ``functional_call``;
- ``prune``: ``session.sensitivity(via="prune")``: ``session.prune`` with every other layer locked at 0.0
  (``overrides``), then the same evaluation (all layers' masks applied);
- ``from scratch``: what one writes without a session: a fresh ``pl.prune(model, "magnitude", s, overrides=...)``
  per point (scores and sorts every layer each time) and ``pl.evaluate``.
Plus a repeat of the session run (answered from the session's cache) and the dense evaluation alone (the floor per
point). All three must give the same values; the script checks it.

    python benchmarks/sensitivity.py           # writes results/sensitivity.{json,md}
    python benchmarks/sensitivity.py --quick   # conv6, 3 layers × 2 sparsities (seconds)
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prune_lab as pl  # noqa: E402
from _points import write_results  # noqa: E402
from slider_latency import machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GRID = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def from_scratch(model, data, layers, all_layers, grid) -> list:
    values = []
    for n in layers:
        others = {m: 0.0 for m in all_layers if m != n}
        for s in grid:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = pl.prune(model, "magnitude", s, allocation="uniform", overrides=others, device="cpu")
            values.append(pl.evaluate(model, data, masks=res.masks, device="cpu")["loss"])
    return values


def run(quick: bool) -> dict:
    torch.set_num_threads(1)
    data = pl.data.digits()
    arch = "conv6" if quick else "resnet20_cifar"
    model = pl.pretrained(arch, data, device="cpu")
    grid = [0.5, 0.9] if quick else GRID
    probe = pl.PruneSession(model, data, device="cpu")
    all_layers = list(probe.layer_names)
    layers = all_layers[:3] if quick else all_layers[:20]
    points = len(layers) * len(grid)
    out = {"machine": {**machine(torch.device("cpu")), "uptime_before": uptime()}, "model": arch,
           "prunable_layers": len(all_layers), "layers": layers, "grid": grid, "points": points,
           "test_samples": len(data.test), "dense": probe.evaluate()}

    t0 = time.perf_counter()
    for _ in range(5):
        pl.evaluate(model, data, device="cpu")
    out["dense_eval_s"] = (time.perf_counter() - t0) / 5

    timings, frames = {}, {}
    for via in ("ranking", "prune"):
        session = pl.PruneSession(model, data, device="cpu")
        t0 = time.perf_counter()
        frames[via] = session.sensitivity("magnitude", grid, layers=layers, via=via, progress=False)
        timings[via] = time.perf_counter() - t0
        if via == "ranking":
            t0 = time.perf_counter()
            again = session.sensitivity("magnitude", grid, layers=layers, progress=False)
            timings["repeat (cached)"] = time.perf_counter() - t0
            out["repeat_computed"] = again.attrs["computed"]
    t0 = time.perf_counter()
    scratch = from_scratch(model, data, layers, all_layers, grid)
    timings["from scratch"] = time.perf_counter() - t0
    out["uptime_after"] = uptime()

    a = frames["ranking"]["loss"].to_numpy()
    diffs = [float(np.abs(a - frames["prune"]["loss"].to_numpy()).max()), float(np.abs(a - np.asarray(scratch)).max())]
    out["max_abs_difference"] = max(diffs)
    out["same_values"] = max(diffs) < 1e-9
    out["seconds"] = timings
    out["per_point_ms"] = {k: 1e3 * v / points for k, v in timings.items()}
    out["speedup_vs_scratch"] = {k: timings["from scratch"] / v for k, v in timings.items() if k != "from scratch"}
    df = frames["ranking"]
    worst = df.loc[df.groupby("layer")["increase"].idxmax()].sort_values("increase", ascending=False)
    out["most_fragile"] = [{"layer": r.layer, "sparsity": r.sparsity, "loss_increase": r.increase}
                           for r in worst.head(3).itertuples()]
    return out


def report(r: dict) -> str:
    m = r["machine"]
    lines = [f"# Layer sensitivity: {r['model']} on digits, {len(r['layers'])} layers × {len(r['grid'])} sparsities "
             f"= {r['points']} points (magnitude, loss on {r['test_samples']} test digits)", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} on {m['torch_threads']} thread, "
             f"Python {m['python']}. Load: `{r['machine']['uptime_before']}` before, `{r['uptime_after']}` after "
             f"(a 2-core machine shared with other work: the load average says how busy).", "",
             f"Dense: accuracy {r['dense']['accuracy']:.4f}, loss {r['dense']['loss']:.4f}; one dense evaluation "
             f"takes {1e3 * r['dense_eval_s']:.1f} ms (the floor per point).", "",
             "| way | total | per point | speed-up vs from scratch |", "|---|---|---|---|"]
    names = {"ranking": "session.sensitivity (cached ranking, one layer's mask)",
             "prune": "session.sensitivity(via='prune') (session.prune with overrides)",
             "from scratch": "fresh pl.prune + pl.evaluate per point",
             "repeat (cached)": "repeat of the session run (cache)"}
    for k in ("ranking", "prune", "from scratch", "repeat (cached)"):
        sp = r["speedup_vs_scratch"].get(k)
        lines.append(f"| {names[k]} | {r['seconds'][k]:.2f} s | {r['per_point_ms'][k]:.1f} ms | "
                     f"{'—' if sp is None else f'{sp:.1f}×'} |")
    lines += ["", f"All three ways gave the same losses: {r['same_values']} (largest difference "
                  f"{r['max_abs_difference']:.1e}); the repeat computed {r['repeat_computed']} points.", "",
              "Most fragile layers (largest loss increase on the grid): " +
              ", ".join(f"`{f['layer']}` (+{f['loss_increase']:.3f} at {f['sparsity']:g})"
                        for f in r["most_fragile"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="conv6, 3 layers × 2 sparsities")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    r = run(args.quick)
    write_results(Path(args.out), "sensitivity_quick" if args.quick else "sensitivity", r, report(r))
    return r


if __name__ == "__main__":
    main()
