"""Sweep points, the content-addressed result store, and the local, process-pool and Ray backends."""
import collections
import os
import signal
import threading
import time

import pandas as pd
import pytest
import torch
from torch import nn

import prune_lab as pl
from prune_lab.analysis.sweeps import ResultStore, SweepPoint

METHODS = ["magnitude", "lamp"]
GRID = [0.5, 0.8, 0.9]


@pytest.fixture(scope="module")
def digits():
    return pl.data.digits()


def small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def reference(model, data, **kw):
    return pl.PruneSession(model, data, device="cpu").sweep(METHODS, GRID, progress=False, **kw)


# --------------------------------------------------------------------------------------------------------------
def test_point_keys_address_content():
    p = SweepPoint.make("lamp", None, 0.5, 0)
    assert p.key("f", "d") == SweepPoint.make("lamp", None, 0.5, 0).key("f", "d")
    others = [p.key("g", "d"), p.key("f", "e"), SweepPoint.make("lamp", None, 0.6, 0).key("f", "d"),
              SweepPoint.make("lamp", "uniform", 0.5, 0).key("f", "d"),
              SweepPoint.make("lamp", None, 0.5, 0, finetune={"epochs": 1}).key("f", "d"),
              SweepPoint.make("lamp", None, 0.5, 0, recalibrate_bn=True).key("f", "d")]
    assert len({p.key("f", "d"), *others}) == 7
    # the seed matters only where something depends on it
    assert SweepPoint.make("lamp", None, 0.5, 1).key("f", "d") == p.key("f", "d")
    assert SweepPoint.make("random", None, 0.5, 1).key("f", "d") != SweepPoint.make("random", None, 0.5, 0).key("f", "d")
    assert (SweepPoint.make("lamp", None, 0.5, 1, finetune={"epochs": 1}).key("f", "d")
            != SweepPoint.make("lamp", None, 0.5, 0, finetune={"epochs": 1}).key("f", "d"))


def test_store_round_trip_claims_and_log(tmp_path):
    store = ResultStore(tmp_path / "s")
    assert store.get("k") is None and "k" not in store and len(store) == 0
    claim = store.claim("k")
    assert [c["key"] for c in store.running()] == ["k"] and store.running()[0]["pid"] == os.getpid()
    store.put("k", [{"accuracy": 0.5}])
    store.release(claim)
    assert store.get("k") == [{"accuracy": 0.5}] and "k" in store and len(store) == 1
    assert store.running() == []
    assert [e["event"] for e in store.events()] == ["start", "done"]
    assert not list((tmp_path / "s" / "points").glob("*.tmp"))  # written whole, then renamed
    # a claim left by a process that is gone is stale
    (tmp_path / "s" / "running" / "x.json").write_text(
        '{"key": "x", "host": "%s", "pid": 999999999, "started": 0}' % __import__("socket").gethostname())
    assert store.clear_stale() == 1 and store.running() == []


def test_cache_dir_is_reused_across_sessions(tmp_path, digits):
    model = small_model()
    ref = reference(model, digits)
    first = pl.PruneSession(model, digits, device="cpu").sweep(METHODS, GRID, cache_dir=tmp_path, progress=False)
    pd.testing.assert_frame_equal(first, ref)
    assert first.attrs["computed"] == 6 and first.attrs["cached"] == 0
    again = pl.PruneSession(model, digits, device="cpu").sweep(METHODS, GRID, cache_dir=tmp_path, progress=False)
    pd.testing.assert_frame_equal(again, ref)
    assert again.attrs["computed"] == 0 and again.attrs["cached"] == 6
    assert sum(e["event"] == "done" for e in ResultStore(tmp_path).events()) == 6
    # other weights: other addresses
    other = pl.PruneSession(small_model(1), digits, device="cpu").sweep(METHODS, GRID, cache_dir=tmp_path,
                                                                         progress=False)
    assert other.attrs["computed"] == 6 and len(ResultStore(tmp_path)) == 12


def test_deterministic_seeds_share_a_point_but_keep_their_rows(digits):
    df = pl.PruneSession(small_model(), digits, device="cpu").sweep(["lamp"], [0.5], seeds=[0, 1, 2],
                                                                    progress=False)
    assert df["seed"].tolist() == [0, 1, 2] and df["accuracy"].nunique() == 1
    assert df.attrs["computed"] == 1


