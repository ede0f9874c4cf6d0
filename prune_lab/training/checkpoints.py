"""``pretrained(name, data)``: build a zoo model, train it once with a tested recipe, cache the weights on disk.

The cache key hashes the model name and builder arguments, the content of the data (``data_identity``), the
training settings and the library version, so any change retrains. Each file stores a SHA-256 of its tensors;
a file that cannot be read or does not match its checksum is reported with a warning and retrained, never used.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..data import DataBundle, data_identity
from ..models import create, shape_kwargs
from .loop import resolve_device, train

__all__ = ["RECIPES", "DEFAULT_RECIPE", "recipe", "default_cache_dir", "pretrained", "checkpoint_path"]

_FORMAT = "prune_lab.checkpoint/1"

#: Training settings used by :func:`pretrained` per (model, dataset name); measured on a 2-core CPU.
RECIPES: dict[tuple[str, str], dict] = {
    # digits: 1,347 train images, 880 steps; 96.9-98.0 % test accuracy over seeds 0-4, ~1 s on an idle 2-core CPU
    ("mlpnet", "digits"): {"epochs": 40, "optimizer": "adam", "lr": 3e-3, "batch_size": 64},
    # MNIST (full 60k, or the 8,000-image split of the t10k files): 94.05-94.2 % on the t10k split (seeds 0-2)
    ("mlpnet", "mnist"): {"epochs": 20, "optimizer": "adam", "lr": 1e-3, "batch_size": 64},
    # LAP, Table 1: Adam lr 1.2e-3, batch 60, 50k steps (minutes on a CPU)
    ("fcn", "mnist"): {"steps": 50_000, "optimizer": "adam", "lr": 1.2e-3, "batch_size": 60},
}
DEFAULT_RECIPE: dict = {"epochs": 10, "optimizer": "adam", "lr": 1e-3, "batch_size": 128}

_NOT_IN_KEY = ("progress", "device")  # do not change the trained weights (up to device numerics)


def recipe(name: str, data_name: str) -> dict:
    """The default training settings :func:`pretrained` uses for model ``name`` on the dataset ``data_name``.

    >>> recipe("mlpnet", "digits")["optimizer"]
    'adam'
    """
    return dict(RECIPES.get((name, data_name), DEFAULT_RECIPE))


def default_cache_dir() -> Path:
    """``$PRUNE_LAB_CACHE`` when set, else ``~/.cache/prune_lab/checkpoints`` (read at call time).

    >>> default_cache_dir().name in ("checkpoints", os.environ.get("PRUNE_LAB_CACHE", "checkpoints").rstrip("/").split("/")[-1])
    True
    """
    return Path(os.environ.get("PRUNE_LAB_CACHE") or "~/.cache/prune_lab/checkpoints").expanduser()


def _version() -> str:
    try:
        from .._version import __version__
    except ImportError:  # pragma: no cover - the file ships with the package
        return "unknown"
    return str(__version__)


def _state_checksum(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _settings(name: str, data: DataBundle, model_kw: dict | None, seed: int, train_kw: dict):
    for bad in ("masks", "on_step"):
        if bad in train_kw:
            raise TypeError(f"pretrained() does not accept {bad}=; train the returned model with train() instead")
    kwargs = {**shape_kwargs(name, data.input_shape, data.num_classes), **(model_kw or {})}
    base = recipe(name, data.name)
    if "steps" in train_kw or "epochs" in train_kw:  # the caller's length replaces the recipe's
        base.pop("steps", None)
        base.pop("epochs", None)
    settings = {**base, **train_kw}
    key_obj = {
        "model": name,
        "model_kw": kwargs,
        "data": data_identity(data),
        "train": {k: v for k, v in sorted(settings.items()) if k not in _NOT_IN_KEY},
        "seed": int(seed),
        "version": _version(),
    }
    key = hashlib.sha256(json.dumps(key_obj, sort_keys=True, default=repr).encode()).hexdigest()[:20]
    return kwargs, settings, key, key_obj


def checkpoint_path(name: str, data: DataBundle, *, cache_dir=None, model_kw=None, seed: int = 0, **train_kw) -> Path:
    """Where :func:`pretrained` stores (or finds) the weights for these arguments.

    >>> from prune_lab import data
    >>> checkpoint_path("mlpnet", data.synthetic(), cache_dir="/tmp/x").name.startswith("mlpnet-synthetic-")
    True
    """
    if not isinstance(data, DataBundle):
        raise TypeError(f"data must be a DataBundle (it names the dataset and its shape), got {type(data).__name__}")
    _, _, key, _ = _settings(name, data, model_kw, seed, train_kw)
    folder = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    return folder / f"{name}-{data.name}-{key}.pt"


def _load(path: Path, key: str, model: nn.Module) -> bool:
    """Load the checkpoint into ``model``; on any problem warn and return False."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or overwritten file: never fatal, never used
        warnings.warn(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); retraining", RuntimeWarning, 3)
        return False
    problem = None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        problem = "unknown format"
    elif payload.get("key") != key:
        problem = "its key does not match the requested settings"
    elif _state_checksum(payload.get("state_dict", {})) != payload.get("sha256"):
        problem = "its checksum does not match its contents (corrupt file)"
    else:
        try:
            model.load_state_dict(payload["state_dict"], strict=True)
        except (RuntimeError, KeyError) as exc:
            problem = f"its tensors do not fit the model ({exc})"
    if problem:
        warnings.warn(f"checkpoint {path} is not usable: {problem}; retraining", RuntimeWarning, 3)
        return False
    return True


def _save(path: Path, key: str, key_obj: dict, model: nn.Module) -> None:
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {"format": _FORMAT, "key": key, "meta": json.dumps(key_obj, default=repr), "sha256": _state_checksum(state),
               "state_dict": state}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)  # atomic: a reader never sees a half-written file
    finally:
        if tmp.exists():
            tmp.unlink()


def pretrained(name: str, data: DataBundle, *, cache_dir=None, model_kw: dict | None = None, seed: int = 0,
               **train_kw) -> nn.Module:
    """A trained ``models.create(name, ...)`` for ``data``, trained once and then loaded from the disk cache.

    ``in_features`` / ``in_channels`` / ``input_size`` / ``num_classes`` are inferred from the bundle (``model_kw``
    adds or overrides builder arguments). Training uses :func:`recipe` ``(name, data.name)`` updated by
    ``train_kw`` (any :func:`~prune_lab.training.train` argument except ``masks``/``on_step``); ``seed`` seeds both
    the initialisation and the training. Cache folder: ``cache_dir`` or ``$PRUNE_LAB_CACHE`` or
    ``~/.cache/prune_lab/checkpoints``. Returns the model in eval mode.

    >>> from prune_lab import data
    >>> net = pretrained("mlpnet", data.digits(), progress=False)  # doctest: +SKIP
    """
    if not isinstance(data, DataBundle):
        raise TypeError(f"data must be a DataBundle (it names the dataset and its shape), got {type(data).__name__}")
    kwargs, settings, key, key_obj = _settings(name, data, model_kw, seed, train_kw)
    folder = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    path = folder / f"{name}-{data.name}-{key}.pt"
    model = create(name, seed=seed, **kwargs)
    if path.is_file() and _load(path, key, model):
        model.to(resolve_device(settings.get("device", "auto")))
        return model.eval()
    train(model, data, seed=seed, **settings)
    _save(path, key, key_obj, model)
    return model.eval()
