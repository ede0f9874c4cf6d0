"""Dashboard responsiveness: how long after a slider move the live panels are re-drawn.

The quick-start setting (mlpnet on digits, the lab with magnitude, LAMP and LAP): the slider is moved to 25
sparsities; each move's time covers the engine lookups, the distortion table, updating and rendering the two live
panels (layer sparsity, distortion) to PNG, and the summary. Accuracy evaluation is debounced (after the drag) and
timed separately. Target: ≤ 200 ms per move.

    python benchmarks/lab_latency.py            # writes benchmarks/results/lab_latency.{json,md}
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import prune_lab as pl
from prune_lab.widgets import PruneLab

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None):
    data = pl.data.digits()
    model = pl.pretrained("mlpnet", data, progress=False)
    session = pl.PruneSession(model, data, device="cpu")
    lab = PruneLab(session, debounce_s=0)
    lab.debounce_s = 3600  # time the drag alone; evaluation is measured below
    moves = np.linspace(0.3, 0.98, 25).tolist()
    times = []
    for s in moves:
        t = time.perf_counter()
        lab.slider.value = s
        times.append(time.perf_counter() - t)
        lab._timer.cancel()
        assert lab.state.error == "", lab.state.error
    t = time.perf_counter()
    lab.refresh_accuracy()
    settle = time.perf_counter() - t
    r = {"model": "mlpnet on digits", "methods": list(lab.state.methods), "moves": len(moves),
         "redraw_median_ms": statistics.median(times) * 1e3, "redraw_p90_ms": float(np.percentile(times, 90)) * 1e3,
         "redraw_max_ms": max(times) * 1e3, "settle_refresh_ms": settle * 1e3,
         "machine": {"cpu": platform.processor(), "cores": os.cpu_count(), "python": platform.python_version(),
                     "load_average_1min": os.getloadavg()[0]}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lab_latency.json").write_text(json.dumps(r, indent=2))
    md = (f"Lab redraw after a slider move ({r['model']}, {', '.join(r['methods'])}; {r['moves']} moves, "
          f"{r['machine']['cores']} cores, 1-min load average {r['machine']['load_average_1min']:.1f}): median "
          f"{r['redraw_median_ms']:.0f} ms, 90th percentile {r['redraw_p90_ms']:.0f} ms, max "
          f"{r['redraw_max_ms']:.0f} ms. Accuracy refresh after the drag settles (cached grid + current point): "
          f"{r['settle_refresh_ms']:.0f} ms.\n")
    (RESULTS / "lab_latency.md").write_text(md)
    sys.stdout.write(md)
    return r


if __name__ == "__main__":
    main()