@pytest.mark.slow
def test_process_pool_matches_in_process(tmp_path, digits):
    model = small_model()
    pooled = pl.PruneSession(model, digits, device="cpu").sweep(METHODS, GRID, workers=2, cache_dir=tmp_path,
                                                                progress=False)
    pd.testing.assert_frame_equal(pooled, reference(model, digits))
    assert pooled.attrs["computed"] == 6
    pids = {e["pid"] for e in ResultStore(tmp_path).events()}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


def test_bad_backend_arguments(digits):
    s = pl.PruneSession(small_model(), digits, device="cpu")
    with pytest.raises(ValueError, match="unknown backend 'rey'.*Did you mean 'ray'"):
        s.sweep(METHODS, GRID, backend="rey")
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        s.sweep(METHODS, GRID, workers=0)
    with pytest.raises(ValueError, match="workers applies to backend='local'"):
        s.sweep(METHODS, GRID, backend="ray", workers=4)
    model = small_model()
    model.lock = threading.Lock()  # cannot be pickled: workers could not rebuild the session
    with pytest.raises(TypeError, match="cannot be serialised for sweep workers.*workers=1"):
        pl.PruneSession(model, digits, device="cpu").sweep(METHODS, GRID, workers=2, progress=False)


# --------------------------------------------------------------------------------------------------------------
# Ray: a real local cluster on 127.0.0.1 with 2 CPUs (the ray_cluster fixture of tests/conftest.py)
# --------------------------------------------------------------------------------------------------------------
class SlowForward(nn.Module):
    """A model whose forward pass takes ``delay`` seconds: long enough to kill its worker mid-point."""

    def __init__(self, delay):
        super().__init__()
        self.delay = delay
        self.net = small_model()

    def forward(self, x):
        time.sleep(self.delay)
        return self.net(x)


@pytest.mark.slow
def test_ray_sweep_matches_local_and_survives_a_killed_worker(tmp_path, digits, ray_cluster):
    model = SlowForward(0.0)
    ref = reference(model, digits)
    df = pl.PruneSession(model, digits, device="cpu").sweep(METHODS, GRID, backend="ray", progress=False)
    pd.testing.assert_frame_equal(df, ref)  # through the object store, no cache folder
    assert df.attrs["computed"] == 6

    # now slow points, a shared cache folder, and a worker killed while it computes one of them
    model.delay = 1.5
    store = ResultStore(tmp_path / "cache")
    out = {}
    driver = threading.Thread(target=lambda: out.update(df=pl.PruneSession(model, digits, device="cpu").sweep(
        METHODS, GRID, backend="ray", cache_dir=store.root, progress=False)))
    driver.start()
    victim = None
    deadline = time.time() + 120
    while victim is None and time.time() < deadline:
        running = [c for c in store.running() if c["pid"] != os.getpid()]
        if running:
            victim = running[0]
            os.kill(victim["pid"], signal.SIGKILL)
        time.sleep(0.05)
    driver.join(timeout=300)
    assert victim is not None, "no point was seen running"
    assert not driver.is_alive(), "the sweep did not finish after a worker was lost"
    df = out["df"]

    # nothing lost: every point is there, with the values an undisturbed run gives
    pd.testing.assert_frame_equal(df, ref)
    assert len(store) == 6
    # nothing computed twice: one finished computation per point; only the killed point was started again
    events = store.events()
    done = collections.Counter(e["key"] for e in events if e["event"] == "done")
    started = collections.Counter(e["key"] for e in events if e["event"] == "start")
    assert sorted(done.values()) == [1] * 6
    assert started[victim["key"]] == 2 and sum(started.values()) == 7
    assert victim["pid"] not in {e["pid"] for e in events if e["event"] == "done"}
    store.clear_stale()
    assert store.running() == []

    # a later run (another session, the same folder) computes nothing
    again = pl.PruneSession(model, digits, device="cpu").sweep(METHODS, GRID, backend="ray",
                                                               cache_dir=store.root, progress=False)
    pd.testing.assert_frame_equal(again, ref)
    assert again.attrs["computed"] == 0 and len(store.events()) == len(events)
