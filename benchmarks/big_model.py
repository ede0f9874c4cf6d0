"""Big models: time and peak memory of a global threshold on a synthetic model of ≥ 300 M weights, prune_lab beside
``torch.nn.utils.prune.global_unstructured``.

The model: a chain of 64 ``nn.Linear`` layers (no biases) of varied shapes, widths cycling through 1024…4096, and
a 32000 × 1024 output layer: 301 M weights (1.2 GB in float32), seeded normal weights, never run.
Every measurement runs in a subprocess of its own that builds the model, then measures the peak resident memory
(``VmHWM`` of ``/proc/self/status``, reset through ``/proc/self/clear_refs`` once the model is built; a 5 ms
``VmRSS`` sampler as a cross-check) as an increment over the process's memory with the model built, and as a
multiple of the prunable weights' bytes:

- ``prune_lab`` ``global_magnitude`` and ``lamp``: a fresh ``PruneSession`` and its first ``prune(…, 0.9)`` (cold:
  graph, fingerprint, scores, sort, threshold), then sparsity changes on the warm session (median of 8), the
  cache it holds (``cache_nbytes``) and building the masks of one result;
- ``torch.nn.utils.prune.global_unstructured(…, pruning_method=L1Unstructured, amount=0.9)`` on the same model: it
  concatenates every weight's score, selects with ``topk``, and attaches ``weight_orig`` + a float ``weight_mask``
  to every layer (the model grows by the masks);
- the same in bfloat16 (the model built in bfloat16).

The per-layer counts of prune_lab's ``global_magnitude`` are compared with torch's masks (equal, or different
only among weights tied with the threshold's magnitude, where torch's ``topk`` picks arbitrarily).

Results: ``benchmarks/results/big_model.json`` and ``.md`` (quoted in the README).

    python benchmarks/big_model.py            # the full run (about 5 min on a 2-core CPU; peak ~16 GiB: torch)
    python benchmarks/big_model.py --quick    # 5 M weights, seconds (a smoke test; tests/benchmarks runs it)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers, beside this script
from _points import write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WIDTHS = (1024, 4096, 1024, 2048, 3072, 1024, 1536, 4096, 2048)  # the chain cycles through these widths
OUTPUT = 32000  # one wide output layer (the largest layer)
TARGET = 300_000_000
QUICK_SCALE = 8  # --quick: widths ÷ 8, weights ÷ 64
WARM = (0.5, 0.6, 0.7, 0.8, 0.85, 0.95, 0.98, 0.9)
RUNS = [  # (tool, method, dtype)
    ("prune_lab", "global_magnitude", "float32"),
    ("prune_lab", "lamp", "float32"),
    ("torch", "l1_unstructured", "float32"),
    ("prune_lab", "global_magnitude", "bfloat16"),
    ("prune_lab", "lamp", "bfloat16"),
    ("torch", "l1_unstructured", "bfloat16"),
]


# ---------------------------------------------------------------------------------------------------------------
# the model and memory readings (in the worker)
# ---------------------------------------------------------------------------------------------------------------
def shapes(quick: bool) -> list:
    """``[(out, in), ...]`` of the chain: widths cycling through WIDTHS until TARGET weights with the OUTPUT layer
    (after a layer of width WIDTHS[0])."""
    scale = QUICK_SCALE if quick else 1
    target = TARGET // scale**2
    widths = [WIDTHS[0] // scale]
    total, i = 0, 1
    while total + widths[-1] * (OUTPUT // scale) < target or widths[-1] != WIDTHS[0] // scale:
        widths.append(WIDTHS[i % len(WIDTHS)] // scale)
        total += widths[-1] * widths[-2]
        i += 1
    out = [(b, a) for a, b in zip(widths[:-1], widths[1:])]
    return out + [(OUTPUT // scale, widths[-1])]


def build_model(quick: bool, dtype: torch.dtype, seed: int = 0) -> torch.nn.Sequential:
    """Seeded normal weights (std 1/√fan_in), layer by layer in ``dtype`` (no float32 copy of the whole model)."""
    layers = []
    g = torch.Generator().manual_seed(seed)
    for out_f, in_f in shapes(quick):
        lin = torch.nn.Linear(in_f, out_f, bias=False, device="meta")
        w = torch.empty(out_f, in_f, dtype=torch.float32).normal_(0.0, in_f ** -0.5, generator=g)
        lin.weight = torch.nn.Parameter(w.to(dtype) if dtype != torch.float32 else w)
        del w
        layers.append(lin)
    return torch.nn.Sequential(*layers).eval()


def _status(field: str) -> int:
    """``VmHWM`` / ``VmRSS`` of this process in bytes (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _trim():
    gc.collect()
    try:  # give freed heap memory back to the system, so the next phase starts from the live memory
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Peak:
    """Peak resident memory over a block: the kernel's high-water mark (reset at entry) and a 5 ms sampler."""

    def __enter__(self):
        _trim()
        self.base = _status("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.hwm_ok = True
        except OSError:
            self.hwm_ok = False
        self.sampled = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.sampled = max(self.sampled, _status("VmRSS"))

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.sampled, _status("VmHWM") if self.hwm_ok else 0)
        self.increment = self.peak - self.base
        return False

    def record(self, weight_bytes: int) -> dict:
        return {"seconds": self.seconds, "peak_rss_bytes": self.peak, "base_rss_bytes": self.base,
                "increment_bytes": self.increment, "increment_vs_weights": self.increment / weight_bytes,
                "peak_source": "VmHWM" if self.hwm_ok else "VmRSS sampled every 5 ms"}


# ---------------------------------------------------------------------------------------------------------------
# workers (one subprocess each)
# ---------------------------------------------------------------------------------------------------------------
def worker_prune_lab(model, method: str, weight_bytes: int, n_weights: int) -> dict:
    import prune_lab as pl

    out = {}
    with Peak() as p:
        session = pl.PruneSession(model, device="cpu")
        res = session.prune(method, 0.9)
    out["cold"] = p.record(weight_bytes)
    out["counts"] = [int(c) for c in res.pruned]
    out["sparsity"] = res.sparsity
    out["cache_bytes"] = session.cache_nbytes()
    out["cache_bytes_per_weight"] = out["cache_bytes"] / n_weights
    out["cache_vs_weights"] = out["cache_bytes"] / weight_bytes
    warm = []
    with Peak() as p:
        for s in WARM:
            t = time.perf_counter()
            r = session.prune(method, s)
            warm.append(time.perf_counter() - t)
            assert abs(r.sparsity - s) < 1e-6, (r.sparsity, s)
    out["warm"] = p.record(weight_bytes)
    out["warm"].update({"median_ms": statistics.median(warm) * 1e3, "max_ms": max(warm) * 1e3,
                        "all_ms": [x * 1e3 for x in warm], "sparsities": list(WARM)})
    res = session.prune(method, 0.9)
    with Peak() as p:
        masks = res.masks
    out["masks"] = p.record(weight_bytes)
    if method == "global_magnitude":  # weights tied with the threshold's magnitude, per layer (for the comparison)
        t = max(float(w.detach().abs()[~masks[n]].max()) for n, w in session.snapshot.params.items()
                if (~masks[n]).any())
        out["threshold"] = t
        out["tied_with_threshold"] = [int((w.detach().abs() == t).sum()) for w in session.snapshot.params.values()]
    return out


def worker_torch(model, weight_bytes: int) -> dict:
    import torch.nn.utils.prune as torch_prune

    params = [(m, "weight") for m in model if isinstance(m, torch.nn.Linear)]
    out = {}
    try:
        with Peak() as p:
            torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=0.9)
    except Exception as exc:  # noqa: BLE001 - reported, not hidden (e.g. a dtype torch does not support)
        return {"error": f"{type(exc).__name__}: {exc}"}
    out["cold"] = p.record(weight_bytes)
    out["counts"] = [int((m.weight_mask == 0).sum()) for m, _ in params]
    out["sparsity"] = sum(out["counts"]) / sum(m.weight_mask.numel() for m, _ in params)
    return out


