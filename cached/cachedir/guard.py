"""One guard per declared directory (the cache, a ``file`` upstream's store): its state, why,
since when, and the threads that may touch it.

A guard probes its directory (:func:`cached.cachedir.mounts.probe`) at start, every
``probe_interval`` seconds, and at once when told of an I/O error (:meth:`Guard.report`).
Probes run one at a time on the guard's own thread; one that does not return within
``probe_timeout`` makes the directory ``hung`` and no further probe is sent until it returns,
so a hung share holds at most that one thread. The cache's guard also owns the bounded
executor for cache-file I/O (:attr:`Guard.executor`): a hung cache share can block its
threads, never the default executor's, so pass-through and everything else keep working.
Hits from a network or FUSE filesystem are sent on those threads too
(:attr:`Guard.sends_in_threads`, cached/download/reader.py), and a send still waiting on
the share when the guard says hung is given up (:meth:`Guard.when_hung`).

Shared state (``state``, ``reason``, ``since``, ``identity``, ``generation``, ``fstype``, the
futures of :meth:`Guard.when_hung`) is changed only on the event loop, by the guard's own
task; :meth:`Guard.report` may be called from any thread.
Every change of state is logged once, with the reason and what to do about it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cached.cachedir.mounts import (
    Identity,
    ProbeSpec,
    State,
    Steps,
    Verdict,
    classify,
    is_share,
    probe,
)

log = logging.getLogger("cached.guard")

T = TypeVar("T")


class BoundedExecutor(concurrent.futures.Executor):
    """At most ``threads`` daemon threads; further work waits in a queue.

    Unlike :class:`concurrent.futures.ThreadPoolExecutor`, its threads are daemon threads
    that interpreter exit does not join: a thread stuck in the kernel on a hung hard-mounted
    share must not keep the daemon from stopping.
    """

    def __init__(self, threads: int, name: str):
        self._max = threads
        self._name = name
        self._work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for work
        self._pending = 0  # calls queued and not yet taken by a thread
        self._lock = threading.Lock()
        self._closed = False

    @property
    def busy(self) -> int:
        """Threads running a call right now (stuck ones included)."""
        with self._lock:
            return len(self._threads) - self._idle

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name}: executor is shut down")
            self._work.put((future, fn, args, kwargs))
            self._pending += 1
            # A thread stuck in the kernel never counts as idle: more work gets new threads
            # until the bound, and then waits.
            if self._pending > self._idle and len(self._threads) < self._max:
                thread = threading.Thread(
                    target=self._worker, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                self._idle += 1
                thread.start()
        return future

    def _worker(self) -> None:
        while True:
            item = self._work.get()
            with self._lock:
                self._idle -= 1
                if item is not None:
                    self._pending -= 1
            if item is None:
                return
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # handed to whoever awaits the future
                    future.set_exception(exc)
            del item, future, fn, args, kwargs
            with self._lock:
                self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        if cancel_futures:
            while True:
                try:
                    item = self._work.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in threads:
            self._work.put(None)
        if wait:
            for thread in threads:
                thread.join()


@dataclass(frozen=True)
class Transition:
    """A change of a guard's state, handed to its subscribers."""

    guard: Guard
    old: State
    new: State
    # The directory is ok again on another filesystem than when it was last ok (a share
    # mounted back, a fresh one): its layout must be recreated and its index rescanned.
    new_filesystem: bool


Subscriber = Callable[[Transition], Awaitable[None] | None]

_ADVICE = {
    State.READ_ONLY: "remount it read-write (mount -o remount,rw)",
    State.VANISHED: "mount the share there (cached never writes into a bare mount point)",
    State.HUNG: "the server does not answer: check it and the network (a hard mount waits)",
    State.FAILING: "check the server, the mount options and the kernel log (dmesg)",
}


