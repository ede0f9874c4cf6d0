"""Sweeps that outlive the notebook: sweep points, a content-addressed result store, and the backends that run them.

A sweep point is a :class:`~prune_lab.engine.query.Query` (method, allocation, sparsity, hyperparameters, seed)
plus the fine-tuning and BN recalibration settings; its key hashes the point (the query by its content key) together
with the model's weight fingerprint and the data's content identity, so a result is found again by whoever computes
the same thing, on any machine, in any later run. :func:`sweep` runs a grid of them on a session.

Backends (``session.sweep(..., backend=...)``):

- ``"local"`` (default): in this process with ``workers=1``; a process pool of ``workers`` processes otherwise.
- ``"ray"``: one Ray task per point on a running Ray cluster (``address``: ``None`` uses the one this process is
  connected to, or ``RAY_ADDRESS``, or starts a local one; ``"auto"``, ``"ray://head:10001"``, …). A task rebuilds
  the session from the serialised model and data (put once in the object store) and keeps it for the worker's later
  points; a task lost with its worker is retried (``retries``) and the others are not run again.

Worker processes share results through a :class:`ResultStore` folder (``cache_dir``; on a cluster, a path every
node sees at the same place, e.g. NFS): ``points/<key>.json`` holds a finished point's rows; ``running/`` the
claims of points being computed (host, pid, start); ``log.jsonl`` one line per start and finish.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import cloudpickle
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..core.validation import check_choice
from ..engine.query import Query

SCHEMA = 2  # bump when what a point computes or how it is keyed changes: old store entries are then never matched
BACKENDS = ("local", "ray")
COLUMNS = ["method", "allocation", "sparsity", "seed", "achieved_sparsity", "accuracy", "loss", "finetuned"]


@dataclass(frozen=True)
class SweepPoint:
    """One point of a sweep: a :class:`~prune_lab.engine.query.Query` (what is pruned), the ``seed`` (of the
    fine-tuning, and of the method when it is stochastic), ``finetune`` (sorted ``(name, repr(value))`` pairs of
    :func:`prune_lab.train` arguments) and whether BatchNorm statistics are re-estimated before evaluating."""

    query: Query
    seed: int = 0
    finetune: tuple = ()
    recalibrate_bn: bool = False

    @classmethod
    def make(cls, method, allocation, sparsity, seed, finetune=None, hp=None, recalibrate_bn=False) -> "SweepPoint":
        query = Query.make(method, sparsity, allocation=allocation, seed=seed, **(hp or {}))
        return cls(query, int(seed), _items(finetune), bool(recalibrate_bn))

    @property
    def method(self) -> str:
        return self.query.method

    @property
    def allocation(self) -> str:
        return self.query.allocation

    @property
    def sparsity(self) -> float:
        return self.query.sparsity

    @property
    def seeded(self) -> bool:
        """Whether anything depends on the seed (a stochastic method, fine-tuning); seeds share one key if not."""
        return bool(self.finetune) or self.query.seed is not None

    def key(self, fingerprint: str, data_id: str) -> str:
        """The content address: this point on these weights and this data."""
        blob = json.dumps({"schema": SCHEMA, "model": fingerprint, "data": data_id, "query": self.query.key,
                           "seed": self.seed if self.seeded else None, "finetune": self.finetune,
                           "recalibrate_bn": self.recalibrate_bn}, sort_keys=True, default=list)
        return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()

    def label(self) -> str:
        return f"{self.method} @ {self.sparsity:g} (seed {self.seed}{', fine-tuned' if self.finetune else ''})"

    def run(self, session, data) -> list:
        """The point's rows, computed on ``session`` (a point type tells the backends how it is computed: layer
        sensitivity points run through the same store and backends)."""
        return evaluate_point(session, self, data)


def evaluate_point(session, point: SweepPoint, data) -> list:
    """The rows of one sweep point: the pruned network evaluated (and, with ``point.finetune``, a fine-tuned copy),
    through the session's caches (``session.prune_query``, ``session.evaluate``)."""
    res = session.prune_query(point.query)
    base = {"method": point.method, "allocation": point.allocation, "sparsity": point.sparsity, "seed": point.seed,
            "achieved_sparsity": res.sparsity}
    rows = [{**base, **session.evaluate(res, data, recalibrate_bn=point.recalibrate_bn), "finetuned": False}]
    if point.finetune:
        tuned = session.finetuned_evaluation(res, data, seed=point.seed, **_undo(point.finetune))
        rows.append({**base, **tuned, "finetuned": True})
    return rows


