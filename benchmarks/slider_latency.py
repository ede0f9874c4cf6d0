"""Slider latency: how long a sparsity change takes on a warm session, beside torch.nn.utils.prune.

Model: torchvision ResNet-50 (random init, 25.5 M prunable weights). In one run it times
- ``torch.nn.utils.prune.global_unstructured`` (L1), what a user would otherwise call, at several sparsities
  (each call on a fresh copy of the model, the copy not timed);
- the first (cold) ``session.prune`` call of a fresh session per method (layer graph, fingerprint, scores, sort);
- warm ``session.prune`` for ``lamp``, ``global_magnitude`` and ``magnitude`` at 25 sparsities;
- the bytes the session's cache holds, beside the weights' bytes.

Results: ``benchmarks/results/slider_latency[_DEVICE].json`` and ``.md`` (quoted in the README).

    python benchmarks/slider_latency.py               # the full run (~3 min on a 2-core CPU)
    python benchmarks/slider_latency.py --quick       # a small model, seconds (a smoke test)
    python benchmarks/slider_latency.py --device cuda # on a GPU
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.utils.prune as torch_prune
import torchvision
from tqdm.auto import tqdm

import prune_lab as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers, beside this script
from _points import cpu_name, write_results  # noqa: E402

METHODS = ["lamp", "global_magnitude", "magnitude"]
RESULTS = Path(__file__).resolve().parent / "results"


def machine(device: torch.device) -> dict:
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "prune_lab": pl.__version__,
            "platform": platform.platform(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(quick: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if quick:
        return torchvision.models.mobilenet_v3_small().eval()
    return torchvision.models.resnet50().eval()


def time_torch(model, sparsities, device) -> list:
    times = []
    for s in tqdm(sparsities, desc="torch.nn.utils.prune.global_unstructured", leave=False):
        m = copy.deepcopy(model).to(device)
        params = [(mod, "weight") for mod in m.modules() if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))]
        sync(device)
        t = time.perf_counter()
        torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=float(s))
        sync(device)
        times.append(time.perf_counter() - t)
        del m, params
    return times


def run(quick: bool, device: torch.device, torch_points: int, points: int) -> dict:
    model = build_model(quick)
    n_weights = sum(p.numel() for p in pl.prunable_parameters(model).values())
    weight_bytes = sum(p.numel() * p.element_size() for p in pl.prunable_parameters(model).values())
    sparsities = np.linspace(0.02, 0.98, points).tolist()
    torch_sparsities = np.linspace(0.1, 0.9, torch_points).tolist()

    torch_times = time_torch(model, torch_sparsities, device)
    torch_median = statistics.median(torch_times)

    out = {"model": "mobilenet_v3_small" if quick else "resnet50", "prunable_weights": n_weights,
           "weight_bytes": weight_bytes, "machine": machine(device), "points": points,
           "torch_global_unstructured_s": {"median": torch_median, "all": torch_times,
                                           "sparsities": torch_sparsities},
           "methods": {}}
    session = pl.PruneSession(model, device=device)
    for method in tqdm(METHODS, desc="prune_lab methods", leave=False):
        fresh = pl.PruneSession(model, device=device)
        sync(device)
        t = time.perf_counter()
        fresh.prune(method, 0.5)
        sync(device)
        cold = time.perf_counter() - t
        del fresh
        session.prune(method, 0.5)  # warm up the shared session
        warm = []
        for s in sparsities:
            t = time.perf_counter()
            res = session.prune(method, s)
            warm.append(time.perf_counter() - t)
            assert abs(res.sparsity - s) < 0.01 or method == "magnitude"
        warm_median = statistics.median(warm)
        out["methods"][method] = {
            "cold_s": cold, "cold_vs_torch": cold / torch_median,
            "warm_median_ms": warm_median * 1e3, "warm_max_ms": max(warm) * 1e3,
            "speedup_vs_torch": torch_median / warm_median,
        }
    # A 100-point distortion curve (analysis layer) from the cached sorts, against one warm-up of a fresh session.
    fresh = pl.PruneSession(model, device=device)
    t = time.perf_counter()
    fresh.prune("lamp", 0.5)
    warmup = time.perf_counter() - t
    t = time.perf_counter()
    curve = fresh.distortion_curve("lamp", np.linspace(0.0, 0.99, 100))
    out["curve_100_s"] = time.perf_counter() - t
    out["warmup_s"] = warmup
    out["curve_vs_warmup"] = out["curve_100_s"] / warmup
    assert curve["sparsity"].nunique() == 100
    del fresh
    out["cache_bytes"] = session.cache_nbytes()
    out["cache_vs_weights"] = out["cache_bytes"] / weight_bytes
    return out


def markdown(r: dict) -> str:
    m = r["machine"]
    where = m.get("gpu", m["cpu"])
    lines = [
        f"Model: {r['model']} ({r['prunable_weights'] / 1e6:.1f} M prunable weights), device {m['device']} "
        f"({where}; {m['cores']} cores, {m['torch_threads']} torch threads), torch {m['torch']}, "
        f"prune_lab {m['prune_lab']}.",
        "",
        f"`torch.nn.utils.prune.global_unstructured` (L1): median {r['torch_global_unstructured_s']['median']:.2f} s "
        f"per call ({len(r['torch_global_unstructured_s']['all'])} sparsities).",
        "",
        f"| method | warm sparsity change, median ({r['points']} sparsities) | max | × faster than torch | "
        f"cold first call | cold ÷ torch |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in r["methods"].items():
        lines.append(f"| {name} | {v['warm_median_ms']:.2f} ms | {v['warm_max_ms']:.2f} ms | "
                     f"{v['speedup_vs_torch']:.0f}× | {v['cold_s']:.2f} s | {v['cold_vs_torch']:.2f} |")
    lines += ["", f"Cache held after the three methods: {r['cache_bytes'] / 2**20:.0f} MiB = "
                  f"{r['cache_vs_weights']:.2f}× the weights' {r['weight_bytes'] / 2**20:.0f} MiB.",
              "", f"A 100-point single-layer distortion curve (`session.distortion_curve('lamp', …)`): "
                  f"{r['curve_100_s']:.2f} s, {r['curve_vs_warmup']:.2f}× one warm-up of a fresh session "
                  f"({r['warmup_s']:.2f} s)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="MobileNet-V3-small and fewer points: a smoke test")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    ap.add_argument("--points", type=int, default=25, help="sparsities for the warm timings")
    ap.add_argument("--torch-points", type=int, default=5, help="sparsities for torch.nn.utils.prune")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the results")
    args = ap.parse_args(argv)
    device = pl.engine.resolve_device(args.device)
    r = run(args.quick, device, args.torch_points if not args.quick else 2, args.points)
    stem = "slider_latency" + ("_quick" if args.quick else "") + ("" if device.type == "cpu" else f"_{device.type}")
    write_results(args.out, stem, r, markdown(r))
    return r


if __name__ == "__main__":
    main()
