"""Loader worker processes: run a function on tasks in forked processes; never hang silently, and survive
a decoder that crashes on one item.

Why not torch's DataLoader: its workers deliver results in one fixed request order, but the training
loader keeps two independent request streams (video chunks, image chunks) whose consumption depends on
the image:video schedule and on how many samples each chunk skips. Here any idle worker takes the next
task from one shared queue and the caller receives results by task id. Results never depend on which
worker ran a task (all randomness is seeded per sample), so this changes speed only.

Like DataLoader: processes are forked (they inherit the shard index without pickling it), tensors travel
through shared memory (torch.multiprocessing reductions), each worker uses one torch thread, and a worker
exits when its parent is gone. Unlike it:
- waiting longer than `timeout_s` for a result, a task that raised, or a worker that died for any other
  reason than below raises LoaderWorkerError naming what the outstanding tasks were reading (`describe`);
- crash isolation: a task is a list of items, and `work_fn(payload, crashed, progress)` calls
  `progress(i)` before item i (one write to an int64 in shared memory). When a worker dies of a crash
  signal (SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL: a segfault or abort inside decord or FFmpeg) while
  on item i, the pool knows the task and item from that shared slot, starts a new worker in its place and
  runs the task again with `crashed = {i: what happened}`; work_fn leaves those items out (the loader
  skips them as `decoder_crash`). The result equals that of a run in which the item was a clean skip, so
  positions stay exact. SIGKILL (the OOM killer, an operator), a normal exit, or a crash while the worker
  is not on an item stays an error: nothing says which item to blame.

Each worker sends its results on its own pipe, synchronously, so that a crash cannot tear a message that
another worker needs; a result whose tensors died with their worker (they come through its fd sharer) is
run again.
"""

from __future__ import annotations

import faulthandler
import itertools
import logging
import os
import queue
import signal
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, Hashable, Mapping

import torch
import torch.multiprocessing as torch_mp

log = logging.getLogger(__name__)

CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE, signal.SIGILL})
"""Deaths blamed on the item a worker was on (a crash in native decoding code)."""

NO_ITEM = -1

Progress = Callable[[int], None]
WorkFn = Callable[[Any, Mapping[int, str], Progress], Any]


class LoaderWorkerError(RuntimeError):
    """A loader worker died, failed with an exception, or produced nothing within the timeout."""


def _worker_main(work_fn: WorkFn, tasks, results: Connection, slot, parent_pid: int) -> None:
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; it closes the pool
    faulthandler.disable()  # a crash is reported by the pool (pid, signal, task, item), not as a stack dump

    def progress(item: int) -> None:
        slot[1] = item

    while True:
        try:
            message = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent_pid:
                return
            continue
        if message is None:
            return
        ticket, payload, crashed = message
        slot[0] = ticket
        try:
            result, error = work_fn(payload, crashed, progress), None
        except BaseException:  # reported to the parent, which raises it
            result, error = None, traceback.format_exc()
        slot[1] = NO_ITEM  # from here on a death is not an item's fault
        # pickled apart from the envelope: the parent learns the ticket even when the tensors are gone
        results.send((ticket, error, bytes(ForkingPickler.dumps(result))))
        slot[0] = NO_ITEM


@dataclass
class _Worker:
    process: Any
    results: Connection
    slot: Any
    """Shared [ticket, item] the worker is on (NO_ITEM when none); read by the parent after a death."""


@dataclass
class _Task:
    task_id: Hashable
    payload: Any
    crashed: dict[int, str] = field(default_factory=dict)


def _death(exitcode: int | None) -> tuple[signal.Signals | None, str]:
    """(signal, words) of a dead process's exit code."""
    if exitcode is not None and exitcode < 0:
        try:
            sig = signal.Signals(-exitcode)
        except ValueError:
            return None, f"signal {-exitcode}"
        return sig, sig.name
    return None, f"exit code {exitcode}"