class Guard:
    """The watch over one declared directory.

    Args:
        name: what the directory is, for logs and status (``cache``, ``store``).
        directory: the directory.
        spec: what it must be.
        probe_interval: seconds between scheduled probes.
        probe_timeout: seconds a probe may take before the directory counts as hung.
        io_threads: size of the executor for file I/O in this directory (0: none).
        effect: what happens while it is not ok, for the log (``downloads pass through``).
        sendfile: where hits from this directory are sent (``auto``, ``loop``, ``thread``;
            see :attr:`sends_in_threads`); None: no hits are sent from it (a store).
    """

    def __init__(
        self,
        name: str,
        directory: Path,
        spec: ProbeSpec,
        *,
        probe_interval: float = 5.0,
        probe_timeout: float = 10.0,
        io_threads: int = 0,
        effect: str = "",
        sendfile: str | None = None,
    ):
        self.name = name
        self.directory = Path(directory)
        self.spec = spec
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.effect = effect
        self.state = State.HUNG
        self.reason = "not probed yet"
        self.since = time.time()
        self.identity: Identity | None = None
        self.generation = 0  # bumped whenever it becomes ok on another filesystem
        self.checked_at = 0.0
        self.sendfile = sendfile
        self.fstype = ""  # as the last probe that reached the mount table saw it
        self._hung_waiters: set[asyncio.Future[None]] = set()
        self._probe_pool = BoundedExecutor(1, f"probe-{name}")
        self.executor: BoundedExecutor | None = (
            BoundedExecutor(io_threads, f"io-{name}") if io_threads else None
        )
        self._probe: asyncio.Future[Verdict] | None = None
        self._adoptions = 0  # marks adopted; a probe older than the last one read no mark
        self._probe_adoptions = 0
        self._steps = Steps()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._subscribers: list[Subscriber] = []
        self._notifications: set[asyncio.Task[None]] = set()

    @property
    def ok(self) -> bool:
        return self.state is State.OK

    @property
    def sends_in_threads(self) -> bool:
        """Whether a hit's file reads (sendfile) run on :attr:`executor` rather than on the
        event loop: always with ``sendfile: thread``, never with ``loop``; with ``auto`` on a
        network or FUSE filesystem (:func:`.mounts.is_share`), and while the type is not
        known yet. A local disk answers or fails (EIO); a hard-mounted share may never answer,
        and a read of it on the loop would stop every request of the daemon."""
        if self.executor is None or self.sendfile in (None, "loop"):
            return False
        return self.sendfile == "thread" or not self.fstype or is_share(self.fstype)

    def when_hung(self) -> asyncio.Future[None]:
        """A future done once the directory is ``hung`` (at once if it is now). Call on the
        loop; cancel it when no longer interested."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.state is State.HUNG and self.checked_at:
            future.set_result(None)
            return future
        self._hung_waiters.add(future)
        future.add_done_callback(self._hung_waiters.discard)
        return future

    def subscribe(self, subscriber: Subscriber) -> None:
        """Call ``subscriber`` on the loop with every :class:`Transition` (async ones are run
        as tasks; their errors are logged)."""
        self._subscribers.append(subscriber)

    async def start(self) -> None:
        """Probe once (the daemon starts whatever the answer), then keep probing."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        await self.check()
        self._task = asyncio.create_task(self._run(), name=f"guard-{self.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for task in list(self._notifications):
            task.cancel()
        self._probe_pool.shutdown(wait=False, cancel_futures=True)
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)

    def report(self, exc: BaseException) -> None:
        """Tell the guard that an I/O call in its directory failed (any thread): an error of
        the kind a failing share gives triggers a probe at once."""
        if classify(exc) is None or self._loop is None or self._wake is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # the loop is closed: the daemon is stopping
            pass

    async def run_io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call on this directory's I/O executor; errors are reported."""
        assert self.executor is not None, f"{self.name}: no I/O executor"
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        except OSError as exc:
            self.report(exc)
            raise

    def adopt_volume(self, volume: bytes) -> None:
        """The directory was just marked (:func:`cached.cachedir.mounts.mark_volume`) by its owner:
        the mark is part of its identity from now on, not a sign of another filesystem."""
        if self.identity is not None:
            self.identity = dataclasses.replace(self.identity, volume=volume)
        self._adoptions += 1

    async def check(self) -> State:
        """Probe now (or wait for the probe in flight) and apply its verdict."""
        loop = asyncio.get_running_loop()
        if self._probe is None or self._probe.done():
            self._steps = Steps()
            self._probe_adoptions = self._adoptions
            self._probe = loop.run_in_executor(
                self._probe_pool, probe, self.directory, self.spec, self.identity, self._steps
            )
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.probe_timeout):
                verdict = await asyncio.shield(self._probe)
        except TimeoutError:
            if self._wake is not None:
                wake = self._wake
                # A probe that was stuck and returns wakes the loop to probe afresh (only
                # such a one: a wake after every probe would race the owner's volume mark).
                self._probe.add_done_callback(lambda _f: wake.set())
            stuck = time.monotonic() - started
            verdict = Verdict(
                State.HUNG,
                f"{self.directory}: {self._steps.current} has not returned for {stuck:.1f}s "
                f"(probe_timeout {self.probe_timeout:g}s)",
                self.identity,
            )
        except Exception as exc:  # a bug in the probe must not look like a healthy directory
            verdict = Verdict(State.FAILING, f"{self.directory}: probe error: {exc!r}")
        if (
            self._probe_adoptions != self._adoptions
            and verdict.identity is not None
            and self.identity is not None
        ):  # it looked before the mark was set: the mark is not news
            verdict = dataclasses.replace(
                verdict,
                identity=dataclasses.replace(verdict.identity, volume=self.identity.volume),
            )
        self._apply(verdict)
        self.checked_at = time.time()
        return self.state

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            try:
                async with asyncio.timeout(self.probe_interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            await self.check()

    def _apply(self, verdict: Verdict) -> None:
        old = self.state
        new_filesystem = False
        if verdict.state is State.OK and verdict.identity is not None:
            if self.identity is not None and verdict.identity != self.identity:
                new_filesystem = True
                self.generation += 1
            self.identity = verdict.identity
        if verdict.fstype:
            self.fstype = verdict.fstype
        self.reason = verdict.reason
        if self.checked_at == 0.0:  # the first probe: there is no transition yet
            self.state, self.since = verdict.state, time.time()
            if self.ok:
                log.info("%s directory %s is ok: %s", self.name, self.directory, self.reason)
            else:
                self._log(old, 0.0, False)
            return
        if verdict.state is old and not new_filesystem:
            return
        self.state = verdict.state
        if self.state is State.HUNG:
            for waiter in list(self._hung_waiters):
                if not waiter.done():
                    waiter.set_result(None)
        now = time.time()
        lasted = now - self.since
        self.since = now
        self._log(old, lasted, new_filesystem)
        transition = Transition(self, old, self.state, new_filesystem)
        for subscriber in self._subscribers:
            try:
                result = subscriber(transition)
            except Exception:
                log.exception("%s guard: a subscriber failed", self.name)
                continue
            if result is not None:
                task = asyncio.ensure_future(result)
                self._notifications.add(task)
                task.add_done_callback(self._notified)

    def _notified(self, task: asyncio.Future[None]) -> None:
        self._notifications.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s guard: a subscriber failed", self.name, exc_info=task.exception())

    def _log(self, old: State, lasted: float, new_filesystem: bool) -> None:
        if self.state is State.OK:
            fresh = " (another filesystem than before: layout recreated, index rescanned)"
            log.info(
                "%s directory %s is ok again after %.1fs %s: %s%s",
                self.name,
                self.directory,
                lasted,
                old.value,
                self.reason,
                fresh if new_filesystem else "",
            )
            return
        log.warning(
            "%s directory %s is %s: %s. %s; to fix: %s",
            self.name,
            self.directory,
            self.state.value,
            self.reason,
            self.effect or "not used meanwhile",
            _ADVICE[self.state],
        )

    def _send_path(self) -> str | None:
        if self.sendfile is None:
            return None
        return "thread" if self.sends_in_threads else "loop"

    def status(self) -> dict[str, Any]:
        """What health checks, metrics and ``cached-manage`` show for this directory."""
        return {
            "name": self.name,
            "directory": str(self.directory),
            "state": self.state.value,
            "reason": self.reason,
            "since": _iso(self.since),
            "checked_at": _iso(self.checked_at) if self.checked_at else None,
            "require_mount": self.spec.require_mount,
            "fstype": self.spec.fstype or None,
            "writable": self.spec.writable,
            "io_threads_busy": self.executor.busy if self.executor is not None else None,
            "sendfile": self._send_path(),
        }


def status(guards: Iterable[Guard]) -> list[dict[str, Any]]:
    """The status of every guard, in order (see :meth:`Guard.status`)."""
    return [g.status() for g in guards]


def _iso(stamp: float) -> str:
    when = datetime.datetime.fromtimestamp(stamp, datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


__all__ = ["BoundedExecutor", "Guard", "Subscriber", "Transition", "status"]