def _items(d) -> tuple:
    return tuple(sorted((str(k), repr(v)) for k, v in (d or {}).items()))


# ----------------------------------------------------------------------------------------------------------------
# a whole sweep
# ----------------------------------------------------------------------------------------------------------------
def sweep(session, methods, sparsities, *, allocations=None, seeds=(0,), finetune: dict | None = None, data=None,
          recalibrate_bn: bool = False, progress: bool = True, backend: str = "local", workers: int | None = None,
          cache_dir=None, address: str | None = None, retries: int = 3, **hp) -> pd.DataFrame:
    """Accuracy and loss over methods × allocations × sparsities × seeds: a row per point with ``method,
    allocation, sparsity, seed, achieved_sparsity, accuracy, loss, finetuned`` (a second row per point with
    ``finetuned=True`` when ``finetune`` — keyword arguments of :func:`prune_lab.train`, e.g.
    ``{"epochs": 1}`` — is given). ``recalibrate_bn``: evaluate each pruned network after re-estimating its
    BatchNorm statistics. ``allocations``: ``None`` (each method's paper default), a name, or a list of names.

    Every point is cached by content (weights fingerprint, data identity, the point's query and settings): in the
    session (``session.points``), and with ``cache_dir`` in a folder (:class:`ResultStore`) that later runs, other
    processes and other machines reuse. An interrupted sweep returns what it finished and keeps it.

    ``backend``: ``"local"`` (this process; a process pool with ``workers`` > 1) or ``"ray"`` (a Ray task per
    point on the cluster at ``address``, see the module docstring; a task lost with its worker is retried up to
    ``retries`` times). ``df.attrs`` tells ``computed`` and ``cached`` point counts.
    """
    methods = [methods] if isinstance(methods, str) else list(methods)
    if allocations is None or isinstance(allocations, str):
        allocations = [allocations]
    workers = check_backend(backend, workers)
    if backend == "ray" and workers != 1:
        raise ValueError("workers applies to backend='local'; under Ray each point is a task using one CPU of "
                         "the cluster.")
    points = [SweepPoint.make(m, a, s, seed, finetune, hp, recalibrate_bn)
              for m in methods for a in allocations for seed in seeds for s in sparsities]
    data = data if data is not None else session.data
    if data is None:
        raise ValueError("sweep needs data: pass data=... here or when creating the session.")
    if "sensitivity" in allocations and session.sensitivity_table is not None:
        raise ValueError("sweep points are not keyed by the session's sensitivity table yet: compare allocation "
                         "'sensitivity' with session.compare_allocations(sparsities), or drop the table first "
                         "(session.use_sensitivity(None)).")
    store = ResultStore(cache_dir) if cache_dir is not None else None
    fingerprint, data_id = session.fingerprint, session.data_id(data)
    keys = [p.key(fingerprint, data_id) for p in points]
    done = session.points
    todo = {}  # key → point, in order, once each
    for p, k in zip(points, keys):
        if k not in done and store is not None and (hit := store.get(k)) is not None:
            done[k] = hit
        if k not in done:
            todo.setdefault(k, p)
    cached = len(set(keys)) - len(todo)
    computed, interrupted = 0, False
    bar = tqdm(total=len(set(keys)), initial=cached, desc=f"sweep ({backend})", disable=not progress)
    try:
        with session.lock:
            if backend == "local" and workers == 1:
                finished = ((p, *compute_point(session, p, data, store)) for p in todo.values())
            else:
                payload = make_payload(session, data)
                finished = (run_ray(payload, list(todo.values()), store, address=address, retries=retries)
                            if backend == "ray" else run_local_pool(payload, list(todo.values()), store, workers))
            for p, rows, was_computed in finished:
                done[p.key(fingerprint, data_id)] = rows
                computed += bool(was_computed)
                bar.set_postfix_str(p.label())
                bar.update()
    except KeyboardInterrupt:
        interrupted = True
        warnings.warn(f"sweep interrupted after {computed} computed points; finished points stay cached.",
                      stacklevel=3)
    finally:
        bar.close()
    rows = [{**r, "seed": p.seed} for p, k in zip(points, keys) for r in done.get(k, [])]
    columns = COLUMNS + sorted({c for r in rows for c in r} - set(COLUMNS))  # e.g. perplexity for language models
    df = pd.DataFrame(rows, columns=columns)
    df.attrs.update(interrupted=interrupted, computed=computed, cached=cached)
    return df