class WorkerPool:
    """`num_workers` forked processes applying `work_fn(payload, crashed, progress)` to submitted payloads."""

    def __init__(self, num_workers: int, work_fn: WorkFn, *, timeout_s: float, describe: Callable[[Hashable], str]):
        if num_workers < 1:
            raise ValueError(f"a WorkerPool needs num_workers >= 1, got {num_workers}")
        self._ctx = torch_mp.get_context("fork")
        self.timeout_s = timeout_s
        self._work_fn = work_fn
        self._describe = describe
        self._tasks = self._ctx.Queue()
        self._tickets = itertools.count()
        self._out: dict[int, _Task] = {}
        self._ready: deque[tuple[Hashable, Any]] = deque()
        self._workers = [self._start(i) for i in range(num_workers)]

    def _start(self, index: int) -> _Worker:
        reader, writer = self._ctx.Pipe(duplex=False)
        slot = self._ctx.RawArray("q", [NO_ITEM, NO_ITEM])
        proc = self._ctx.Process(target=_worker_main, args=(self._work_fn, self._tasks, writer, slot, os.getpid()),
                                 daemon=True, name=f"loader-worker-{index}")
        proc.start()
        writer.close()  # the worker holds the only write end: its death is EOF here
        return _Worker(proc, reader, slot)

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers now running (logs, diagnostics)."""
        return [w.process.pid for w in self._workers]

    def submit(self, task_id: Hashable, payload: Any) -> None:
        """Queue a task; its result comes back from `next_result` under `task_id`."""
        if any(t.task_id == task_id for t in self._out.values()):
            raise ValueError(f"task {task_id!r} is already outstanding")
        self._dispatch(_Task(task_id, payload))

    def _dispatch(self, task: _Task) -> None:
        ticket = next(self._tickets)
        self._out[ticket] = task
        self._tasks.put((ticket, task.payload, dict(task.crashed)))

    def _what(self) -> str:
        oldest = sorted(self._out)[:3]
        return "; ".join(self._describe(self._out[t].task_id) for t in oldest) or "no task outstanding"

    def next_result(self) -> tuple[Hashable, Any]:
        """(task_id, result) of the next finished task, in completion order.

        Raises LoaderWorkerError when no result comes within timeout_s, a task raised, or a worker died
        other than by a crash on an item (which restarts it and runs its task again without that item)."""
        if not self._ready and not self._out:
            raise RuntimeError("next_result() with no task outstanding would wait forever")
        deadline = time.monotonic() + self.timeout_s
        while not self._ready:
            remaining = deadline - time.monotonic()
            waitables = [w.results for w in self._workers] + [w.process.sentinel for w in self._workers]
            ready = wait(waitables, timeout=max(0.0, remaining)) if remaining > 0 else []
            if not ready:
                raise LoaderWorkerError(
                    f"loader workers produced nothing for {self.timeout_s:g} s (data.timeout_s); "
                    f"waiting for: {self._what()}"
                )
            for i, w in enumerate(self._workers):
                if w.results in ready or w.process.sentinel in ready:
                    self._service(i)
        return self._ready.popleft()

    def _service(self, i: int) -> None:
        """Receive what worker i sent; handle its death when it is gone."""
        w = self._workers[i]
        try:
            while w.results.poll():
                self._receive(w, w.results.recv())
        except (EOFError, OSError):
            w.process.join(timeout=5.0)  # EOF: the worker is exiting; let it be reaped
        if not w.process.is_alive():
            self._on_death(i)

    def _receive(self, w: _Worker, message: tuple[int, str | None, bytes]) -> None:
        ticket, error, blob = message
        task = self._out.pop(ticket)
        if error is not None:
            raise LoaderWorkerError(f"loader worker failed on {self._describe(task.task_id)}:\n{error}")
        try:
            result = ForkingPickler.loads(blob)
        except (OSError, EOFError) as exc:
            # a result's tensors come through its worker's fd sharer: gone when the worker died
            w.process.join(timeout=1.0)
            if w.process.is_alive():
                raise LoaderWorkerError(
                    f"could not receive a loader result ({exc}) for {self._describe(task.task_id)}") from exc
            self._dispatch(task)  # finished just before its worker died: run it again
            return
        self._ready.append((task.task_id, result))

    def _on_death(self, i: int) -> None:
        """Worker i is dead: blame its item and restart it, or raise LoaderWorkerError."""
        w = self._workers[i]
        pid, (sig, how) = w.process.pid, _death(w.process.exitcode)
        ticket, item = int(w.slot[0]), int(w.slot[1])
        task = self._out.get(ticket)
        if task is None or item == NO_ITEM or sig not in CRASH_SIGNALS:
            where = f"on item {item} of its task" if task is not None and item != NO_ITEM else "outside any item"
            raise LoaderWorkerError(
                f"loader worker died (pid {pid}, {how}, {where}; only a crash signal on an item is skipped) "
                f"while reading: {self._what()}"
            )
        if item in task.crashed:
            raise LoaderWorkerError(f"loader worker crashed again on item {item} of {self._describe(task.task_id)}, "
                                    "which its work function was told to leave out")
        log.warning("loader worker pid %d died of %s on item %d of %s; restarting it and rerunning the task "
                    "without that item", pid, how, item, self._describe(task.task_id))
        w.results.close()
        self._workers[i] = self._start(i)
        del self._out[ticket]
        task.crashed[item] = f"the decoder crashed its loader worker (pid {pid}, {how}); worker restarted"
        self._dispatch(task)

    def close(self) -> None:
        """Stop the workers (asked first, killed after 5 s) and drop outstanding tasks."""
        for _ in self._workers:
            try:
                self._tasks.put(None)
            except (OSError, ValueError):
                break
        deadline = time.monotonic() + 5.0
        while any(w.process.is_alive() for w in self._workers) and time.monotonic() < deadline:
            for w in self._workers:  # drain: a worker blocked on a full result pipe could not exit
                try:
                    while w.results.poll():
                        w.results.recv_bytes()
                except (EOFError, OSError):
                    pass
            wait([w.process.sentinel for w in self._workers], timeout=0.05)
        for w in self._workers:
            if w.process.is_alive():
                w.process.kill()
            w.process.join(timeout=5.0)
            w.results.close()
        self._tasks.cancel_join_thread()
        self._tasks.close()
        self._out.clear()
        self._ready.clear()
