"""The daemon's life under a service manager: reload (SIGHUP), the periodic tick (event-loop
lag, watchdog pings, ``STATUS=``, progress of long fills) and the debug loop freeze.

Owns :class:`Reloadables` (parts of the daemon that take a new configuration live register
here; a part that must read a file first registers a stage that runs in the reload's thread)
and :class:`Reloader` (re-reads the file, refuses a bad one, tells the service manager and
``/healthz``'s ``reload`` generation). Everything that changes state runs on the event loop:
the signal handlers are loop callbacks and the tick is a loop task, so a stuck loop stops the
watchdog pings; only the stages run in a worker thread, and they change nothing but return
what the loop applies.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from cached.config import Config
from cached.errors import ConfigError
from cached.ops.sdnotify import Notifier

if TYPE_CHECKING:
    from cached.fill.registry import Filler
    from cached.metrics import Metrics
    from cached.store import Store


class Ops(Protocol):
    """What the tick and the status line read of the daemon's state (cached/ops/health.py's
    ``Ops``; named here so that this module does not import the endpoints that use it)."""

    config: Config
    metrics: Metrics
    store: Store | None
    filler: Filler | None
    draining: bool
    space_warning: str | None

    def mode(self) -> str: ...

    @property
    def known_upstream_problem(self) -> str | None: ...

    async def check_space(self) -> str | None: ...


log = logging.getLogger("cached.lifecycle")

# Options a reload applies to the running daemon; any other change needs a restart (the
# fleet_* keys too: who the members are and the key are read once, at start).
LIVE = frozenset(
    {
        "image_cache_max_size",
        "max_image_fraction",
        "min_free_space",
        "image_cache_stall_time",
        "cache_prefetcher_interval",
        "cache_prune_interval",
        "cache_clean_interval",
        "log_level",
        "upstream_connect_timeout",
        "upstream_read_timeout",
        "auth_cache_ttl",
        "auth_stale_if_error",
        "prefetch_concurrency",
        "prefetch_retry_initial",
        "prefetch_retry_max",
        "legacy_queue_immediate",
        "admin_tokens",
        "admin_cache_ttl",
        "peers",
        "worker_self_reference_url",
        "metrics_auth",
        "shutdown_grace",
        "scrub_interval",
        "scrub_rate",
        "image_safety_audit_interval",
        "policy",
    }
)

# (old, new): apply the new values; raise to report a part that could not take them.
Reloadable = Callable[[Config, Config], None]
# new -> what to apply on the loop. Runs in the reload's thread (blocking reads allowed) and
# must change nothing itself; ConfigError refuses the whole reload.
Stage = Callable[[Config], Callable[[], None]]


class Reloadables:
    """The parts that take a new configuration without a restart, in registration order."""

    def __init__(self) -> None:
        self._parts: list[tuple[str, Reloadable]] = []
        self._stages: list[tuple[str, Stage]] = []

    def register(self, name: str, apply: Reloadable) -> None:
        self._parts.append((name, apply))

    def register_stage(self, name: str, stage: Stage) -> None:
        """A part that reads something (a file) before it can take the configuration."""
        self._stages.append((name, stage))

    def stage(self, new: Config) -> list[tuple[str, Callable[[], None]]]:
        """Run every stage (blocking: call from a thread). Raises ConfigError to refuse."""
        return [(name, stage(new)) for name, stage in self._stages]

    def apply(
        self,
        old: Config,
        new: Config,
        staged: Sequence[tuple[str, Callable[[], None]]] = (),
    ) -> list[str]:
        """Give every part the new configuration, then apply what the stages read; returns
        the names of those that failed."""
        steps: list[tuple[str, Callable[[], None]]] = [
            (name, functools.partial(part, old, new)) for name, part in self._parts
        ]
        failed = []
        for name, step in [*steps, *staged]:
            try:
                step()
            except Exception:
                log.exception("reload: %s could not take the new configuration", name)
                failed.append(name)
        return failed


RELOADABLES = web.AppKey("reloadables", Reloadables)


def changed_options(old: Config, new: Config) -> list[str]:
    names = [f.name for f in dataclasses.fields(Config)]
    return [n for n in names if getattr(old, n) != getattr(new, n)]


@dataclasses.dataclass
class ReloadStatus:
    """What ``/healthz`` says about reloads (``cached reload`` waits on it).

    ``started``/``finished`` count reloads since the daemon started; the result fields are
    those of reload number ``finished``. Changed by the :class:`Reloader` on the event loop.
    """

    started: int = 0
    finished: int = 0
    result: str = ""  # "applied", "partly applied" (a part failed) or "refused"; "" before any
    message: str = ""  # the refusal's reason, the failed parts, or what was applied
    restart_needed: tuple[str, ...] = ()  # options changed that take effect after a restart
    in_force_at: float | None = None  # time.time() of the last reload that put it all in force

    def as_json(self, detail: bool) -> dict[str, object]:
        """``detail`` (the management listener only): also the process id and the message (a
        refusal's message may quote the file's values). The names of the options that need
        a restart are shown everywhere: ``cached reload`` must never call such a change
        applied, whichever listener it could reach."""
        counters: dict[str, object] = {
            "started": self.started,
            "finished": self.finished,
            "result": self.result,
            "restart_needed": list(self.restart_needed),
        }
        if not detail:
            return counters
        return counters | {
            "pid": os.getpid(),  # the process to signal (cached reload checks it)
            "message": self.message,
        }


class Reloader:
    """``SIGHUP``: load the same file and flags again and apply what can change live."""

    def __init__(
        self,
        load: Callable[[], Config],
        current: Config,
        parts: Reloadables,
        notifier: Notifier,
        status: Callable[[], str],
        reloads: ReloadStatus | None = None,
    ) -> None:
        self._load = load
        self.current = current
        self._parts = parts
        self._notifier = notifier
        self._status = status
        self.reloads = reloads if reloads is not None else ReloadStatus()
        self._running: asyncio.Task[None] | None = None
        self._again = False

    def request(self) -> None:
        """Start a reload (signal handler). One runs at a time; signals that arrive during
        one make one more reload after it, so the last signal always sees the file as it
        was when it was sent."""
        if self._running is None or self._running.done():
            self._running = asyncio.get_running_loop().create_task(self._reload_while_asked())
        else:
            self._again = True

    async def _reload_while_asked(self) -> None:
        while True:
            self._again = False
            await self.reload()
            if not self._again:
                return

    async def reload(self) -> bool:
        """Returns whether a new configuration was taken."""
        self._notifier.reloading()
        reloads = self.reloads
        reloads.started += 1
        number = reloads.started
        result, message = "refused", ""
        restart: tuple[str, ...] = ()
        try:
            old = self.current

            def load_and_stage() -> tuple[Config, list[tuple[str, Callable[[], None]]]]:
                new = self._load()
                return new, self._parts.stage(new)

            try:
                new, staged = await asyncio.to_thread(load_and_stage)
            except ConfigError as exc:
                message = str(exc)
                log.error("reload refused, still running on the previous configuration: %s", exc)
                return False
            except Exception as exc:  # a bug, not the file: say so, and keep running
                message = f"unexpected error: {exc!r}"
                log.exception("reload failed, still running on the previous configuration")
                return False
            changed = changed_options(old, new)
            live = [k for k in changed if k in LIVE]
            restart = tuple(k for k in changed if k not in LIVE)
            applied = dataclasses.replace(old, **{k: getattr(new, k) for k in live})
            failed = self._parts.apply(old, applied, staged)
            self.current = applied
            result = "partly applied" if failed else "applied"
            message = ("applied " + ", ".join(live) if live else "nothing to change") + (
                " (failed: " + ", ".join(failed) + ")" if failed else ""
            )
            log.info("reloaded: %s", message)
            if restart:
                log.warning("reload: %s changed: takes effect after a restart", ", ".join(restart))
            return True
        finally:
            reloads.finished = number
            reloads.result, reloads.message, reloads.restart_needed = result, message, restart
            if result == "applied" and not restart:
                reloads.in_force_at = time.time()
            self._notifier.ready(self._status())


# ---------------------------------------------------------------------------- status
def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def status_text(ops: Ops) -> str:
    """One line for ``systemctl status``: mode, entries, bytes used of the maximum."""
    store = ops.store
    if store is None:
        return "loading the cache index"
    entries = list(store.entries.values())
    partial = sum(not e.complete for e in entries)
    used = sum(e.size if e.complete else e.present_bytes() for e in entries)
    fills = len(ops.filler.fills) if ops.filler is not None else 0
    text = (
        f"{ops.mode()}; {len(entries) - partial} images cached, {partial} partial; "
        f"{_size(used)} of {_size(ops.config.image_cache_max_size)} used; {fills} filling"
    )
    upstream = ops.known_upstream_problem
    if upstream:  # downloads fail (or a file store's answer 503) meanwhile: say so
        text += f"; upstream {upstream}"
    if ops.space_warning:
        text += f"; {ops.space_warning}"
    return ("draining: " + text) if ops.draining else text


# ---------------------------------------------------------------------------- the tick
PROGRESS_EVERY = 10.0  # seconds between progress lines of a long fill
STATUS_EVERY = 5.0


class Progress:
    """Logs percent and MB/s of running fills (client misses and prefetch), at most every
    ``PROGRESS_EVERY`` seconds per fill."""

    def __init__(self, filler: Filler) -> None:
        self._filler = filler
        self._seen: dict[str, tuple[object, float, int]] = {}  # id -> (fill, when, bytes)

    def log(self, now: float) -> None:
        fills = self._filler.fills
        for image_id in [i for i in self._seen if i not in fills]:
            del self._seen[image_id]
        for image_id, fill in list(fills.items()):
            seen = self._seen.get(image_id)
            if seen is None or seen[0] is not fill:
                self._seen[image_id] = (fill, now, fill.upstream_bytes)
                continue
            _, then, before = seen
            if now - then < PROGRESS_EVERY:
                continue
            entry = fill.entry
            done = min(entry.size, len(fill.written) * entry.chunk_size)
            rate = (fill.upstream_bytes - before) / (now - then) / 1e6
            log.info(
                "fill %s: %d%% of %s, %.1f MB/s from the upstream",
                image_id,
                100 * done // entry.size if entry.size else 100,
                _size(entry.size),
                rate,
            )
            self._seen[image_id] = (fill, now, fill.upstream_bytes)


async def tick(ops: Ops, notifier: Notifier, progress: Progress | None) -> None:
    """Measure loop lag; ping the watchdog; refresh STATUS; log fill progress. Runs forever."""
    loop = asyncio.get_running_loop()
    watchdog = notifier.watchdog_interval
    period = min(0.5, watchdog / 3) if watchdog else 0.5
    last_status, status_at = "", -STATUS_EVERY
    expected = loop.time() + period
    pinged = -float("inf")
    while True:
        await asyncio.sleep(period)
        now = loop.time()
        ops.metrics.loop_late(max(0.0, now - expected))
        expected = now + period
        # About every half of WatchdogSec (sd_watchdog_enabled(3)'s advice), not every tick:
        # the tick runs more often to measure the loop's lag.
        if watchdog and now - pinged >= watchdog / 2 - period / 2:
            pinged = now
            notifier.watchdog()
        try:
            if now - status_at >= STATUS_EVERY:
                status_at = now
                await ops.check_space()
                text = status_text(ops)
                if text != last_status and notifier.status(text):
                    last_status = text
            if progress is not None:
                progress.log(now)
        except Exception:  # never let a report stop the pings
            log.exception("periodic status report failed")


def install_freeze_hook(loop: asyncio.AbstractEventLoop, signum: int) -> None:
    """Debug only (``$CACHED_DEBUG_FREEZE_FILE``): on ``signum`` the event loop blocks while
    that file exists, to test that a stuck loop stops the watchdog pings."""
    path = os.environ.get("CACHED_DEBUG_FREEZE_FILE")
    if not path:
        return

    def freeze() -> None:
        log.warning("debug: event loop frozen while %s exists", path)
        while os.path.exists(path):
            time.sleep(0.01)
        log.warning("debug: event loop running again")

    loop.add_signal_handler(signum, freeze)