class ResultStore:
    """A folder of finished sweep points, addressed by :meth:`SweepPoint.key`; safe for concurrent writers (each
    result is written to a temporary file and renamed into place)."""

    def __init__(self, root):
        self.root = Path(root)
        self._points = self.root / "points"
        self._running = self.root / "running"
        self._points.mkdir(parents=True, exist_ok=True)
        self._running.mkdir(parents=True, exist_ok=True)

    def __repr__(self):
        return f"ResultStore({str(self.root)!r}, {len(self)} points)"

    def __len__(self):
        return sum(1 for _ in self._points.glob("*.json"))

    def __contains__(self, key: str) -> bool:
        return (self._points / f"{key}.json").exists()

    def get(self, key: str) -> list | None:
        """The rows of a finished point, or ``None``."""
        try:
            return json.loads((self._points / f"{key}.json").read_text())["rows"]
        except FileNotFoundError:
            return None

    def put(self, key: str, rows: list, point: SweepPoint | None = None, seconds: float | None = None):
        record = {"key": key, "rows": rows, "point": None if point is None else asdict(point),
                  "host": socket.gethostname(), "pid": os.getpid(), "seconds": seconds, "finished": time.time()}
        tmp = self._points / f".{key}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps(record, default=list))
        os.replace(tmp, self._points / f"{key}.json")
        self._event("done", key)

    def claim(self, key: str) -> Path:
        """Mark ``key`` as being computed by this process (released by :meth:`release`; a claim left by a lost
        worker stays until :meth:`clear_stale`)."""
        path = self._running / f"{key}.{socket.gethostname()}.{os.getpid()}.json"
        path.write_text(json.dumps({"key": key, "host": socket.gethostname(), "pid": os.getpid(),
                                    "started": time.time()}))
        self._event("start", key)
        return path

    @staticmethod
    def release(claim: Path):
        claim.unlink(missing_ok=True)

    def _claims(self):
        for path in self._running.glob("*.json"):
            try:
                yield path, json.loads(path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):  # released or being written just now
                pass

    def running(self) -> list[dict]:
        """The claims of points being computed (or left by lost workers): ``key, host, pid, started``."""
        return [claim for _, claim in self._claims()]

    def clear_stale(self) -> int:
        """Remove claims of processes on this host that no longer exist; returns how many."""
        n = 0
        for path, claim in self._claims():
            if claim["host"] == socket.gethostname() and not _alive(claim["pid"]):
                path.unlink(missing_ok=True)
                n += 1
        return n

    def events(self) -> list[dict]:
        """The log: one ``{"event": "start" | "done", "key", "host", "pid", "time"}`` per line."""
        path = self.root / "log.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def _event(self, event: str, key: str):
        line = json.dumps({"event": event, "key": key, "host": socket.gethostname(), "pid": os.getpid(),
                           "time": time.time()}) + "\n"
        with open(self.root / "log.jsonl", "a") as f:  # one short append per event
            f.write(line)


def _alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------------------------
# computing one point (the same code in this process, in a pool worker and in a Ray task)
# ----------------------------------------------------------------------------------------------------------------
def compute_point(session, point, data, store: ResultStore | None) -> tuple[list, bool]:
    """``(rows, computed)`` for ``point`` (a :class:`SweepPoint`, or any point with ``key`` and ``run``) on
    ``session``: from ``store`` when it is there, else computed (and put
    in ``store``)."""
    key = point.key(session.fingerprint, session.data_id(data))
    if store is not None:
        hit = store.get(key)
        if hit is not None:
            return hit, False
    claim = store.claim(key) if store is not None else None
    try:
        t0 = time.perf_counter()
        rows = point.run(session, data)
        if store is not None:
            store.put(key, rows, point, time.perf_counter() - t0)
    finally:
        if claim is not None:
            store.release(claim)
    return rows, True


def _undo(items: tuple) -> dict:
    """Back from ``(name, repr)`` pairs to values (literals only, as sweeps take)."""
    import ast

    return {k: ast.literal_eval(v) for k, v in items}


@dataclass
class _Payload:
    """What a worker needs to rebuild the session: the model and data (serialised once), the session's keyword
    arguments and the fingerprint the rebuilt model must have."""

    blob: bytes
    fingerprint: str
    token: str  # identifies this payload in a worker's session cache


