"""What the benchmark and reproduction scripts share: a resumable cache of finished points (a CSV keyed by a hash
of the settings), writing a summary table, and writing a benchmark's results."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path


def points_key(cfg: dict) -> str:
    """A short, stable hash of the settings a point depends on."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


def read_points(path: Path, key: str) -> list:
    """The cached rows of ``path`` computed under settings ``key`` (none when the file is absent)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if row["key"] == key]


def write_table(path: Path, rows: list) -> None:
    """Write ``rows`` (dicts with the same keys) as a CSV with a header."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def write_results(out: Path, stem: str, result: dict, text: str) -> None:
    """A benchmark's results: ``<stem>.json`` (every number) and ``<stem>.md`` (what the README quotes), echoed."""
    import sys

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(text)
    sys.stdout.write(text)


def results_folder(args, name: str) -> tuple[Path, str, Path]:
    """A reproduction's ``(out folder, stem, points file)``: ``<out>/<name>[_quick]_points.csv``, the folder made."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_quick" if args.quick else name
    return out, stem, out / f"{stem}_points.csv"


def script_parser(doc: str, *, quick_help: str, data_root: Path | None = None):
    """The options every reproduction script takes: --quick, --out, --seeds (and --data-root for MNIST)."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="results folder")
    if data_root is not None:
        p.add_argument("--data-root", default=str(data_root), help="folder with the MNIST IDX files")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    return p


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), for the machine line of a benchmark."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