def worker(tool: str, method: str, dtype_name: str, quick: bool) -> dict:
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    t = time.perf_counter()
    model = build_model(quick, dtype)
    build_s = time.perf_counter() - t
    weights = [m.weight for m in model]
    n_weights = sum(w.numel() for w in weights)
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    del weights
    _trim()
    out = {"tool": tool, "method": method, "dtype": dtype_name, "n_weights": n_weights, "weight_bytes": weight_bytes,
           "layers": len(model), "largest_layer": max(m.weight.numel() for m in model), "build_s": build_s,
           "rss_with_model_bytes": _status("VmRSS"), "torch_threads": torch.get_num_threads()}
    if tool == "prune_lab":
        out.update(worker_prune_lab(model, method, weight_bytes, n_weights))
    else:
        out.update(worker_torch(model, weight_bytes))
    out["peak_rss_bytes"] = max(v["peak_rss_bytes"] for v in out.values() if isinstance(v, dict) and
                                "peak_rss_bytes" in v) if "error" not in out else _status("VmHWM")
    return out


# ---------------------------------------------------------------------------------------------------------------
# the parent: subprocesses, comparison, files
# ---------------------------------------------------------------------------------------------------------------
def machine() -> dict:
    """slider_latency's machine description plus the total memory."""
    from slider_latency import machine as describe

    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {**describe(torch.device("cpu")), "ram_bytes": mem}


