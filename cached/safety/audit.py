"""Inspection for the whole daemon, in audit and enforce modes (``image_safety_mode``).

**audit** (the default): every fill's content is inspected as it streams, its verdict is
stored with the entry (``user.cached.verdict``, before the commit record), logged, and sent in
``Cached-Image-Verdict`` on hits. Nothing is refused.

**enforce**: the same, and an image whose verdict is ``unsafe``, ``mismatch`` or ``error``
(enforce fails closed; ``safe`` and ``not-inspectable`` pass) is never a hit. Its
:class:`~cached.safety.violations.Violation` (id, ``os_hash_value``, verdict) is kept in
memory and in ``<image_cache_dir>/verdicts/``, and its entry is dropped. What its downloads
get (``image_safety_on_violation``) is decided by the proxy: ``pass-through`` (the upstream's
data, ``Cache-Status: cached; fwd=bypass; detail=unsafe-format``) or ``refuse`` (403). A fill
learns its *header verdict* as soon as the inspector has decided (:meth:`FillAudit.report`,
after a feed): with ``refuse`` the fill fails at once, cutting the downloads that follow it
(a whole image's last byte is held back until the fill is verified, so none completes);
with ``pass-through`` it goes on for its readers and is never committed.

Ownership and threads:

- :class:`Safety`, one per daemon (built by ``app.py``), belongs to the event loop: its maps
  of known verdicts and violations are read and changed on the loop only. Reading a verdict
  from an entry's xattr, and reading and writing violation records, run on the store's I/O
  threads.
- :class:`FillAudit`, one per fill, belongs to that fill. It is a stream consumer
  (cached/fill/consumers.py): :meth:`FillAudit.feed`, :meth:`FillAudit.catch_up`,
  :meth:`FillAudit.read_ahead` and :meth:`FillAudit.finish` run on the fill's feeder lane
  (its :class:`Inspector` is touched by one thread at a time, in stream order); the loop
  judges the inspector's observation in :meth:`FillAudit.report` (after a feed job is done:
  the observation is set once, before it is read) and reads :attr:`FillAudit.verdict` after
  the finish job is done.

Not here (issue 18): re-inspection of entries filled before inspection or under another
oslo.utils version or policy (until then an entry without a current verdict is served as in
audit), signatures.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from cached import metrics
from cached.digest import Buffer
from cached.errors import CachedError
from cached.safety import record, violations
from cached.safety.inspect import VERSION, Inspector
from cached.safety.verdict import NAME, Declared, Policy, Verdict, declared_by, judge
from cached.safety.violations import Violation
from cached.store import xattrs
from cached.store.entry import Entry
from cached.upstream import ImageRecord

log = logging.getLogger(__name__)

HEADER = "Cached-Image-Verdict"
_SWEEP_EVERY = 1024  # insertions between sweeps of verdicts of entries that are gone


class UnsafeImage(CachedError):
    """A fill stopped because its content violates the enforced policy (``refuse``)."""

    def __init__(self, image_id: str, verdict: Verdict):
        super().__init__(f"image {image_id} refused: its content is {describe(verdict)}")
        self.verdict = verdict


class FillAudit:
    """The inspection of one fill (see the module docstring for its threads).

    Args:
        enforce: report violations (``image_safety_mode: enforce``).
        on_violation: told (on the loop) of the first violating verdict, header or final.
    """

    def __init__(
        self,
        image_id: str,
        declared: Declared,
        policy: Policy,
        on_commit: Callable[[Entry, FillAudit], None] | None = None,
        *,
        os_hash_value: str | None = None,
        enforce: bool = False,
        on_violation: Callable[[FillAudit, Verdict], None] | None = None,
    ):
        self.image_id = image_id
        self.os_hash_value = os_hash_value
        self.declared = declared
        self.policy = policy
        self.inspector = Inspector()
        self.verdict: Verdict | None = None  # the final verdict (finish)
        self.header: Verdict | None = None  # judged on the loop once the inspector decided
        self.violation: Verdict | None = None  # enforce: the first violating verdict
        self.enforce = enforce
        self._on_commit = on_commit
        self._on_violation = on_violation
        # The fill's own reaction to a violation (Fill sets it: refuse stops the fill).
        self.stop: Callable[[Verdict], None] | None = None

    # -- the stream-consumer seam (cached/fill/consumers.py)

    def feed(self, offset: int, data: Buffer) -> None:
        self.inspector.feed(offset, data)

    def catch_up(self, fd: int, size: int) -> object:
        return self.inspector.catch_up(fd, size)

    def read_ahead(self, fd: int, upto: int) -> None:
        """Feed the inspector bytes ``[position, upto)`` from the file (feeder lane)."""
        self.inspector.read_ahead(fd, upto)

    def report(self) -> None:
        """On the loop, after a feed job: judge the inspector's decision once it has one
        (enforce mode: a violation is told at once)."""
        if self.header is not None or not self.enforce:
            return
        seen = self.inspector.observation
        if seen is None:
            return
        self.header = judge(seen, self.declared, self.policy)
        if not self.header.allowed:
            self.violated(self.header)

    def violated(self, verdict: Verdict) -> None:
        """Tell of a violating verdict, once. Loop only."""
        if self.violation is not None:
            return
        self.violation = verdict
        if self._on_violation is not None:
            self._on_violation(self, verdict)
        if self.stop is not None:
            self.stop(verdict)

    # -- the end of the fill

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

    @property
    def refused(self) -> bool:
        """Enforce mode, and the final verdict violates: the fill must not commit. Loop only,
        after the finish job."""
        return self.enforce and self.verdict is not None and not self.verdict.allowed

    def committed(self, entry: Entry) -> None:
        """The fill committed ``entry`` (after :meth:`finish`): report the verdict. Loop only."""
        if self._on_commit is not None:
            self._on_commit(entry, self)


class Safety:
    """Inspection for the whole daemon (see the module docstring).

    Args:
        policy: allowed formats and non-fatal checks.
        file_backend: the upstream is a ``file://`` store (its raw/bare is no declaration).
        run: runs a blocking call on the cache's I/O threads (``Store.run``).
        enforce: ``image_safety_mode: enforce``.
        refuse: ``image_safety_on_violation: refuse`` (else pass-through).
        root: the cache directory (violation records go to its ``verdicts/``); None: kept
            in memory only.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        file_backend: bool,
        run: Callable[..., Awaitable[Any]],
        enforce: bool = False,
        refuse: bool = False,
        root: Path | None = None,
    ):
        self.policy = policy
        self._file_backend = file_backend
        self._run = run
        self.enforce = enforce
        self.refuse = enforce and refuse
        self._root = root
        self._fingerprint = policy.fingerprint()
        # image id -> (its entry, its current verdict or None); loop only
        self._known: dict[str, tuple[weakref.ref[Entry], Verdict | None]] = {}
        self._inserted = 0
        # enforce: image id -> why it is kept out of the cache; loop only
        self.violations: dict[str, Violation] = {}
        # Deletes an image's cache entry, safely while it is read or filled (Filler.remove;
        # set by app.py). A running fill goes on only for its readers and never commits.
        self.drop: Callable[[str], Awaitable[object]] | None = None
        self._tasks: set[asyncio.Task[object]] = set()

    async def load(self) -> int:
        """Read the violation records back (enforce mode, at start). Returns how many are
        current (judged by this oslo.utils and policy); the others are removed: those images
        are cached and inspected again."""
        if not self.enforce or self._root is None:
            return 0
        try:
            found = await self._run(violations.load_all, self._root)
        except OSError as exc:  # the cache directory's state is its guard's business
            log.warning("cannot read the verdict records: %s", exc)
            return 0
        for violation in found:
            if self._current(violation.verdict):
                self.violations[violation.image_id] = violation
            else:
                await self._run(violations.remove, self._root, violation.image_id)
        if self.violations:
            log.info("%d image(s) kept out of the cache by their content", len(self.violations))
        return len(self.violations)

    def reload(self) -> None:
        """:meth:`load` in the background (the cache directory was indexed again). Loop."""
        if self.enforce and self._root is not None:
            self._spawn(self.load())

    def _spawn(self, job: Coroutine[Any, Any, object]) -> None:
        task = asyncio.get_running_loop().create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def for_record(self, image: ImageRecord) -> FillAudit:
        """The inspection of a fill of ``image`` (Filler's hook)."""
        declared = declared_by(
            image.raw.get("disk_format"),
            image.raw.get("container_format"),
            file_backend=self._file_backend,
        )
        return FillAudit(
            image.id,
            declared,
            self.policy,
            self.report,
            os_hash_value=image.os_hash_value,
            enforce=self.enforce,
            on_violation=self._fill_violated,
        )

    def report(self, entry: Entry, audit: FillAudit) -> None:
        """A fill committed ``entry``: log its verdict and remember it for hits. Loop only."""
        verdict = audit.verdict
        if verdict is None:
            return
        self._log(entry.image_id, verdict)
        metrics.image_judged(verdict.outcome.value)
        self._remember(entry, verdict)

    def _log(self, image_id: str, verdict: Verdict, action: str = "") -> None:
        level = logging.INFO if verdict.allowed else logging.WARNING
        log.log(
            level,
            "image %s content %s: detected %s, declared %s%s (oslo.utils %s)%s",
            image_id,
            verdict.outcome.value,
            verdict.detected,
            verdict.declared or "nothing",
            f", failed {','.join(verdict.checks)}" if verdict.checks else "",
            verdict.version,
            action,
        )

    # -- enforce

    def known(self, image_id: str, os_hash_value: str | None = None) -> Violation | None:
        """The violation recorded for ``image_id`` (enforce mode), if it applies to the
        content ``os_hash_value``. Loop only."""
        violation = self.violations.get(image_id)
        if violation is None or not violation.applies_to(os_hash_value):
            return None
        return violation

    async def violation(
        self, image_id: str, entry: Entry | None, record: ImageRecord | None
    ) -> Violation | None:
        """Why a download of ``image_id`` must not come from the cache (enforce mode), or
        None: a recorded violation that applies to ``record``'s content, or the current
        stored verdict of the complete ``entry`` (filled in audit mode) that violates. A
        recorded violation the record's ``os_hash_value`` contradicts is forgotten."""
        if not self.enforce:
            return None
        recorded = self.violations.get(image_id)
        if recorded is not None:
            hash_value = record.os_hash_value if record is not None else None
            if recorded.applies_to(hash_value):
                return recorded
            log.info("image %s has new content: its verdict record is forgotten", image_id)
            await self.forget(image_id)
        if entry is None or not entry.complete:
            return None
        verdict = await self.verdict_of(entry)
        if verdict is None or verdict.allowed:
            return None
        return self.violated(image_id, entry.os_hash_value, verdict, counted=True)

    def _fill_violated(self, audit: FillAudit, verdict: Verdict) -> None:
        self.violated(audit.image_id, audit.os_hash_value, verdict)

    def violated(
        self, image_id: str, os_hash_value: str | None, verdict: Verdict, *, counted: bool = False
    ) -> Violation:
        """Record that ``image_id`` violates the policy and drop its entry. Loop only.
        ``counted``: the verdict is in ``cached_image_verdicts_total`` already (its commit)."""
        violation = Violation(image_id, os_hash_value, verdict)
        if self.violations.get(image_id) == violation:
            return violation
        self.violations[image_id] = violation
        action = "refused" if self.refuse else "passed through, never cached"
        self._log(image_id, verdict, f": {action}")
        if not counted:
            metrics.image_judged(verdict.outcome.value)
        self._spawn(self._keep_out(violation))
        return violation

    async def _keep_out(self, violation: Violation) -> None:
        """Write the record, then drop the entry (its fill goes on for its readers only)."""
        if self._root is not None:
            try:
                await self._run(violations.write, self._root, violation)
            except OSError as exc:
                log.warning(
                    "cannot record the verdict of %s (kept in memory): %s", violation.image_id, exc
                )
        if self.drop is not None:
            try:
                await self.drop(violation.image_id)
            except CachedError as exc:
                log.warning("cannot drop the entry of %s: %s", violation.image_id, exc)

    async def forget(self, image_id: str) -> bool:
        """Forget the violation of ``image_id`` (deleted upstream, or new content). Loop."""
        known = self.violations.pop(image_id, None) is not None
        if self._root is not None and self.enforce:
            try:
                known = await self._run(violations.remove, self._root, image_id) or known
            except OSError as exc:
                log.warning("cannot remove the verdict record of %s: %s", image_id, exc)
        return known

    async def settled(self) -> None:
        """Until every record write and entry drop started so far is done (tests, stop)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- hits

    async def header_for(self, entry: Entry) -> str | None:
        """The ``Cached-Image-Verdict`` value for a hit on ``entry``, or None if it has no
        current verdict (filled before inspection, by another oslo.utils or policy)."""
        verdict = await self.verdict_of(entry)
        return header_value(verdict) if verdict is not None else None

    async def verdict_of(self, entry: Entry) -> Verdict | None:
        """The current verdict stored with the complete ``entry``, None if it has none."""
        known = self._known.get(entry.image_id)
        if known is not None and known[0]() is entry:
            return known[1]
        try:
            raw = await self._run(_read_verdict, entry.path)
        except OSError as exc:
            log.debug("cannot read the verdict of %s: %s", entry.image_id, exc)
            return None
        verdict = None
        if raw is not None:
            try:
                verdict = record.loads(raw)
            except ValueError as exc:
                log.warning("unreadable verdict on %s: %s", entry.path, exc)
        return self._remember(entry, verdict)

    def _current(self, verdict: Verdict) -> bool:
        return verdict.version == VERSION and verdict.policy == self._fingerprint

    def _remember(self, entry: Entry, verdict: Verdict | None) -> Verdict | None:
        """Keep ``entry``'s verdict if current (None: no current verdict); returns it."""
        current = verdict if verdict is not None and self._current(verdict) else None
        self._known[entry.image_id] = (weakref.ref(entry), current)
        self._inserted += 1
        if self._inserted % _SWEEP_EVERY == 0:
            for image_id, (ref, _) in list(self._known.items()):
                if ref() is None:
                    del self._known[image_id]
        return current


def describe(verdict: Verdict) -> str:
    """``unsafe (detected qcow2, declared raw; failed checks: backing_file)``: for messages."""
    detected = _shown(verdict.detected) if verdict.detected is not None else "nothing"
    declared = _shown(verdict.declared) if verdict.declared is not None else "nothing"
    checks = f"; failed checks: {', '.join(_shown(c) for c in verdict.checks)}"
    return (
        f"{verdict.outcome.value} (detected {detected}, declared {declared}"
        f"{checks if verdict.checks else ''})"
    )


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


def _read_verdict(path: os.PathLike[str] | str) -> bytes | None:
    """The raw ``user.cached.verdict`` of ``path``, None if it has none. Blocking."""
    return xattrs.read_all(path).get(record.NAME)


__all__ = ["HEADER", "FillAudit", "Safety", "UnsafeImage", "describe", "header_value"]
