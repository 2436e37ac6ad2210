"""Audit mode (``image_safety_mode: audit``, the default): every fill's content is inspected as
it streams, its verdict is stored with the entry (``user.cached.verdict``, before the commit
record), logged, and sent in ``Cached-Image-Verdict`` on hits. Nothing is refused: images are
served as they would be without inspection.

Entries without a *current* verdict (none: filled before inspection or with ``off``; or one
made by another oslo.utils version or under another policy, :meth:`Safety.current`) are
inspected again from their file (:mod:`cached.safety.reinspect`): on their first hit
(:meth:`Safety.header_for`), by the ``audit`` job (:meth:`Safety.audit`, scheduled in
``cached/jobs/schedule.py``), and by an admin's recheck (:meth:`Safety.recheck`). Admins'
overrides (:mod:`cached.safety.overrides`) are bound to an image id and its
``os_hash_value``; :meth:`Safety.overridden` is what ``enforce`` asks.

Ownership and threads:

- :class:`Safety`, one per daemon (built by ``app.py``), belongs to the event loop: its map of
  known verdicts, its running inspections and audit, and its map of overrides are read and
  changed on the loop only. Reading verdicts from xattrs, inspecting a file again, writing
  the new verdict (with the commit record renewed) and reading or writing override files run
  on the store's I/O threads (``Store.run``), never on the loop.
- :class:`FillAudit`, one per fill, belongs to that fill. Its :class:`Inspector` is a stream
  consumer fed on the fill's feeder lane; :meth:`FillAudit.finish` runs on the same lane after
  the last feed (it catches up on bytes the stream skipped, judges, and writes the xattr
  through the fill's file descriptor); the loop reads :attr:`FillAudit.verdict` after that job
  is done and reports it with :meth:`Safety.report`.

Not here yet (issue 18): ``enforce`` (refusing unsafe images). Signatures are checked beside
the verdict by :mod:`cached.safety.signatures`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cached import metrics
from cached.errors import CachedError
from cached.safety import overrides, record
from cached.safety.inspect import VERSION, Inspector
from cached.safety.overrides import Override
from cached.safety.reinspect import Inspected, inspect_entry, read_verdicts
from cached.safety.verdict import (
    NAME,
    Declared,
    Outcome,
    Policy,
    Verdict,
    declared_by,
    judge,
)
from cached.store import xattrs
from cached.store.entry import Entry
from cached.upstream import ImageRecord

log = logging.getLogger(__name__)

HEADER = "Cached-Image-Verdict"
_SWEEP_EVERY = 1024  # insertions between sweeps of verdicts of entries that are gone


class FillAudit:
    """The inspection of one fill (see the module docstring for its threads)."""

    def __init__(
        self,
        image_id: str,
        declared: Declared,
        policy: Policy,
        on_commit: Callable[[Entry, FillAudit], None] | None = None,
    ):
        self.image_id = image_id
        self.declared = declared
        self.policy = policy
        self.inspector = Inspector()
        self.verdict: Verdict | None = None
        self._on_commit = on_commit

    def finish(self, fd: int, size: int) -> bool:
        """Catch up, judge, and store the verdict on the entry's file. Feeder thread only.

        Returns True (the shape of a digest's finish, so the fill's pipeline can run it); a
        verdict that cannot be written is logged and kept in memory.
        """
        verdict = judge(self.inspector.catch_up(fd, size), self.declared, self.policy)
        self.verdict = verdict
        try:
            xattrs.write(fd, record.NAME, record.dumps(verdict))
        except (OSError, ValueError) as exc:
            log.warning("cannot store the verdict of %s: %s", self.image_id, exc)
        return True

    def committed(self, entry: Entry) -> None:
        """The fill committed ``entry`` (after :meth:`finish`): report the verdict. Loop only."""
        if self._on_commit is not None:
            self._on_commit(entry, self)


@dataclass(frozen=True)
class AuditResult:
    """One audit pass (:meth:`Safety.audit`)."""

    entries: int = 0  # complete entries looked at
    current: int = 0  # with a verdict of this oslo.utils version and policy
    inspected: int = 0  # inspected again from their file
    skipped: int = 0  # being filled, suspect (re-verified first), or gone meanwhile
    seconds: float = 0.0  # the whole pass
    inspect_seconds: float = 0.0  # the re-inspections alone, in their threads (wall)
    inspect_cpu_seconds: float = 0.0  # their CPU time
    started_at: float = 0.0  # epoch seconds
    every: bool = False  # every entry was inspected, current verdicts too
    undeclared: int = 0  # inspected without a known declaration (not stored)

    @property
    def ms_per_entry(self) -> float | None:
        """Milliseconds per re-inspected entry (wall, in its thread); None if none was."""
        return 1000 * self.inspect_seconds / self.inspected if self.inspected else None

    def to_json(self) -> dict[str, Any]:
        per = self.ms_per_entry
        cpu = 1000 * self.inspect_cpu_seconds / self.inspected if self.inspected else None
        return {
            "started_at": self.started_at,
            "seconds": round(self.seconds, 6),
            "entries": self.entries,
            "current": self.current,
            "inspected": self.inspected,
            "skipped": self.skipped,
            "every": self.every,
            "undeclared": self.undeclared,
            "ms_per_entry": None if per is None else round(per, 3),
            "cpu_ms_per_entry": None if cpu is None else round(cpu, 3),
        }


@dataclass
class _Known:
    """What this daemon knows of one entry's verdict (loop only)."""

    entry: weakref.ref[Entry]
    verdict: Verdict | None  # None: the entry has none (or one that does not parse)
    declared_known: bool = True  # False: judged without knowing the declaration (not stored)
    looked_up: bool = False  # (declared_known False) a hit tried to look the record up


