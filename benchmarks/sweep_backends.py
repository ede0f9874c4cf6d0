"""One sweep, three ways: in this process, a local process pool, and Ray tasks on a local 2-CPU cluster.

The sweep: the pretrained Conv-6 on digits (mlpnet with --quick), 4 methods × 6 sparsities, each point pruned,
evaluated, fine-tuned (mask-preserving, 2 epochs) and evaluated again: about 2 s a point on one core. Reported: wall time per backend and as a ratio to the in-process loop (what a
user writes by hand: prune, train, evaluate, point by point), the Ray cluster's start-up separately, and a repeat
run answered from the result store. All backends must give the same table; the script checks it.

    python benchmarks/sweep_backends.py            # writes results/sweep_backends.{json,md}
    python benchmarks/sweep_backends.py --quick    # 2 methods × 2 sparsities, no Ray (seconds)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prune_lab as pl  # noqa: E402
from _points import write_results  # noqa: E402
from slider_latency import machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def run(quick: bool, backends: list, epochs: int) -> dict:
    data = pl.data.digits()
    arch = "mlpnet" if quick else "conv6"
    model = pl.pretrained(arch, data, device="cpu")
    methods = ["magnitude", "lamp"] if quick else ["magnitude", "global_magnitude", "lamp", "lap"]
    grid = [0.5, 0.9] if quick else [0.5, 0.7, 0.8, 0.9, 0.95, 0.98]
    kw = dict(finetune={"epochs": epochs}, progress=not quick)
    out = {"machine": machine(torch.device("cpu")), "model": arch, "points": len(methods) * len(grid), "methods": methods,
           "sparsities": grid, "finetune_epochs": epochs, "backends": {}}
    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in backends:
            opts = {"in-process": {}, "pool": {"workers": 2}, "ray": {"backend": "ray"}}[name]
            if name == "ray":
                import ray

                t0 = time.perf_counter()
                ray.init(num_cpus=2, address="local", include_dashboard=False, log_to_driver=False,
                         _node_ip_address="127.0.0.1")
                out["ray_start_s"] = time.perf_counter() - t0
            store = Path(tmp) / name
            t0 = time.perf_counter()
            df = pl.PruneSession(model, data, device="cpu").sweep(methods, grid, cache_dir=store, **opts, **kw)
            seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            again = pl.PruneSession(model, data, device="cpu").sweep(methods, grid, cache_dir=store, **opts, **kw)
            out["backends"][name] = {"seconds": seconds, "computed": df.attrs["computed"],
                                     "repeat_s": time.perf_counter() - t0,
                                     "repeat_computed": again.attrs["computed"]}
            tables[name] = df
            if name == "ray":
                ray.shutdown()
    base = out["backends"].get("in-process", {}).get("seconds")
    for name, r in out["backends"].items():
        r["ratio_vs_in_process"] = base / r["seconds"] if base else None
    first = next(iter(tables.values()))
    numeric = ["achieved_sparsity", "accuracy", "loss"]
    out["tables_equal"] = all(first.drop(columns=numeric).equals(t.drop(columns=numeric)) for t in tables.values())
    out["max_abs_difference"] = max(float((first[numeric] - t[numeric]).abs().max().max()) for t in tables.values())
    out["finetuned_accuracy_mean"] = float(first[first.finetuned]["accuracy"].mean())
    return out


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# Sweep backends: {r['model']} on digits, {r['points']} points ({', '.join(r['methods'])} × "
             f"{len(r['sparsities'])} sparsities), each pruned, evaluated, fine-tuned {r['finetune_epochs']} epochs "
             "and evaluated again",
             "", f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}.", "",
             "| backend | wall time | speed-up vs in-process | repeat run (from the store) |",
             "|---|---|---|---|"]
    for name, b in r["backends"].items():
        ratio = f"{b['ratio_vs_in_process']:.2f}×" if b["ratio_vs_in_process"] else "-"
        lines.append(f"| {name} | {b['seconds']:.1f} s ({b['computed']} computed) | {ratio} | "
                     f"{b['repeat_s']:.2f} s ({b['repeat_computed']} computed) |")
    if "ray_start_s" in r:
        lines += ["", f"Starting the local Ray cluster (2 CPUs) took {r['ray_start_s']:.1f} s, not counted above."]
    lines += ["", f"All backends gave the same points, settings and fine-tuned flags: {r['tables_equal']}; largest "
              f"difference in accuracy, loss or achieved sparsity between backends: {r['max_abs_difference']:.1e} "
              "(float rounding: workers run with fewer torch threads)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--backends", default=None, help="comma-separated: in-process,pool,ray")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    backends = (args.backends or ("in-process,pool" if args.quick else "in-process,pool,ray")).split(",")
    r = run(args.quick, backends, 1 if args.quick else args.epochs)
    write_results(args.out, "sweep_backends_quick" if args.quick else "sweep_backends", r, markdown(r))
    return r


if __name__ == "__main__":
    main()