def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def run_worker(tool, method, dtype, quick, timeout=3600) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, method, dtype] + (["--quick"] if quick
                                                                                            else [])
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        return {"tool": tool, "method": method, "dtype": dtype,
                "error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare_counts(pl_run: dict, torch_run: dict) -> dict:
    """Equal per-layer counts, or different only within the weights tied with the threshold's magnitude."""
    if "counts" not in torch_run or "counts" not in pl_run:
        return {"comparable": False}
    a, b = pl_run["counts"], torch_run["counts"]
    ties = pl_run.get("tied_with_threshold", [0] * len(a))
    diff = [abs(x - y) for x, y in zip(a, b)]
    return {"comparable": True, "identical": a == b, "same_total": sum(a) == sum(b),
            "layers_differing": sum(d > 0 for d in diff), "max_layer_difference": max(diff),
            "within_threshold_ties": sum(a) == sum(b) and all(d <= t for d, t in zip(diff, ties)),
            "weights_tied_with_threshold": sum(ties)}


def run(quick: bool, jobs: int = 1) -> dict:
    """Every (tool, method, dtype) of RUNS in a subprocess of its own; ``jobs`` > 1 runs that many at once (for
    the smoke test only: measurements then share the machine)."""
    from concurrent.futures import ThreadPoolExecutor

    out = {"quick": quick, "jobs": jobs, "machine": machine(), "load_before": load()}

    def one(spec):
        t = time.perf_counter()
        r = run_worker(*spec, quick)
        r["wall_s"] = time.perf_counter() - t
        sys.stderr.write(f"{' '.join(spec)}: {r.get('error') or format(r['cold']['seconds'], '.2f') + ' s'}\n")
        return r

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        out["runs"] = list(pool.map(one, RUNS))
    out["load_after"] = load()
    first = out["runs"][0]
    out["model"] = {"n_weights": first.get("n_weights"), "layers": first.get("layers"),
                    "largest_layer": first.get("largest_layer"), "weight_bytes_float32": first.get("weight_bytes"),
                    "shapes": shapes(quick)}
    by = {(r["tool"], r["method"], r["dtype"]): r for r in out["runs"]}
    out["counts_vs_torch"] = {}
    for dtype in ("float32", "bfloat16"):
        p, t = by.get(("prune_lab", "global_magnitude", dtype)), by.get(("torch", "l1_unstructured", dtype))
        if p and t and "error" not in p:
            out["counts_vs_torch"][dtype] = compare_counts(p, t)
    return out


def _gib(b):
    return b / 2**30


def markdown(r: dict) -> str:
    m, mod = r["machine"], r["model"]
    top = max(r["runs"], key=lambda x: x.get("peak_rss_bytes", 0))
    lines = [
        f"Model: a chain of {mod['layers']} `nn.Linear` layers (no biases; widths 1024–4096 and a "
        f"{OUTPUT if not r['quick'] else OUTPUT // QUICK_SCALE}-wide output layer), "
        f"{mod['n_weights'] / 1e6:.0f} M weights ({_gib(mod['weight_bytes_float32']):.2f} GiB in float32; largest "
        f"layer {mod['largest_layer'] / 1e6:.1f} M), seeded normal weights, never run. CPU: {m['cpu']}, {m['cores']} "
        f"cores ({m['torch_threads']} torch threads), {_gib(m['ram_bytes']):.0f} GiB RAM, torch {m['torch']}, "
        f"prune_lab {m['prune_lab']}. Load average (1/5/15 min) before: {r['load_before']}, after: "
        f"{r['load_after']}." + (f" ({r['jobs']} runs at once: a smoke test, not a measurement.)" if r["jobs"] > 1
                                  else ""),
        "",
        "Each row ran in a subprocess of its own; peak memory is the process's peak resident memory (VmHWM, reset "
        "after the model was built) minus its memory with the model built, and that increment ÷ the weights' "
        f"bytes. The highest resident memory of the run: {_gib(top.get('peak_rss_bytes', 0)):.1f} GiB "
        f"({top['tool']}, {top['dtype']}).",
        "",
        "| tool | dtype | first prune at 90 % (cold) | peak memory increment | ÷ weights' bytes | warm sparsity "
        "change (median of 8) | cache held | cache ÷ weights | building the masks |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in r["runs"]:
        name = "torch `global_unstructured` (L1)" if x["tool"] == "torch" else f"prune_lab `{x['method']}`"
        if "error" in x:
            lines.append(f"| {name} | {x['dtype']} | failed: {x['error'].splitlines()[-1][:120]} | | | | | | |")
            continue
        c = x["cold"]
        warm = f"{x['warm']['median_ms']:.1f} ms" if "warm" in x else "— (a new call per sparsity)"
        cache = (f"{_gib(x['cache_bytes']):.2f} GiB ({x['cache_bytes_per_weight']:.2f} B/weight)"
                 if "cache_bytes" in x else "masks + weight_orig on the model")
        ratio = f"{x['cache_vs_weights']:.2f}×" if "cache_vs_weights" in x else "—"
        masks = (f"{x['masks']['seconds']:.2f} s, +{_gib(x['masks']['increment_bytes']):.2f} GiB"
                 if "masks" in x else "(included)")
        lines.append(f"| {name} | {x['dtype']} | {c['seconds']:.1f} s | {_gib(c['increment_bytes']):.2f} GiB | "
                     f"{c['increment_vs_weights']:.2f}× | {warm} | {cache} | {ratio} | {masks} |")
    lines.append("")
    for dtype, cmp in r.get("counts_vs_torch", {}).items():
        if not cmp.get("comparable"):
            continue
        if cmp["identical"]:
            lines.append(f"Per-layer pruned counts, prune_lab `global_magnitude` vs torch's masks ({dtype}): "
                         f"identical in all {mod['layers']} layers.")
        else:
            lines.append(f"Per-layer pruned counts, prune_lab `global_magnitude` vs torch's masks ({dtype}): same "
                         f"total; {cmp['layers_differing']} layers differ by at most {cmp['max_layer_difference']}, "
                         f"{'all' if cmp['within_threshold_ties'] else 'NOT all'} within the "
                         f"{cmp['weights_tied_with_threshold']} weights whose magnitude equals the threshold "
                         f"(prune_lab breaks ties by layer and position, torch's `topk` arbitrarily).")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5 M weights: a smoke test")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the results")
    ap.add_argument("--jobs", type=int, default=1, help="subprocesses at once (default 1: clean measurements)")
    ap.add_argument("--worker", nargs=3, metavar=("TOOL", "METHOD", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        sys.stdout.write(json.dumps(worker(*args.worker, quick=args.quick)) + "\n")
        return None
    r = run(args.quick, args.jobs)
    write_results(args.out, "big_model" + ("_quick" if args.quick else ""), r, markdown(r))
    return r


if __name__ == "__main__":
    main()
