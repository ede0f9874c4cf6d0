"""Dashboard latency on real models, through the dashboard object exactly as a notebook drives it.

Cases (one torch thread; torchvision models with random weights, no download):

- ``resnet50`` without data: magnitude, LAMP, LAP;
- ``vit_b_16`` without data: magnitude, LAMP, LAP;
- ``conv6`` trained on digits, with data (accuracy on the 450 test images, output distortion);
- the quick-start ``mlpnet`` on digits (the previous benchmark's model).

Per case: the time to build the lab (``PruneLab(session)``) beside the cold prunes of its selected methods on a
fresh session (the same run), then 30 slider moves — a seeded mix of drag steps (0.001–0.02) and jumps (up to
0.4) inside [0.3, 0.98] — each set on ``lab.slider.value`` as the browser does: *frame* is the time until the
fast panels for that value are on screen (layer sparsity, single-layer distortion, summary counts, the accuracy
marker), *everything* the time until the lab is idle again with everything drawn (after the ``debounce_s`` rest:
lookahead distortion, accuracy, output distortion). Budgets: frame ≤ 100 ms median and ≤ 250 ms p95; everything
≤ 1 s median on ResNet-50; build ≤ 1.5× the cold prunes.

    python benchmarks/lab_latency.py                 # all cases; writes benchmarks/results/lab_latency.{json,md}
    python benchmarks/lab_latency.py --cases resnet50 --moves 10
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import prune_lab as pl
from prune_lab.widgets import PruneLab

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers, beside this script
from _points import cpu_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEBOUNCE_S = 0.1


def _torchvision(name):
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval(), None


def _trained(name):
    data = pl.data.digits()
    return pl.pretrained(name, data, progress=False), data


CASES = {
    "resnet50": lambda: _torchvision("resnet50"),
    "vit_b_16": lambda: _torchvision("vit_b_16"),
    "conv6 on digits": lambda: _trained("conv6"),
    "mlpnet on digits": lambda: _trained("mlpnet"),
}


def moves(n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    s, out = 0.9, []
    for i in range(n):
        step = rng.uniform(0.05, 0.4) if i % 5 == 4 else rng.uniform(0.001, 0.02)
        s = s + step * rng.choice([-1, 1])
        s = float(np.clip(round(s, 3), 0.3, 0.98))
        if s == (out[-1] if out else 0.9):  # a move to the same value is no move
            s = round(s - 0.001, 3)
        out.append(s)
    return out


def run_case(name: str, n_moves: int) -> dict:
    model, data = CASES[name]()
    methods = ("magnitude", "lamp", "lap")
    cold = pl.PruneSession(model, data)
    t = time.perf_counter()
    for m in methods:
        cold.prune(m, 0.9)
    cold_s = time.perf_counter() - t
    del cold
    session = pl.PruneSession(model, data)
    t = time.perf_counter()
    lab = PruneLab(session, debounce_s=DEBOUNCE_S, selected=methods)
    build_s = time.perf_counter() - t
    assert lab.wait_idle(600), "the lab did not settle"
    first_idle_s = time.perf_counter() - t
    frame, full, look = [], [], []
    for v in moves(n_moves):
        n0 = len(lab.frames)
        lab.timings.pop("lookahead_s", None)
        t = time.perf_counter()
        lab.slider.value = v
        assert lab.wait_drawn(120)
        drawn = next(f[0] for f in lab.frames[n0:] if f[3] == "frame")
        frame.append(drawn - t)
        assert lab.wait_idle(600)
        full.append(time.perf_counter() - t)
        look.append(lab.timings.get("lookahead_s", 0.0))
        assert lab.state.error == "", lab.state.error
        assert f"sparsity={v:.3f}" in lab.state.status, (v, lab.state.status)
    lab.close()
    params = dict(model.named_parameters())
    n_weights = sum(params[n].numel() for n in session.layer_names)
    return {"case": name, "methods": list(methods), "layers": len(session.layer_names), "prunable_weights": n_weights,
            "data": data is not None, "cold_prunes_s": cold_s, "build_s": build_s,
            "build_over_cold": build_s / cold_s, "first_idle_s": first_idle_s, "moves": n_moves,
            "frame_median_ms": statistics.median(frame) * 1e3, "frame_p95_ms": float(np.percentile(frame, 95)) * 1e3,
            "frame_max_ms": max(frame) * 1e3, "everything_median_s": statistics.median(full),
            "everything_p95_s": float(np.percentile(full, 95)), "lookahead_median_s": statistics.median(look),
            "debounce_s": DEBOUNCE_S}


def lookahead_paths(n_points: int = 6) -> dict:
    """ResNet-50, magnitude/LAMP/LAP at a few resting points: the lookahead distortion of every layer computed
    directly (three-layer products per layer, as before this cache) vs from the cached factors and references."""
    from prune_lab.core.distortion import lookahead_distortion
    from prune_lab.core.neighbours import bn_scales

    model, _ = _torchvision("resnet50")
    session = pl.PruneSession(model)
    points = moves(n_points, seed=1)
    results = {(m, s): session.prune(m, s) for m in ("magnitude", "lamp", "lap") for s in points}
    weights = {n: p.detach() for n, p in model.named_parameters() if n in session.graph.layers}
    modules = dict(model.named_modules())
    scales = bn_scales(model, {b: modules[b] for b in session.graph.bn_modules})
    t = time.perf_counter()
    direct = {}
    for (m, s), r in list(results.items())[:3]:  # the direct path is slow: three points are enough to time it
        direct[(m, s)] = [lookahead_distortion(session.graph, weights, n, weights[n] * r.masks[n], scales)
                          for n in r.layers]
    direct_s = (time.perf_counter() - t) / 3
    t = time.perf_counter()
    session.distortion(results[next(iter(results))], output=False)
    factors_s = time.perf_counter() - t
    cached = []
    for key, r in results.items():
        t = time.perf_counter()
        df = session.distortion(r, output=False)
        cached.append(time.perf_counter() - t)
        if key in direct:
            got = df[df.layer != "(model)"]["lookahead"].to_numpy()
            assert np.allclose(got, direct[key], rtol=1e-4), "cached lookahead differs from the direct product"
    return {"direct_per_method_s": direct_s, "factors_first_call_s": factors_s,
            "cached_per_method_median_s": statistics.median(cached), "points": points}


def machine() -> dict:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "load_average_1min_start": os.getloadavg()[0]}


def to_markdown(rows: list, m: dict, look: dict | None = None) -> str:
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch thread, torch {m['torch']}, "
             f"1-min load average {m['load_average_1min_start']:.1f} at the start, "
             f"{m.get('load_average_1min_end', float('nan')):.1f} at the end; no GPU. Rest delay (debounce) "
             f"{DEBOUNCE_S} s, included in *everything*.", "",
             "| model | layers | weights | frame median | frame p95 | everything median (p95) | lookahead at rest, "
             "median | build | cold prunes | build ÷ cold |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']}{'' if r['data'] else ' (no data)'} | {r['layers']} | "
                     f"{r['prunable_weights'] / 1e6:.1f} M | {r['frame_median_ms']:.0f} ms | {r['frame_p95_ms']:.0f} ms "
                     f"| {r['everything_median_s']:.2f} s ({r['everything_p95_s']:.2f} s) | "
                     f"{r['lookahead_median_s']:.2f} s | {r['build_s']:.1f} s | {r['cold_prunes_s']:.1f} s | "
                     f"{r['build_over_cold']:.2f} |")
    lines += ["", f"{rows[0]['moves']} slider moves per model (magnitude, LAMP, LAP): drag steps of 0.001–0.02 "
                  "and every fifth a jump of 0.05–0.4, inside [0.3, 0.98]."]
    if look:
        lines += ["", f"Lookahead distortion of every ResNet-50 layer for one method at one sparsity: "
                      f"{look['direct_per_method_s']:.2f} s as direct three-layer products (the previous lab did "
                      f"this for every method at every move), {look['cached_per_method_median_s']:.2f} s median from "
                      f"the cached factors over {len(look['points'])} resting points × 3 methods "
                      f"({look['direct_per_method_s'] / look['cached_per_method_median_s']:.0f}× faster; same values "
                      f"to 1e-4), after {look['factors_first_call_s']:.1f} s building the factors once."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES), metavar="CASE")
    ap.add_argument("--moves", type=int, default=30)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-lookahead-paths", action="store_true", help="skip the direct-vs-cached lookahead timing")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    m = machine()
    rows = []
    for name in args.cases:
        r = run_case(name, args.moves)
        rows.append(r)
        sys.stdout.write(json.dumps(r) + "\n")
    look = None if args.no_lookahead_paths else lookahead_paths()
    m["load_average_1min_end"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lab_latency.json").write_text(json.dumps({"machine": m, "cases": rows, "lookahead": look},
                                                          indent=2))
    md = to_markdown(rows, m, look)
    (args.out / "lab_latency.md").write_text(md)
    sys.stdout.write(md)
    return rows


if __name__ == "__main__":
    main()
