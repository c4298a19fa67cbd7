"""Where `process_shard` runs: local worker processes (default) or Ray tasks. Same function, same arguments.

Both expose the same three calls the coordinator needs: `submit(task) -> handle`, `wait(handles, timeout) ->
[(handle, shard id or exception)]`, and a `progress` queue that workers `.put((done, ok))` into.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import queue
import sys
import threading
from typing import Any

from dataproc.sharder.config import ShardConfig
from dataproc.sharder.worker import ShardTask, process_shard, worker_state

_PROGRESS = None  # the progress queue, in each local worker process


def _init_worker(progress) -> None:
    global _PROGRESS
    _PROGRESS = progress


def _process_shard_locally(task: ShardTask, cfg: ShardConfig) -> int:
    return process_shard(task, cfg, _PROGRESS)


def _warm_up(cfg: ShardConfig) -> None:
    """Build a worker's state (HTTP pool, language-id model) before the first shard arrives."""
    worker_state(cfg)


def _start_method() -> str:
    """fork when it is safe, spawn otherwise.

    Forked workers start in milliseconds; spawned ones re-import the project (~0.5 s on a small machine, paid by
    every run). Fork is only safe while this process has a single thread (a lock held by another thread would
    stay locked forever in the child), which is the case for the CLI: the pool starts its workers before the
    coordinator creates any thread. Embedding programs with threads (a test's HTTP server, a notebook) get spawn.
    """
    if sys.platform == "linux" and threading.active_count() == 1:
        return "fork"
    return "spawn"


class LocalExecutor:
    def __init__(self, cfg: ShardConfig):
        self.cfg = cfg
        self.processes = cfg.resolved_processes()
        ctx = mp.get_context(_start_method())
        self.progress = ctx.Queue()  # handed to workers at start-up (queues cannot travel as task arguments)
        self._pool = cf.ProcessPoolExecutor(
            self.processes, mp_context=ctx, initializer=_init_worker, initargs=(self.progress,)
        )
        # Start every worker now (the pool starts one per submit while none is idle), while the coordinator
        # prepares the run.
        for _ in range(self.processes):
            self._pool.submit(_warm_up, cfg)

    def submit(self, task: ShardTask) -> cf.Future:
        return self._pool.submit(_process_shard_locally, task, self.cfg)

    def wait(self, handles: list, timeout: float) -> list[tuple[Any, Any]]:
        done, _ = cf.wait(handles, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        return [(h, h.exception() if h.exception() is not None else h.result()) for h in done]

    def drain_progress(self) -> list[tuple[int, int]]:
        return _drain(self.progress)

    def close(self, cancel: bool = False) -> None:
        self._pool.shutdown(wait=not cancel, cancel_futures=cancel)
        self.progress.close()


class RayExecutor:
    def __init__(self, cfg: ShardConfig):
        try:
            import ray
            from ray.util.queue import Empty, Queue
        except ImportError as exc:
            raise ImportError("--executor ray needs Ray: pip install 'mpm-toolkit[ray]' (or pip install ray)") from exc
        self.ray = ray
        self._empty = Empty
        self.cfg = cfg
        self._started = False
        if not ray.is_initialized():
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            if cfg.executor.ray_address:
                ray.init(address=cfg.executor.ray_address, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(num_cpus=cfg.resolved_processes(), include_dashboard=False, log_to_driver=False)
            self._started = True
        # Concurrent tasks: the cluster's CPUs unless --processes caps it.
        self.processes = cfg.executor.processes or int(ray.cluster_resources().get("CPU", 1))
        self.progress = Queue()
        self._remote = ray.remote(num_cpus=1, max_retries=0)(process_shard)
        self._cfg_ref = ray.put(cfg)

    def submit(self, task: ShardTask):
        return self._remote.remote(task, self._cfg_ref, self.progress)

    def wait(self, handles: list, timeout: float) -> list[tuple[Any, Any]]:
        done, _ = self.ray.wait(handles, num_returns=1, timeout=timeout)
        out = []
        for ref in done:
            try:
                out.append((ref, self.ray.get(ref)))
            except Exception as exc:  # a task's failure is reported to the coordinator, which decides
                out.append((ref, exc))
        return out

    def drain_progress(self) -> list[tuple[int, int]]:
        items = []
        while True:
            try:
                items.append(self.progress.get_nowait())
            except self._empty:
                return items

    def close(self, cancel: bool = False) -> None:
        self.progress.shutdown()
        if self._started:
            self.ray.shutdown()


def _drain(q) -> list[tuple[int, int]]:
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items


def make_executor(cfg: ShardConfig):
    return RayExecutor(cfg) if cfg.executor.kind == "ray" else LocalExecutor(cfg)
