"""pretrained(): the checkpoint cache misses, hits, and never uses a corrupt file."""
import warnings

import pytest
import torch

from prune_lab import data, models
from prune_lab.training import checkpoint_path, pretrained, train
from prune_lab.training import checkpoints as pretrained_module

FAST = {"steps": 15, "batch_size": 32, "progress": False}


@pytest.fixture(scope="module")
def bundle():
    return data.synthetic(n_train=128, n_test=32, input_shape=(1, 8, 8), num_classes=10, seed=0)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _forbid_training(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("pretrained() trained although a valid checkpoint exists")

    monkeypatch.setattr(pretrained_module, "train", boom)


def test_miss_trains_and_saves_then_hit_loads(tmp_path, bundle, monkeypatch):
    path = checkpoint_path("mlpnet", bundle, cache_dir=tmp_path, **FAST)
    assert not path.exists()
    first = pretrained("mlpnet", bundle, cache_dir=tmp_path, **FAST)
    assert path.is_file() and not first.training
    # the same as training by hand with the same seed and settings
    by_hand = train(models.create("mlpnet", in_features=64, num_classes=10, seed=0), bundle, seed=0, optimizer="adam",
                    lr=1e-3, **FAST)
    assert _same(_weights(first), _weights(by_hand))
    _forbid_training(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = pretrained("mlpnet", bundle, cache_dir=tmp_path, **FAST)
    assert second is not first and _same(_weights(first), _weights(second))


def test_key_covers_settings_data_model_and_version(tmp_path, bundle, monkeypatch):
    base = checkpoint_path("mlpnet", bundle, cache_dir=tmp_path, **FAST)
    assert checkpoint_path("mlpnet", bundle, cache_dir=tmp_path, **{**FAST, "progress": True}) == base
    other_data = data.synthetic(n_train=128, n_test=32, input_shape=(1, 8, 8), num_classes=10, seed=1)
    variants = [
        checkpoint_path("mlpnet", bundle, cache_dir=tmp_path, **{**FAST, "lr": 2e-3}),
        checkpoint_path("mlpnet", bundle, cache_dir=tmp_path, **{**FAST, "steps": 16}),
        checkpoint_path("mlpnet", bundle, cache_dir=tmp_path, seed=1, **FAST),
        checkpoint_path("mlpnet", other_data, cache_dir=tmp_path, **FAST),
        checkpoint_path("ffnn", bundle, cache_dir=tmp_path, **FAST),
        checkpoint_path("ffnn", bundle, cache_dir=tmp_path, model_kw={"depth": 3}, **FAST),
    ]
    assert len({base, *variants}) == len(variants) + 1
    monkeypatch.setattr(pretrained_module, "_version", lambda: "999.0")
    assert checkpoint_path("mlpnet", bundle, cache_dir=tmp_path, **FAST) != base


def test_corrupt_file_is_detected_and_retrained(tmp_path, bundle):
    good = _weights(pretrained("mlpnet", bundle, cache_dir=tmp_path, **FAST))
    path = checkpoint_path("mlpnet", bundle, cache_dir=tmp_path, **FAST)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.warns(RuntimeWarning, match="unreadable"):
        again = pretrained("mlpnet", bundle, cache_dir=tmp_path, **FAST)
    assert _same(good, _weights(again))
    with warnings.catch_warnings():  # the retrain rewrote a good file
        warnings.simplefilter("error")
        pretrained("mlpnet", bundle, cache_dir=tmp_path, **FAST)


def test_tampered_tensors_fail_the_checksum(tmp_path, bundle):
    good = _weights(pretrained("mlpnet", bundle, cache_dir=tmp_path, **FAST))
    path = checkpoint_path("mlpnet", bundle, cache_dir=tmp_path, **FAST)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["fc1.weight"][0, 0] += 1.0  # a flipped value the zip container would not notice
    torch.save(payload, path)
    with pytest.warns(RuntimeWarning, match="checksum"):
        again = pretrained("mlpnet", bundle, cache_dir=tmp_path, **FAST)
    assert _same(good, _weights(again))


def test_cache_dir_from_environment(tmp_path, bundle, monkeypatch):
    monkeypatch.setenv("PRUNE_LAB_CACHE", str(tmp_path / "env-cache"))
    pretrained("mlpnet", bundle, **FAST)
    assert len(list((tmp_path / "env-cache").glob("mlpnet-synthetic-*.pt"))) == 1


def test_argument_errors(bundle, tmp_path):
    with pytest.raises(TypeError, match="DataBundle"):
        pretrained("mlpnet", (bundle.train.images, bundle.train.labels), cache_dir=tmp_path)
    with pytest.raises(TypeError, match="masks"):
        pretrained("mlpnet", bundle, cache_dir=tmp_path, masks={})
    with pytest.raises(ValueError, match="Did you mean 'mlpnet'"):
        pretrained("mlpnett", bundle, cache_dir=tmp_path)
