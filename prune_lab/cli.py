"""The ``prune-lab`` command: the engine without a notebook.

    prune-lab methods                                   # the registry: methods, labels, allocations, papers
    prune-lab prune --method lamp lap --sparsity 0.5 0.9 0.98          # pretrained mlpnet on digits
    prune-lab prune --model torchvision:resnet18 --data none --method global_magnitude --sparsity 0.8
    prune-lab report --model mlpnet --data digits --methods magnitude,global_magnitude,lamp,lap --out figures/
    prune-lab sweep examples/sweep.yaml --backend ray --address auto   # methods × sparsities × seeds on a cluster
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import data as pl_data
from . import models as pl_models
from .core.allocation import get_allocation, list_allocations
from .analysis import PruneSession
from .methods import get_method, list_methods
from .training import pretrained

DATASETS = {"digits": pl_data.digits, "mnist": pl_data.mnist, "fashion_mnist": pl_data.fashion_mnist,
            "cifar10": pl_data.cifar10}


def methods_table() -> pd.DataFrame:
    rows = []
    for name in list_methods():
        spec = get_method(name)
        rows.append({"method": name, "label": spec.label, "default allocation": spec.default_allocation,
                     "needs": ",".join(sorted(spec.needs)) or "-",
                     "sparsity-dependent": spec.sparsity_dependent, "reference": spec.reference})
    return pd.DataFrame(rows)


def _load_model(name: str, bundle, device: str):
    if name.startswith("torchvision:") or (name not in pl_models.list_models()
                                           and hasattr(__import__("torchvision").models, name)):
        import torchvision

        arch = name.split(":", 1)[-1]
        torch.manual_seed(0)
        return getattr(torchvision.models, arch)().eval(), False
    return pretrained(name, bundle, device=device), True


def cmd_prune(args) -> int:
    bundle = None
    if args.data != "none":
        maker = DATASETS[args.data]
        bundle = maker(root=args.data_root) if args.data != "digits" else maker()
    model, trained = _load_model(args.model, bundle, args.device)
    session = PruneSession(model, bundle if trained else None, device=args.device)
    evaluate = args.evaluate and trained
    rows = []
    points = [(m, s) for m in args.method for s in args.sparsity]
    for method, s in tqdm(points, desc="pruning", disable=not args.progress):
        res = session.prune(method, s, allocation=args.allocation)
        row = {"method": method, "allocation": res.allocation, "sparsity": round(res.sparsity, 4)}
        if evaluate:
            row.update(session.evaluate(res))
        if args.layers:
            row.update({f"s[{n}]": round(v, 3) for n, v in res.layer_sparsity.items()})
        rows.append(row)
    if evaluate:
        dense = session.evaluate(None)
        rows.insert(0, {"method": "dense", "allocation": "-", "sparsity": 0.0, **dense})
    with pd.option_context("display.max_columns", None, "display.width", 200):
        print(pd.DataFrame(rows).to_string(index=False))
    return 0


def cmd_report(args) -> int:
    """The lab's figures and tables without Jupyter: layer sparsity, distortion and accuracy curves (no accuracy
    figure with ``--data none``: a torchvision architecture at random init, data-free methods only)."""
    import json

    from . import __version__
    from .analysis import layer_table
    from .viz import plot_accuracy_curve, plot_distortion, plot_layer_sparsity, save_figure

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        get_method(m)
    if args.data == "none":
        bundle = None
        if not (args.model.startswith("torchvision:") or args.model not in pl_models.list_models()):
            raise ValueError(f"--data none: the zoo model {args.model!r} is trained on data; use a torchvision "
                             f"architecture (e.g. torchvision:resnet50, random init) or give --data.")
    else:
        maker = DATASETS[args.data]
        bundle = maker(root=args.data_root) if args.data != "digits" else maker()
    model, _ = _load_model(args.model, bundle, args.device)
    session = PruneSession(model, bundle, device=args.device)
    out = Path(args.out)
    grid = sorted(set(args.grid) | {args.sparsity})
    results = {m: session.prune(m, args.sparsity, allocation=args.allocation) for m in methods}
    table = layer_table(results).assign(method=lambda d: d.label)
    dist = pd.concat([session.distortion(r).assign(method=m) for m, r in
                      tqdm(results.items(), desc="distortion", disable=not args.progress)], ignore_index=True)
    written = []
    written += save_figure(plot_layer_sparsity(table, title=f"Layerwise sparsity at {args.sparsity:g}"),
                           out / "layer_sparsity")
    written += save_figure(plot_distortion(dist), out / "distortion")
    if bundle is not None:
        curve = session.sweep(methods, grid, allocations=args.allocation, progress=args.progress)
        written += save_figure(plot_accuracy_curve(curve, current=args.sparsity if args.current_line else None,
                                                   dense=session.evaluate()["accuracy"]), out / "accuracy")
    dist.to_csv(out / "distortion_table.csv", index=False)
    settings = {"model": args.model, "data": args.data, "model_fingerprint": session.fingerprint,
                "methods": methods, "allocation": args.allocation, "sparsity": args.sparsity,
                "grid": grid if bundle is not None else None,
                "prune_lab_version": __version__}
    (out / "settings.json").write_text(json.dumps(settings, indent=2))
    print(f"wrote {len(written) + 2} files to {out.resolve()}")
    return 0


#: the keys of a sweep configuration file, with their defaults
SWEEP_CONFIG = {"model": "mlpnet", "data": "digits", "data_root": None, "device": "auto",
                "methods": ["magnitude", "lamp"], "allocations": None, "sparsities": [0.5, 0.8, 0.9],
                "seeds": [0], "finetune": None, "recalibrate_bn": False, "hyperparameters": {},
                "backend": "local", "workers": None, "address": None, "retries": 3,
                "cache_dir": None, "out": "sweep.csv"}


def load_sweep_config(path) -> dict:
    """A sweep configuration (YAML) merged over :data:`SWEEP_CONFIG`; unknown keys are an error."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep configuration {str(path)!r} not found.")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: a sweep configuration is a mapping of keys ({', '.join(SWEEP_CONFIG)}).")
    unknown = sorted(set(loaded) - set(SWEEP_CONFIG))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: "
                         f"{', '.join(SWEEP_CONFIG)}.")
    return {**SWEEP_CONFIG, **loaded}


