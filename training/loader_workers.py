"""Loader worker processes: run a function on tasks in forked processes, never hang silently.

Why not torch's DataLoader: its workers deliver results in one fixed request order, but the training
loader keeps two independent request streams (video chunks, image chunks) whose consumption depends on
the image:video schedule and on how many samples each chunk skips. Here any idle worker takes the next
task from one shared queue and the caller receives results by task id. Results never depend on which
worker ran a task (all randomness is seeded per sample), so this changes speed only.

Like DataLoader: processes are forked (they inherit the shard index without pickling it), tensors travel
through shared memory (torch.multiprocessing reductions), each worker uses one torch thread, and a worker
exits when its parent is gone. Unlike it: waiting longer than `timeout_s` for a result, or a worker that
died, raises an error that names what the outstanding tasks were reading (`describe`).
"""

from __future__ import annotations

import os
import queue
import signal
import time
import traceback
from typing import Any, Callable, Hashable

import torch
import torch.multiprocessing as torch_mp


class LoaderWorkerError(RuntimeError):
    """A loader worker died, failed with an exception, or produced nothing within the timeout."""


def _worker_main(work_fn: Callable[[Any], Any], tasks, results, parent_pid: int) -> None:
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; it closes the pool
    while True:
        try:
            item = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent_pid:
                return
            continue
        if item is None:
            return
        task_id, payload = item
        try:
            result = work_fn(payload)
        except BaseException:  # reported to the parent, which raises it
            results.put((task_id, None, traceback.format_exc()))
            continue
        results.put((task_id, result, None))


class WorkerPool:
    """`num_workers` forked processes applying `work_fn` to submitted payloads."""

    def __init__(
        self, num_workers: int, work_fn: Callable[[Any], Any], *, timeout_s: float,
        describe: Callable[[Hashable], str],
    ):
        if num_workers < 1:
            raise ValueError(f"a WorkerPool needs num_workers >= 1, got {num_workers}")
        ctx = torch_mp.get_context("fork")
        self.timeout_s = timeout_s
        self._describe = describe
        self._tasks = ctx.Queue()
        self._results = ctx.Queue()
        self._outstanding: dict[Hashable, float] = {}
        self._workers = [
            ctx.Process(target=_worker_main, args=(work_fn, self._tasks, self._results, os.getpid()),
                        daemon=True, name=f"loader-worker-{i}")
            for i in range(num_workers)
        ]
        for proc in self._workers:
            proc.start()

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers (logs, diagnostics)."""
        return [p.pid for p in self._workers]

    @property
    def outstanding(self) -> int:
        """Tasks submitted whose result has not been received."""
        return len(self._outstanding)

    def submit(self, task_id: Hashable, payload: Any) -> None:
        """Queue a task; its result comes back from `next_result` under `task_id`."""
        if task_id in self._outstanding:
            raise ValueError(f"task {task_id!r} is already outstanding")
        self._outstanding[task_id] = time.monotonic()
        self._tasks.put((task_id, payload))

    def _what(self) -> str:
        oldest = sorted(self._outstanding, key=self._outstanding.get)[:3]
        return "; ".join(self._describe(t) for t in oldest) or "no task outstanding"

    def _raise_if_dead(self, cause: BaseException | None) -> None:
        dead = [p for p in self._workers if not p.is_alive()]
        if dead:
            codes = ", ".join(f"pid {p.pid} exit code {p.exitcode}" for p in dead)
            raise LoaderWorkerError(f"loader worker died ({codes}) while reading: {self._what()}") from cause

    def next_result(self) -> tuple[Hashable, Any]:
        """(task_id, result) of the next finished task, in completion order.

        Raises LoaderWorkerError when no result comes within timeout_s, a worker died, or a task raised."""
        if not self._outstanding:
            raise RuntimeError("next_result() with no task outstanding would wait forever")
        start = time.monotonic()
        while True:
            waited = time.monotonic() - start
            try:
                task_id, result, error = self._results.get(timeout=max(0.0, min(1.0, self.timeout_s - waited)))
            except queue.Empty:
                self._raise_if_dead(None)
                if time.monotonic() - start >= self.timeout_s:
                    raise LoaderWorkerError(
                        f"loader workers produced nothing for {self.timeout_s:g} s (data.timeout_s); "
                        f"waiting for: {self._what()}"
                    ) from None
                continue
            except (OSError, EOFError) as exc:
                # a result's tensors come through its worker's fd sharer: gone when the worker died
                self._raise_if_dead(exc)
                raise LoaderWorkerError(f"could not receive a loader result ({exc}) while reading: {self._what()}") from exc
            self._outstanding.pop(task_id, None)
            if error is not None:
                raise LoaderWorkerError(f"loader worker failed on {self._describe(task_id)}:\n{error}")
            return task_id, result

    def close(self) -> None:
        """Stop the workers (asked first, killed after 5 s) and drop outstanding tasks."""
        for _ in self._workers:
            try:
                self._tasks.put(None)
            except (OSError, ValueError):
                break
        deadline = time.monotonic() + 5.0
        while any(p.is_alive() for p in self._workers) and time.monotonic() < deadline:
            try:  # drain: a worker blocked on a full result pipe could not exit
                self._results.get(timeout=0.05)
            except (queue.Empty, OSError, ValueError, EOFError):
                pass
        for proc in self._workers:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=5.0)
        for q in (self._tasks, self._results):
            q.cancel_join_thread()
            q.close()
        self._outstanding.clear()