def make_payload(session, data) -> _Payload:
    model = session.model
    if any(p.device.type != "cpu" for p in model.parameters()):
        import copy

        model = copy.deepcopy(model).cpu()  # workers may have no GPU; they move it to their own device
    try:
        blob = cloudpickle.dumps((type(session), model, session.data, data, session.options))
    except Exception as exc:  # noqa: BLE001 (any pickling failure)
        raise TypeError(f"the model or data cannot be serialised for sweep workers ({type(exc).__name__}: "
                        f"{exc}); use backend='local' with workers=1, or make them picklable.") from exc
    return _Payload(blob, session.fingerprint, hashlib.blake2b(blob, digest_size=16).hexdigest())


_WORKER_SESSIONS: dict = {}  # payload token → (session, sweep data); a worker keeps the latest two
_POOL_PAYLOAD = None  # a pool worker's payload, sent once by the pool's initializer


def _worker_session(payload: _Payload) -> tuple:
    """Rebuild the driver's session in this worker: ``(session, sweep data)``, kept for the worker's next points."""
    cls, model, session_data, data, kw = cloudpickle.loads(payload.blob)  # the driver's session class
    session = cls(model, session_data, **kw)
    if session.fingerprint != payload.fingerprint:
        raise RuntimeError("the model rebuilt in the sweep worker does not match the driver's (weights "
                           "fingerprint differs); is the same prune_lab and torch version installed there?")
    while len(_WORKER_SESSIONS) >= 2:
        _WORKER_SESSIONS.pop(next(iter(_WORKER_SESSIONS)))
    _WORKER_SESSIONS[payload.token] = (session, data)
    return session, data


def _remote_point(payload_ref: tuple, point: SweepPoint, store_root: str | None) -> tuple[list, bool]:
    """One point in a worker process. ``payload_ref``: ``(payload or None, token)``; under Ray the payload is an
    object reference (fetched only by a worker without that session yet), in a pool ``None`` (the initializer's)."""
    payload, token = payload_ref
    hit = _WORKER_SESSIONS.get(token)
    if hit is None:
        if payload is None:
            payload = _POOL_PAYLOAD
        elif not isinstance(payload, _Payload):
            import ray

            payload = ray.get(payload)
        hit = _worker_session(payload)
    session, data = hit
    return compute_point(session, point, data, ResultStore(store_root) if store_root else None)


def _init_pool_worker(threads: int, payload: _Payload):
    global _POOL_PAYLOAD
    torch.set_num_threads(threads)
    _POOL_PAYLOAD = payload


# ----------------------------------------------------------------------------------------------------------------
# backends: each takes the points still to compute and yields (point, rows, computed) as they finish
# ----------------------------------------------------------------------------------------------------------------
def run_local_pool(payload: _Payload, points, store: ResultStore | None, workers: int):
    threads = max(1, (os.cpu_count() or 1) // workers)
    root = None if store is None else str(store.root)
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_init_pool_worker,
                             initargs=(threads, payload)) as pool:
        futures = {pool.submit(_remote_point, (None, payload.token), p, root): p for p in points}
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    try:
                        rows, computed = f.result()
                    except BrokenProcessPool as exc:
                        raise RuntimeError(
                            "a sweep worker process died. Workers are started with 'spawn' and import the main "
                            "module: in a script, run the sweep under `if __name__ == '__main__':`. Finished points "
                            "are kept (pass cache_dir= to keep them across runs).") from exc
                    yield futures[f], rows, computed
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def run_ray(payload: _Payload, points, store: ResultStore | None, *, address=None, retries: int = 3,
            num_cpus: float = 1):
    try:
        import ray
    except ImportError as exc:
        raise ImportError("backend='ray' needs Ray: pip install 'prune_lab[distributed]' (or pip install ray).") \
            from exc
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    ref = ray.put(payload)
    task = ray.remote(_remote_point).options(max_retries=int(retries), retry_exceptions=False, num_cpus=num_cpus)
    root = None if store is None else str(store.root)
    futures = {task.remote((ref, payload.token), p, root): p for p in points}
    pending = list(futures)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for r in done:
                rows, computed = ray.get(r)
                yield futures[r], rows, computed
    except BaseException:
        for r in pending:
            ray.cancel(r)
        raise


def check_backend(backend: str, workers) -> int:
    check_choice(backend, BACKENDS, what="backend")
    if workers is None:
        return 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}.")
    return workers

