"""Run a function on every rank of a real gloo process group on CPU, with a deadline.

``run_ranks(world_size, fn, *args)`` calls ``fn(rank, world_size, *args)`` on each rank of a pool of
spawned processes (``file://`` rendezvous, gloo, one thread per rank) and returns the per-rank
results. Pools are kept per world size for the session, so the import of torch is paid once. A rank
that raises fails the call with its traceback; a rank that does not answer before the deadline
(a hang) fails it with ``TimeoutError``; either way the pool is torn down and the next call starts
a fresh one.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

DEFAULT_TIMEOUT_S = 120.0
_GLOO_TIMEOUT_S = 60


def _worker(rank: int, world_size: int, init_file: str, inbox: mp.Queue, outbox: mp.Queue) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=_GLOO_TIMEOUT_S),
        )  # fmt: skip
    except BaseException:
        outbox.put((rank, False, traceback.format_exc()))
        return
    while True:
        task = inbox.get()
        if task is None:
            break
        fn, args = task
        try:
            outbox.put((rank, True, fn(rank, world_size, *args)))
        except BaseException:
            outbox.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    def __init__(self, world_size: int) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self._dir = tempfile.TemporaryDirectory(prefix="tp_ffn_rdzv_")
        init_file = os.path.join(self._dir.name, "rendezvous")
        self._outbox: mp.Queue = ctx.Queue()
        self._inboxes: list[mp.Queue] = [ctx.Queue() for _ in range(world_size)]
        self._procs = [
            ctx.Process(target=_worker, args=(r, world_size, init_file, self._inboxes[r], self._outbox), daemon=True)
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = DEFAULT_TIMEOUT_S) -> list[Any]:
        for inbox in self._inboxes:
            inbox.put((fn, args))
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        while len(results) + len(errors) < self.world_size:
            # Once a rank has failed, the others may be stuck in a collective: wait only briefly.
            left = deadline - time.monotonic() if not errors else min(5.0, deadline - time.monotonic())
            try:
                rank, ok, value = self._outbox.get(timeout=max(left, 0.01))
            except queue.Empty:
                missing = sorted(set(range(self.world_size)) - set(results) - set(errors))
                if errors:
                    break
                raise TimeoutError(
                    f"{fn.__name__} at world size {self.world_size}: rank(s) {missing} did not finish within "
                    f"{timeout:.0f} s (a hang in a collective?)"
                ) from None
            (results if ok else errors)[rank] = value
        if errors:
            detail = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise AssertionError(f"{fn.__name__} failed at world size {self.world_size}:\n{detail}")
        return [results[r] for r in range(self.world_size)]

    def close(self, kill: bool = False) -> None:
        if not kill:
            for inbox in self._inboxes:
                inbox.put(None)
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        self._dir.cleanup()


_pools: dict[int, RankPool] = {}


def run_ranks(world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    """``[fn(r, world_size, *args) for r in ranks]``, each on its own process of a gloo group."""
    pool = _pools.get(world_size)
    if pool is None:
        pool = _pools[world_size] = RankPool(world_size)
    try:
        return pool.run(fn, *args, timeout=timeout)
    except BaseException:
        _pools.pop(world_size).close(kill=True)
        raise


def run_fresh(world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    """Like :func:`run_ranks` on a new pool that is closed afterwards (for per-process measurements)."""
    pool = RankPool(world_size)
    try:
        result = pool.run(fn, *args, timeout=timeout)
    except BaseException:
        pool.close(kill=True)
        raise
    pool.close()
    return result


def close_all() -> None:
    while _pools:
        _pools.popitem()[1].close()