Lookup = Callable[[str], Awaitable[ImageRecord | None]]


class Safety:
    """Inspection for the whole daemon: verdicts of fills, re-inspection of entries without a
    current verdict (first hit, the ``audit`` job, an admin's recheck), and admin overrides.

    Args:
        policy: allowed formats and non-fatal checks.
        file_backend: the upstream is a ``file://`` store (its raw/bare is no declaration).
        run: runs a blocking call on the cache's I/O threads (``Store.run``).
        root: the cache directory (where overrides are kept); None: overrides live in memory.
        lookup: the image record of an id with the daemon's own credentials (None without
            any), for entries re-inspected without a declaration of their own.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        file_backend: bool,
        run: Callable[..., Awaitable[Any]],
        root: Path | None = None,
        lookup: Lookup | None = None,
    ):
        self.policy = policy
        self._file_backend = file_backend
        self._run = run
        self._root = root
        self._lookup = lookup
        self.fingerprint = policy.fingerprint()
        # image id -> what is known of its entry's verdict; loop only
        self._known: dict[str, _Known] = {}
        self._inserted = 0
        self._inspecting: dict[int, asyncio.Future[Inspected]] = {}  # id(entry) -> its inspection
        self._overrides: dict[str, Override] = {}  # image id -> its override; loop only
        self._auditing: asyncio.Task[AuditResult] | None = None
        self.last_audit: AuditResult | None = None

    # ------------------------------------------------------------------ fills
    def for_record(self, image: ImageRecord) -> FillAudit:
        """The inspection of a fill of ``image`` (Filler's hook)."""
        return FillAudit(image.id, self._declared_by(image), self.policy, self.report)

    def _declared_by(self, image: ImageRecord) -> Declared:
        return declared_by(
            image.raw.get("disk_format"),
            image.raw.get("container_format"),
            file_backend=self._file_backend,
        )

    def report(self, entry: Entry, audit: FillAudit) -> None:
        """A fill committed ``entry``: log its verdict and remember it for hits. Loop only."""
        verdict = audit.verdict
        if verdict is None:
            return
        self._log(entry.image_id, verdict, "")
        metrics.image_judged(verdict.outcome.value)
        self._remember(entry, verdict)

    def _log(self, image_id: str, verdict: Verdict, how: str) -> None:
        level = logging.INFO if verdict.allowed else logging.WARNING
        log.log(
            level,
            "image %s content %s%s: detected %s, declared %s%s (oslo.utils %s)",
            image_id,
            verdict.outcome.value,
            how,
            verdict.detected,
            verdict.declared or "nothing",
            f", failed {','.join(verdict.checks)}" if verdict.checks else "",
            verdict.version,
        )

    # ------------------------------------------------------------------ verdicts
    def current(self, verdict: Verdict | None) -> bool:
        """Whether ``verdict`` was made by this oslo.utils version under this policy."""
        return (
            verdict is not None
            and verdict.version == VERSION
            and verdict.policy == self.fingerprint
        )

    async def header_for(self, entry: Entry, lookup: Lookup | None = None) -> str | None:
        """The ``Cached-Image-Verdict`` value for a hit on ``entry``. An entry without a
        current verdict (filled before inspection, by another oslo.utils or policy) is
        inspected again first, from its file, on the store's I/O threads (concurrent hits
        share it); ``lookup`` gives its record when the declaration is not known. None only
        if that fails (logged): a hit is still a hit."""
        try:
            verdict = await self.verdict_of(entry, lookup=lookup)
        except Exception as exc:  # never a failed hit for want of a verdict
            log.warning("cannot inspect %s again: %s", entry.image_id, exc)
            return None
        return header_value(verdict) if verdict is not None else None

    async def stored(self, entry: Entry) -> Verdict | None:
        """``entry``'s verdict as this daemon knows it or reads it from the file, current or
        not (None: none, or one that does not parse). Never inspects."""
        known = self._known.get(entry.image_id)
        if known is not None and known.entry() is entry:
            return known.verdict
        try:
            (raw,) = await self._run(read_verdicts, [entry.path])
        except OSError as exc:
            log.debug("cannot read the verdict of %s: %s", entry.image_id, exc)
            return None
        return self._remember(entry, self._parsed(entry, raw))

    async def verdict_of(
        self, entry: Entry, *, lookup: Lookup | None = None, again: bool = False
    ) -> Verdict | None:
        """``entry``'s current verdict: as known, read from its xattr, or (when it has no
        current one, or with ``again``) from inspecting the file now. None if the entry is
        not complete or was removed."""
        if not entry.complete or entry.removed:
            return None
        verdict = await self.stored(entry)
        if self.current(verdict) and not again:
            known = self._known.get(entry.image_id)
            if lookup is None or known is None or known.declared_known or known.looked_up:
                return verdict
            # Judged without its declaration (no credentials in the audit): this hit's
            # caller may look the record up. Once: a failing look-up is not every hit's.
            known.looked_up = True
        return (await self._inspect(entry, verdict, lookup)).verdict

    def _declared_known(self, entry: Entry) -> bool:
        known = self._known.get(entry.image_id)
        return known is None or known.declared_known

    async def _inspect(
        self,
        entry: Entry,
        previous: Verdict | None,
        lookup: Lookup | None,
        *,
        declared: Declared | None = None,
        why: str = "",
    ) -> Inspected:
        """Inspect ``entry`` from its file (one inspection per entry at a time: a hit, the
        audit and a recheck of the same entry share it)."""
        key = id(entry)  # the entry stays referenced by its task while it is a key
        running = self._inspecting.get(key)
        if running is None:
            running = asyncio.ensure_future(
                self._reinspect(entry, previous, lookup, declared, why or "inspected again")
            )
            self._inspecting[key] = running
            running.add_done_callback(lambda _: self._inspecting.pop(key, None))
        return await asyncio.shield(running)

    async def _declaration(
        self, entry: Entry, previous: Verdict | None, lookup: Lookup | None
    ) -> Declared | None:
        """What the image declares, for judging it again: the ``file`` backend declares
        nothing; else what its last verdict recorded; else its record, looked up with
        ``lookup`` (a hit: the caller's credentials, none on a stale hit; the audit: the
        daemon's own). None: not known."""
        if self._file_backend:
            return Declared()
        if previous is not None and self._declared_known(entry):
            return Declared(previous.declared, previous.container)
        if lookup is None:
            return None
        try:
            image = await lookup(entry.image_id)
        except CachedError as exc:
            log.debug("cannot look %s up: %s", entry.image_id, exc)
            return None
        return self._declared_by(image) if image is not None else None

    async def _reinspect(
        self,
        entry: Entry,
        previous: Verdict | None,
        lookup: Lookup | None,
        declared: Declared | None,
        why: str,
    ) -> Inspected:
        if declared is None:
            declared = await self._declaration(entry, previous, lookup)
        known = declared is not None
        done: Inspected = await self._run(
            inspect_entry, entry, declared or Declared(), self.policy, known
        )
        verdict = done.verdict
        metrics.image_reinspected(verdict.outcome.value, done.seconds)
        if previous is None or previous.outcome != verdict.outcome or not self.current(previous):
            self._log(entry.image_id, verdict, f" ({why})")
        if not known:
            log.debug(
                "%s: declared format unknown (no record, no credentials to look it up): "
                "judged on its content alone, not stored",
                entry.image_id,
            )
        self._remember(entry, verdict, declared_known=known)
        return done

    def _parsed(self, entry: Entry, raw: bytes | None) -> Verdict | None:
        if raw is None:
            return None
        try:
            return record.loads(raw)
        except ValueError as exc:
            log.warning("unreadable verdict on %s: %s", entry.path, exc)
            return None

    def _remember(
        self, entry: Entry, verdict: Verdict | None, *, declared_known: bool = True
    ) -> Verdict | None:
        """Keep ``entry``'s verdict (None: it has none); returns it."""
        old = self._known.get(entry.image_id)
        looked_up = old is not None and old.entry() is entry and old.looked_up
        self._known[entry.image_id] = _Known(
            weakref.ref(entry), verdict, declared_known, looked_up and not declared_known
        )
        self._inserted += 1
        if self._inserted % _SWEEP_EVERY == 0:
            for image_id, known in list(self._known.items()):
                if known.entry() is None:
                    del self._known[image_id]
        return verdict

    async def recheck(self, entry: Entry, image: ImageRecord | None = None) -> Verdict | None:
        """Inspect ``entry`` again now, from its file (an admin's recheck), judged against
        ``image``'s declaration when given. None if the entry is not complete."""
        if not entry.complete or entry.removed:
            return None
        previous = await self.stored(entry)
        declared = self._declared_by(image) if image is not None else None
        done = await self._inspect(entry, previous, None, declared=declared, why="rechecked")
        return done.verdict

    async def verdicts(self, entries: list[Entry]) -> list[tuple[Entry, Verdict | None]]:
        """The stored verdicts of ``entries`` (as known, else read in one I/O job); never
        inspects."""
        unknown = [e for e in entries if not self._knows(e)]
        if unknown:
            raws = await self._run(read_verdicts, [e.path for e in unknown])
            for entry, raw in zip(unknown, raws, strict=True):
                if not isinstance(raw, OSError):
                    self._remember(entry, self._parsed(entry, raw))
        out = []
        for entry in entries:
            known = self._known.get(entry.image_id)
            out.append((entry, known.verdict if known and known.entry() is entry else None))
        return out

    def _knows(self, entry: Entry) -> bool:
        known = self._known.get(entry.image_id)
        return known is not None and known.entry() is entry

    def counts(self, entries: list[Entry]) -> dict[str, int]:
        """Complete entries by current verdict (``unknown``: none known to this daemon yet,
        or not current), from memory: for the ``/metrics`` gauge."""
        counts = dict.fromkeys([*(o.value for o in Outcome), "unknown"], 0)
        for entry in entries:
            known = self._known.get(entry.image_id)
            verdict = known.verdict if known is not None and known.entry() is entry else None
            if verdict is not None and self.current(verdict) and known and known.declared_known:
                counts[verdict.outcome.value] += 1
            else:
                counts["unknown"] += 1
        return counts

    # ------------------------------------------------------------------ the audit job
    def start_audit(
        self,
        entries: Callable[[], list[Entry]],
        busy: Callable[[Entry], bool],
        *,
        every: bool = False,
    ) -> bool:
        """Start an audit in the background (the management API); False if one runs."""
        if self._auditing is not None and not self._auditing.done():
            return False
        task = asyncio.get_running_loop().create_task(self.audit(entries, busy, every=every))
        task.add_done_callback(_log_failure)
        return True

    @property
    def auditing(self) -> bool:
        return self._auditing is not None and not self._auditing.done()

    async def audit(
        self,
        entries: Callable[[], list[Entry]],
        busy: Callable[[Entry], bool],
        *,
        every: bool = False,
    ) -> AuditResult:
        """The ``audit`` job: inspect again, one at a time, every complete entry without a
        current verdict (every entry with ``every``). Runs once at a time: a second call
        waits for the running pass and returns its result.

        Args:
            entries: the complete entries now (the store's index, read on the loop).
            busy: whether an entry must be left alone now (being filled, suspect).
        """
        if self._auditing is not None and not self._auditing.done():
            return await asyncio.shield(self._auditing)
        self._auditing = asyncio.ensure_future(self._audit(entries, busy, every))
        return await asyncio.shield(self._auditing)

    async def _audit(
        self,
        entries: Callable[[], list[Entry]],
        busy: Callable[[Entry], bool],
        every: bool,
    ) -> AuditResult:
        started, at = time.monotonic(), time.time()
        todo = sorted(entries(), key=lambda e: e.image_id)
        current = inspected = skipped = undeclared = 0
        took = cpu = 0.0
        for entry, verdict in await self.verdicts(todo):
            if entry.removed or not entry.complete or busy(entry):
                skipped += 1
                continue
            if not every and self.current(verdict) and self._declared_known(entry):
                current += 1
                continue
            done = await self._inspect(entry, verdict, self._lookup, why="audit")
            inspected += 1
            undeclared += not self._declared_known(entry)
            took += done.seconds
            cpu += done.cpu_seconds
        result = AuditResult(
            len(todo),
            current,
            inspected,
            skipped,
            time.monotonic() - started,
            took,
            cpu,
            at,
            every,
            undeclared,
        )
        per = result.ms_per_entry
        log.info(
            "safety audit: %d entries, %d current, %d inspected again%s, %d skipped in %.1fs%s",
            result.entries,
            current,
            inspected,
            f" ({per:.2f} ms each)" if per is not None else "",
            skipped,
            result.seconds,
            f"; {undeclared} without a known declaration (judged on content, not stored: no "
            "service credentials to look their records up)"
            if undeclared
            else "",
        )
        metrics.safety_audited(result.seconds)
        self.last_audit = result
        return result

    # ------------------------------------------------------------------ overrides
    async def load_overrides(self) -> None:
        """Read the stored overrides (at start, on the store's I/O threads)."""
        if self._root is None:
            return
        try:
            self._overrides = await self._run(overrides.load_all, self._root)
        except OSError as exc:
            log.warning("cannot read the safety overrides: %s", exc)
            return
        for found in self._overrides.values():
            log.warning(
                "safety override in force: image %s with os_hash_value %s… (made %s: %r)",
                found.image_id,
                found.hash_value[:16],
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(found.at)),
                found.reason,
            )

    def overridden(self, image_id: str, hash_value: str | None) -> bool:
        """Whether an admin override lets ``image_id`` with these bytes (its
        ``os_hash_value``) be served whatever its verdict. An override made for another
        hash value does not apply; nor does one when the hash value is unknown. Loop only;
        no I/O (what ``enforce`` asks before refusing)."""
        found = self._overrides.get(image_id)
        return found is not None and hash_value is not None and found.hash_value == hash_value

    def override_of(self, image_id: str) -> Override | None:
        return self._overrides.get(image_id)

    def overrides(self) -> list[Override]:
        return sorted(self._overrides.values(), key=lambda o: o.image_id)

    async def override(self, image_id: str, hash_value: str, reason: str = "") -> Override:
        """Record an admin override of ``image_id``'s verdict for ``hash_value`` (stored
        durably first, then in force; logged at WARNING). Raises OSError if it cannot be
        stored: then it is not in force either."""
        made = Override(image_id, hash_value, time.time(), overrides.clean_reason(reason))
        if self._root is not None:
            await self._run(overrides.write, self._root, made)
        self._overrides[image_id] = made
        log.warning(
            "safety override by an admin: image %s may be served whatever its verdict while "
            "its os_hash_value is %s (%r)",
            image_id,
            hash_value,
            made.reason,
        )
        return made

    async def remove_override(self, image_id: str) -> bool:
        """Withdraw ``image_id``'s override; whether there was one. Logged at WARNING."""
        had = self._overrides.pop(image_id, None) is not None
        if self._root is not None:
            had = await self._run(overrides.remove, self._root, image_id) or had
        if had:
            log.warning("safety override of image %s withdrawn by an admin", image_id)
        return had


def header_value(verdict: Verdict) -> str:
    """``unsafe; detected="qcow2"; declared="raw"; checks="backing_file"`` (an RFC 8941 token
    with string parameters; absent values are left out)."""
    parts = [verdict.outcome.value]
    if verdict.detected is not None:
        parts.append(f'detected="{_shown(verdict.detected)}"')
    if verdict.declared is not None:
        parts.append(f'declared="{_shown(verdict.declared)}"')
    if verdict.checks:
        parts.append(f'checks="{" ".join(_shown(c) for c in verdict.checks)}"')
    return "; ".join(parts)


def _shown(name: str) -> str:
    return name if NAME.fullmatch(name) else "?"  # only plain names go into a header


def _log_failure(task: asyncio.Task[AuditResult]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("safety audit failed", exc_info=task.exception())


__all__ = ["HEADER", "AuditResult", "FillAudit", "Safety", "header_value"]
