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