def cmd_sweep(args) -> int:
    """Accuracy over methods × allocations × sparsities × seeds (× fine-tuning), locally or on a Ray cluster."""

    cfg = load_sweep_config(args.config)
    for key in ("backend", "address", "workers", "cache_dir", "out"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if cfg["data"] not in DATASETS:
        raise ValueError(f"data {cfg['data']!r} is not one of {', '.join(DATASETS)}.")
    maker = DATASETS[cfg["data"]]
    bundle = maker(root=cfg["data_root"]) if cfg["data"] != "digits" else maker()
    model, _ = _load_model(cfg["model"], bundle, cfg["device"])
    session = PruneSession(model, bundle, device=cfg["device"])
    df = session.sweep(cfg["methods"], cfg["sparsities"], allocations=cfg["allocations"], seeds=cfg["seeds"],
                       finetune=cfg["finetune"], recalibrate_bn=cfg["recalibrate_bn"], progress=args.progress,
                       backend=cfg["backend"], workers=cfg["workers"], address=cfg["address"],
                       retries=cfg["retries"], cache_dir=cfg["cache_dir"], **(cfg["hyperparameters"] or {}))
    out = Path(cfg["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    with pd.option_context("display.max_columns", None, "display.width", 200):
        print(df.to_string(index=False))
    print(f"{len(df)} rows ({df.attrs['computed']} points computed, {df.attrs['cached']} from the cache) "
          f"written to {out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="prune-lab", description="Prune neural networks and compare methods.")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list the registered methods and allocations")
    p = sub.add_parser("prune", help="prune a model at one or more sparsities and report per method")
    p.add_argument("--model", default="mlpnet",
                   help=f"a zoo model ({', '.join(pl_models.list_models())}) trained once and cached, or a "
                        f"torchvision architecture (torchvision:resnet18), random init")
    p.add_argument("--data", default="digits", choices=[*DATASETS, "none"])
    p.add_argument("--data-root", default=None, help="folder holding the dataset files")
    p.add_argument("--method", nargs="+", default=["magnitude", "lamp", "lap"], choices=list_methods())
    p.add_argument("--sparsity", nargs="+", type=float, default=[0.5, 0.9])
    p.add_argument("--allocation", default=None, choices=list_allocations(),
                   help="default: each method's paper's allocation")
    p.add_argument("--device", default="auto")
    p.add_argument("--layers", action="store_true", help="also print each layer's sparsity")
    p.add_argument("--no-evaluate", dest="evaluate", action="store_false")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    r = sub.add_parser("report", help="write the lab's figures (PNG/PDF/SVG) and tables (CSV) to a folder")
    r.add_argument("--model", default="mlpnet")
    r.add_argument("--data", default="digits", choices=[*DATASETS, "none"],
                   help="none: no accuracy figure (a torchvision architecture at random init)")
    r.add_argument("--data-root", default=None)
    r.add_argument("--methods", default="magnitude,global_magnitude,lamp,lap", help="comma-separated")
    r.add_argument("--allocation", default=None, choices=list_allocations())
    r.add_argument("--sparsity", type=float, default=0.9, help="for the per-layer panels")
    r.add_argument("--grid", nargs="+", type=float, default=[0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98])
    r.add_argument("--out", default="figures")
    r.add_argument("--current-line", action="store_true",
                   help="mark --sparsity on the accuracy figure (off by default: a figure for a paper)")
    r.add_argument("--device", default="auto")
    r.add_argument("--no-progress", dest="progress", action="store_false")
    w = sub.add_parser("sweep", help="run a sweep from a YAML configuration, locally or on a Ray cluster")
    w.add_argument("config", help=f"YAML file with keys {', '.join(SWEEP_CONFIG)} (see examples/sweep.yaml)")
    w.add_argument("--backend", default=None, choices=["local", "ray"], help="overrides the configuration's")
    w.add_argument("--address", default=None, help="Ray cluster address: auto, ray://head:10001, …")
    w.add_argument("--workers", type=int, default=None, help="processes for backend local")
    w.add_argument("--cache-dir", dest="cache_dir", default=None,
                   help="result store folder (on a cluster: a path every node sees)")
    w.add_argument("--out", default=None, help="CSV file for the results")
    w.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    if args.command == "methods":
        with pd.option_context("display.max_colwidth", 80, "display.width", 200):
            print(methods_table().to_string(index=False))
            print("\nallocations:", ", ".join(f"{a} ({get_allocation(a).label})" for a in list_allocations()))
        return 0
    try:
        return {"report": cmd_report, "sweep": cmd_sweep, "prune": cmd_prune}[args.command](args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"prune-lab: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
