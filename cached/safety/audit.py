"""Inspection for the whole daemon, in audit and enforce modes (``image_safety_mode``).

**audit** (the default): every fill's content is inspected as it streams, its verdict is
stored with the entry (``user.cached.verdict``, before the commit record), logged, and sent in
``Cached-Image-Verdict`` on hits. Nothing is refused.

**enforce**: the same, and an image whose verdict is ``unsafe``, ``mismatch`` or ``error``
(enforce fails closed; ``safe`` and ``not-inspectable`` pass) is never a hit, unless an admin
override (:mod:`cached.safety.overrides`) bound to its id *and* its ``os_hash_value`` lets it
be (:meth:`Safety.overridden`; then it is served as in audit). Its
:class:`~cached.safety.violations.Violation` (id, ``os_hash_value``, verdict) is kept in
memory and in ``<image_cache_dir>/verdicts/``, and its entry is dropped. What its downloads
get (``image_safety_on_violation``) is decided by the proxy: ``pass-through`` (the upstream's
data, ``Cache-Status: cached; fwd=bypass; detail=unsafe-format``) or ``refuse`` (403). A fill
learns its *header verdict* as soon as the inspector has decided (:meth:`FillAudit.report`,
after a feed): with ``refuse`` the fill fails at once, cutting the downloads that follow it
(a whole image's last byte is held back until the fill is verified, so none completes);
with ``pass-through`` it goes on for its readers and is never committed.

Entries without a *current* verdict (none: filled before inspection or with ``off``; or one
made by another oslo.utils version or under another policy, :meth:`Safety.current`) are
inspected again from their file (:mod:`cached.safety.reinspect`): on their first hit (before
the answer's headers go out; under enforce before the download is let use the entry at all,
:meth:`Safety.violation`), by the ``audit`` job (:meth:`Safety.audit`, scheduled in
``cached/jobs/schedule.py``), and by an admin's recheck (:meth:`Safety.recheck`). Under
enforce a new verdict that violates is handled as a fill's (recorded, the entry dropped); a
re-inspection that fails (``error``, never stored) keeps that download from the cache but is
not recorded: the next hit inspects again.

Ownership and threads:

- :class:`Safety`, one per daemon (built by ``app.py``), belongs to the event loop: its maps
  of known verdicts, violations and overrides, its running inspections and audit are read and
  changed on the loop only. Reading verdicts from xattrs, inspecting a file again, writing
  the new verdict (with the commit record renewed), and reading or writing violation records
  and override files run on the store's I/O threads (``Store.run``), never on the loop.
- :class:`FillAudit`, one per fill, belongs to that fill. It is a stream consumer
  (cached/fill/consumers.py): :meth:`FillAudit.feed`, :meth:`FillAudit.catch_up`,
  :meth:`FillAudit.read_ahead` and :meth:`FillAudit.finish` run on the fill's feeder lane
  (its :class:`Inspector` is touched by one thread at a time, in stream order); the loop
  judges the inspector's observation in :meth:`FillAudit.report` (after a feed job is done:
  the observation is set once, before it is read) and reads :attr:`FillAudit.verdict` after
  the finish job is done.

**Signatures under enforce** (``image_signature_verify``; :mod:`cached.safety.signatures`
verifies): a hit also needs an allowed signature result
(:meth:`~cached.safety.signature.SignatureCheck.allows`). A fill's signature covers the whole
image, so it is judged at the end, after the digest matched and the content's verdict is
allowed, before the commit (``Fill._finish`` calls :meth:`FillAudit.signature_violated`):
with ``refuse`` the fill fails there (the held-back last byte never goes), with
``pass-through`` it completes for its readers uncommitted. A complete entry's signature is
checked by :meth:`Safety.violation` after its verdict (``Signatures.check_for``: verified
again from the file if its properties changed); the ``audit`` job and an admin's recheck
check it too, against the record looked up with the daemon's own credentials
(:meth:`Safety.check_signature`: a property changed at the upstream is noticed without a
hit; skipped and counted without credentials). Either way the
:class:`~cached.safety.violations.Violation` carries the content verdict and the signature
check (``signature``), recorded and handled like a content violation (the proxy's bypass
detail is ``bad-signature``; the 403 names the result). It is forgotten when the image's
record shows other signature properties (:meth:`Violation.properties_differ`, checked by
:meth:`Safety.violation` and :meth:`Safety.known` with the record at hand), and at start
(:meth:`Safety.load`) when it no longer holds (signatures off, other anchors, an unsigned
image no longer required to be signed). An override spares it as it spares a verdict.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cached import metrics
from cached.digest import Buffer
from cached.errors import CachedError
from cached.safety import overrides, record, violations
from cached.safety.inspect import VERSION, Inspector
from cached.safety.overrides import Override
from cached.safety.reinspect import Inspected, inspect_entry, read_verdicts
from cached.safety.signature import MEANINGS, Check, Result, SignatureCheck, Signed
from cached.safety.signatures import Signatures
from cached.safety.verdict import (
    NAME,
    Declared,
    Outcome,
    Policy,
    Verdict,
    declared_by,
    judge,
)
from cached.safety.violations import Violation
from cached.store import xattrs
from cached.store.entry import Entry
from cached.upstream import ImageRecord

log = logging.getLogger(__name__)

HEADER = "Cached-Image-Verdict"
_SWEEP_EVERY = 1024  # insertions between sweeps of verdicts of entries that are gone


class UnsafeImage(CachedError):
    """A fill stopped because its content (or, with ``signature``, its signature) violates
    the enforced policy (``refuse``)."""

    def __init__(self, image_id: str, verdict: Verdict, signature: Check | None = None):
        super().__init__(f"image {image_id} refused: {reason(verdict, signature)}")
        self.verdict = verdict
        self.signature = signature


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
        on_signature: Callable[[FillAudit, Check], None] | None = None,
    ):
        self.image_id = image_id
        self.os_hash_value = os_hash_value
        self.declared = declared
        self.policy = policy
        self.inspector = Inspector()
        self.verdict: Verdict | None = None  # the final verdict (finish)
        self.header: Verdict | None = None  # judged on the loop once the inspector decided
        self.violation: Verdict | None = None  # enforce: the first violating verdict
        # enforce with image_signature_verify: the signature check that keeps the image out
        # (judged at the end of the fill, the content's verdict allowed)
        self.signature: Check | None = None
        self.enforce = enforce
        self._on_commit = on_commit
        self._on_violation = on_violation
        self._on_signature = on_signature
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

    def signature_violated(self, check: Check) -> None:
        """The fill's signature result is not allowed (enforce; told once, on the loop, at
        the end of the fill, after :meth:`finish`, when the content's verdict is allowed)."""
        if not self.enforce or self.violation is not None or self.signature is not None:
            return
        self.signature = check
        if self._on_signature is not None:
            self._on_signature(self, check)

    @property
    def refused(self) -> bool:
        """Enforce mode, and the final verdict or the signature violates: the fill must not
        commit. Loop only, after the finish job."""
        if not self.enforce:
            return False
        return (self.verdict is not None and not self.verdict.allowed) or (
            self.signature is not None
        )

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
    # image_signature_verify: entries whose signature result was checked against the
    # upstream's record (looked up with the daemon's credentials), of them verified again
    # from the file (properties changed, no result, other anchors, chain expired), and
    # entries not checked (no credentials, no record to be had now)
    signatures_checked: int = 0
    signatures_changed: int = 0
    signatures_skipped: int = 0

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
            "signatures_checked": self.signatures_checked,
            "signatures_changed": self.signatures_changed,
            "signatures_skipped": self.signatures_skipped,
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
    failed: bool = False  # an ``error`` of a re-inspection (not stored: the next hit retries)


Lookup = Callable[[str], Awaitable[ImageRecord | None]]


class Safety:
    """Inspection for the whole daemon: verdicts of fills, re-inspection of entries without a
    current verdict (first hit, the ``audit`` job, an admin's recheck), admin overrides, and
    (enforce) the violations kept out of the cache. See the module docstring.

    Args:
        policy: allowed formats and non-fatal checks.
        file_backend: the upstream is a ``file://`` store (its raw/bare is no declaration).
        run: runs a blocking call on the cache's I/O threads (``Store.run``).
        enforce: ``image_safety_mode: enforce``.
        refuse: ``image_safety_on_violation: refuse`` (else pass-through).
        root: the cache directory (overrides go to its ``safety-overrides/``, violation
            records to its ``verdicts/``); None: both are kept in memory only.
        lookup: the image record of an id with the daemon's own credentials (None without
            any), for entries re-inspected without a declaration of their own.
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
        lookup: Lookup | None = None,
    ):
        self.policy = policy
        self._file_backend = file_backend
        self._run = run
        self.enforce = enforce
        self.refuse = enforce and refuse
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
        # enforce: image id -> why it is kept out of the cache; loop only
        self.violations: dict[str, Violation] = {}
        # Deletes an image's cache entry, safely while it is read or filled (Filler.remove;
        # set by app.py). A running fill goes on only for its readers and never commits.
        self.drop: Callable[[str], Awaitable[object]] | None = None
        # The signature checks (image_signature_verify; set by app.py before load): under
        # enforce a hit needs an allowed signature too.
        self.signatures: Signatures | None = None
        self._tasks: set[asyncio.Task[object]] = set()

    async def load(self) -> int:
        """Read the stored overrides and (enforce mode) the violation records back (at start,
        on the store's I/O threads). Returns how many violations are current (judged by this
        oslo.utils and policy); the others are removed: those images are cached and inspected
        again."""
        await self.load_overrides()
        if not self.enforce or self._root is None:
            return 0
        try:
            found = await self._run(violations.load_all, self._root)
        except OSError as exc:  # the cache directory's state is its guard's business
            log.warning("cannot read the verdict records: %s", exc)
            return 0
        for violation in found:
            if self.current(violation.verdict) and self._signature_stands(violation):
                self.violations[violation.image_id] = violation
            else:
                await self._run(violations.remove, self._root, violation.image_id)
        if self.violations:
            log.info("%d image(s) kept out of the cache by their content", len(self.violations))
        return len(self.violations)

    def _signature_stands(self, violation: Violation) -> bool:
        """Whether a recorded signature violation still holds here: signatures are verified,
        with the anchors it was judged with, and its result is still refused (not so after
        ``image_signature_required`` was turned off for an unsigned image). A content
        violation always does."""
        check = violation.signature
        if check is None:
            return True
        found = self.signatures
        return (
            found is not None
            and check.anchors == found.anchors.fingerprint
            and not SignatureCheck.allows(check.result, found.required)
        )

    def reload(self) -> None:
        """:meth:`load` in the background (the cache directory was indexed again). Loop."""
        if self._root is not None:
            self._spawn(self.load())

    def _spawn(self, job: Coroutine[Any, Any, object]) -> None:
        task = asyncio.get_running_loop().create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ fills
    def for_record(self, image: ImageRecord) -> FillAudit:
        """The inspection of a fill of ``image`` (Filler's hook). Under enforce, an image an
        override lets be served (its id and ``os_hash_value``) is inspected as in audit."""
        return FillAudit(
            image.id,
            self._declared_by(image),
            self.policy,
            self.report,
            os_hash_value=image.os_hash_value,
            enforce=self.enforce and not self.overridden(image.id, image.os_hash_value),
            on_violation=self._fill_violated,
            on_signature=self._fill_signature_violated,
        )

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
        self._log(entry.image_id, verdict)
        metrics.image_judged(verdict.outcome.value)
        self._remember(entry, verdict)

    def _log(self, image_id: str, verdict: Verdict, how: str = "", action: str = "") -> None:
        level = logging.INFO if verdict.allowed else logging.WARNING
        log.log(
            level,
            "image %s content %s%s: detected %s, declared %s%s (oslo.utils %s)%s",
            image_id,
            verdict.outcome.value,
            how,
            verdict.detected,
            verdict.declared or "nothing",
            f", failed {','.join(verdict.checks)}" if verdict.checks else "",
            verdict.version,
            action,
        )

    # ------------------------------------------------------------------ enforce
    def known(
        self,
        image_id: str,
        os_hash_value: str | None = None,
        record: ImageRecord | None = None,
    ) -> Violation | None:
        """The violation recorded for ``image_id`` (enforce mode), if it applies to the
        content ``os_hash_value`` (and, for a signature violation, to the signature
        properties of ``record`` if given) and no override lets that content be served.
        Loop only."""
        violation = self.violations.get(image_id)
        if violation is None or not violation.applies_to(os_hash_value):
            return None
        if violation.properties_differ(_signed_fingerprint(record)):
            return None
        if self.overridden(image_id, os_hash_value):
            return None
        return violation

    async def violation(
        self,
        image_id: str,
        entry: Entry | None,
        record: ImageRecord | None,
        lookup: Lookup | None = None,
    ) -> Violation | None:
        """Why a download of ``image_id`` must not come from the cache (enforce mode), or
        None. Nothing when an override lets the content be served (``record``'s
        ``os_hash_value``, else the ``entry``'s). Else a recorded violation that applies to
        ``record``'s content (one the record's ``os_hash_value`` contradicts is forgotten);
        else the current verdict of the complete ``entry`` if it violates: the stored one
        (an entry filled in audit mode), or, when it has none, the one of inspecting it
        again now (``lookup`` gives its record if no declaration is kept)."""
        if not self.enforce:
            return None
        hash_value = (
            record.os_hash_value
            if record is not None
            else entry.os_hash_value
            if entry is not None
            else None
        )
        if self.overridden(image_id, hash_value):
            return None
        recorded = self.violations.get(image_id)
        if recorded is not None:
            if recorded.properties_differ(_signed_fingerprint(record)):
                # (a PATCH through the proxy, or a change at the upstream: judged again)
                log.info(
                    "image %s has new signature properties: its violation record is forgotten",
                    image_id,
                )
                await self.forget(image_id)
            elif recorded.applies_to(record.os_hash_value if record is not None else None):
                return recorded
            else:
                log.info("image %s has new content: its verdict record is forgotten", image_id)
                await self.forget(image_id)
        if entry is None or not entry.complete:
            return None
        try:
            verdict = await self.verdict_of(entry, lookup=lookup)
        except Exception as exc:  # an inspection that broke: fail closed, for this download
            log.warning("cannot inspect %s again: %s", image_id, exc)
            broken = Verdict(
                Outcome.ERROR, None, None, (), (), None, VERSION, self.fingerprint, str(exc)
            )
            return Violation(image_id, entry.os_hash_value, broken)
        if verdict is None or self.overridden(image_id, entry.os_hash_value):
            return None
        if not verdict.allowed:
            if self._failed(entry):
                return Violation(image_id, entry.os_hash_value, verdict)  # not recorded
            return self.violated(image_id, entry.os_hash_value, verdict, counted=True)
        return await self._signature_violation(entry, verdict, record, lookup)

    async def _signature_violation(
        self,
        entry: Entry,
        verdict: Verdict,
        record: ImageRecord | None,
        lookup: Lookup | None,
    ) -> Violation | None:
        """enforce with signatures: the complete ``entry`` (content allowed) is a hit only if
        its signature result is allowed, verified again first if needed (its properties
        changed, no result stored: ``Signatures.check_for``). A result that cannot be had
        now (no record for an entry without one) keeps this download from the cache, not
        recorded; a refused result is recorded and the entry dropped."""
        signatures = self.signatures
        if signatures is None:
            return None
        image_id = entry.image_id

        async def fetch() -> ImageRecord | None:
            if lookup is None:
                return None  # (a stale hit: the upstream is failing)
            try:
                return await lookup(image_id)
            except CachedError as exc:
                log.debug("cannot look %s up: %s", image_id, exc)
                return None

        check = await signatures.check_for(entry, record, fetch)
        return self._signature_judged(entry, verdict, check)

    def _signature_judged(
        self, entry: Entry, verdict: Verdict, check: Check | None
    ) -> Violation | None:
        """enforce: what ``entry``'s signature ``check`` means for it (its content
        ``verdict`` allowed): None if allowed; a refused result is recorded and the entry
        dropped (a hit's check, the audit's and a recheck's alike). Loop only."""
        signatures = self.signatures
        if signatures is None or signatures.allows(check):
            return None
        image_id = entry.image_id
        if check is None:
            unknown = Check(Result.ERROR, "no record to check it against now", "", "")
            return Violation(image_id, entry.os_hash_value, verdict, unknown)  # not recorded
        if entry.removed:
            return Violation(image_id, entry.os_hash_value, verdict, check)
        return self.violated(image_id, entry.os_hash_value, verdict, signature=check, counted=True)

    def _fill_violated(self, audit: FillAudit, verdict: Verdict) -> None:
        self.violated(audit.image_id, audit.os_hash_value, verdict)

    def _fill_signature_violated(self, audit: FillAudit, check: Check) -> None:
        verdict = audit.verdict
        assert verdict is not None  # (told after the finish job)
        self.violated(audit.image_id, audit.os_hash_value, verdict, signature=check)

    def violated(
        self,
        image_id: str,
        os_hash_value: str | None,
        verdict: Verdict,
        *,
        signature: Check | None = None,
        counted: bool = False,
    ) -> Violation:
        """Record that ``image_id`` violates the policy (its content ``verdict``, or with
        ``signature`` its signature check) and drop its entry. Loop only. ``counted``: the
        verdict is counted already (``cached_image_verdicts_total`` at its commit,
        ``cached_image_reinspections_total`` for a re-inspection)."""
        violation = Violation(image_id, os_hash_value, verdict, signature)
        if self.violations.get(image_id) == violation:
            return violation
        self.violations[image_id] = violation
        action = "refused" if self.refuse else "passed through, never cached"
        if signature is None:
            self._log(image_id, verdict, action=f": {action}")
        else:
            log.warning(
                "image %s signature %s (%s): %s",
                image_id,
                signature.result.value,
                MEANINGS[signature.result],
                action,
            )
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
        """Forget the violation of ``image_id`` (deleted upstream, new content, or an
        override for its content). Loop."""
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
        (raw,) = await self._run(read_verdicts, [entry.path])
        known = self._known.get(entry.image_id)
        if known is not None and known.entry() is entry:
            return known.verdict  # learned meanwhile (a concurrent hit's read or inspection)
        if isinstance(raw, OSError):  # (read_verdicts returns, never raises, its errors)
            log.debug("cannot read the verdict of %s: %s", entry.image_id, raw)
            return None
        return self._remember(entry, self._parsed(entry, raw))

    async def verdict_of(
        self, entry: Entry, *, lookup: Lookup | None = None, again: bool = False
    ) -> Verdict | None:
        """``entry``'s current verdict: as known, read from its xattr, or (when it has no
        current one, or with ``again``) from inspecting the file now. None if the entry is
        not complete or was removed. A re-inspection that failed (``error``, not stored)
        is tried again."""
        if not entry.complete or entry.removed:
            return None
        verdict = await self.stored(entry)
        if self.current(verdict) and not again and not self._failed(entry):
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

    def _failed(self, entry: Entry) -> bool:
        known = self._known.get(entry.image_id)
        return known is not None and known.entry() is entry and known.failed

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
        nothing; else what the entry's metadata kept (``disk_format``/``container_format``,
        in ``user.cached.meta`` since enforce); else what its last verdict recorded; else
        its record, looked up with ``lookup`` (a hit: the caller's credentials, none on a
        stale hit; the audit: the daemon's own). None: not known."""
        if self._file_backend:
            return Declared()
        if entry.disk_format is not None or entry.container_format is not None:
            return declared_by(entry.disk_format, entry.container_format, file_backend=False)
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
        failed = verdict.outcome is Outcome.ERROR and not done.stored
        self._remember(entry, verdict, declared_known=known, failed=failed)
        if (
            self.enforce
            and not verdict.allowed
            and not failed  # (our file could not be read: not the image's verdict to keep)
            and not entry.removed
            and not self.overridden(entry.image_id, entry.os_hash_value)
        ):
            self.violated(entry.image_id, entry.os_hash_value, verdict, counted=True)
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
        self,
        entry: Entry,
        verdict: Verdict | None,
        *,
        declared_known: bool = True,
        failed: bool = False,
    ) -> Verdict | None:
        """Keep ``entry``'s verdict (None: it has none); returns it."""
        old = self._known.get(entry.image_id)
        looked_up = old is not None and old.entry() is entry and old.looked_up
        self._known[entry.image_id] = _Known(
            weakref.ref(entry), verdict, declared_known, looked_up and not declared_known, failed
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
        if image is None and self._lookup is not None:
            image = await self._looked_up(entry.image_id, self._lookup)
        await self.check_signature(entry, done.verdict, image)
        return done.verdict

    async def _looked_up(self, image_id: str, lookup: Lookup) -> ImageRecord | None:
        try:
            return await lookup(image_id)
        except CachedError as exc:
            log.debug("cannot look %s up: %s", image_id, exc)
            return None

    async def check_signature(
        self, entry: Entry, verdict: Verdict | None, image: ImageRecord | None
    ) -> bool | None:
        """The audit's and a recheck's signature check of complete ``entry``
        (``image_signature_verify``): against ``image``, the upstream's record now, its
        stored result is kept or, if its properties' fingerprint differs (or it has no
        parseable result, other anchors, an expired chain), verified again from the file
        and re-recorded (``Signatures.verified``). Under enforce a result not allowed is
        handled as at a hit (:meth:`_signature_judged`: recorded, the entry dropped), when
        its content ``verdict`` is allowed and no override spares it. Returns whether it
        was verified again; None if not checked (signatures off, no record)."""
        signatures = self.signatures
        if signatures is None or image is None or not image.raw or image.rebuilt:
            return None
        if not entry.complete or entry.removed:
            return None

        async def fetch() -> ImageRecord | None:
            return image

        check, again = await signatures.verified(entry, image, fetch)
        if (
            self.enforce
            and check is not None  # (none to be had now: nothing to record)
            and verdict is not None
            and verdict.allowed
            and not self.overridden(entry.image_id, entry.os_hash_value)
        ):
            self._signature_judged(entry, verdict, check)
        return again

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
        checked = changed = unchecked = 0
        took = cpu = 0.0
        for entry, verdict in await self.verdicts(todo):
            if entry.removed or not entry.complete or busy(entry):
                skipped += 1
                continue
            if (
                not every
                and self.current(verdict)
                and self._declared_known(entry)
                and not self._failed(entry)
            ):
                current += 1
            else:
                done = await self._inspect(entry, verdict, self._lookup, why="audit")
                verdict = done.verdict
                inspected += 1
                undeclared += not self._declared_known(entry)
                took += done.seconds
                cpu += done.cpu_seconds
            if self.signatures is None or entry.removed:
                continue
            image = None
            if self._lookup is not None:
                image = await self._looked_up(entry.image_id, self._lookup)
            again = await self.check_signature(entry, verdict, image)
            if again is None:
                unchecked += 1
            else:
                checked += 1
                changed += again
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
            checked,
            changed,
            unchecked,
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
        if self.signatures is not None:
            log.info(
                "safety audit: %d signature results checked against the upstream's records, "
                "%d verified again from the file%s",
                checked,
                changed,
                f"; {unchecked} not checked (no service credentials or no record now)"
                if unchecked
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
        no I/O (what ``enforce`` asks before refusing, dropping or cutting a fill)."""
        found = self._overrides.get(image_id)
        return found is not None and hash_value is not None and found.hash_value == hash_value

    def override_of(self, image_id: str) -> Override | None:
        return self._overrides.get(image_id)

    def overrides(self) -> list[Override]:
        return sorted(self._overrides.values(), key=lambda o: o.image_id)

    async def override(self, image_id: str, hash_value: str, reason: str = "") -> Override:
        """Record an admin override of ``image_id``'s verdict for ``hash_value`` (stored
        durably first, then in force; logged at WARNING). A violation recorded for that
        content (enforce) is forgotten: the image is cached again at its next download
        (withdrawing the override makes its verdict a violation again, at the next hit).
        Raises OSError if it cannot be stored: then it is not in force either."""
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
        recorded = self.violations.get(image_id)
        if recorded is not None and recorded.applies_to(hash_value):
            await self.forget(image_id)
        return made

    async def remove_override(self, image_id: str) -> bool:
        """Withdraw ``image_id``'s override; whether there was one. Logged at WARNING."""
        had = self._overrides.pop(image_id, None) is not None
        if self._root is not None:
            had = await self._run(overrides.remove, self._root, image_id) or had
        if had:
            log.warning("safety override of image %s withdrawn by an admin", image_id)
        return had


def reason(verdict: Verdict, signature: Check | None = None) -> str:
    """Why an image is kept out, for messages: ``its content is unsafe (...)`` or ``its
    signature is bad-signature (the signature does not verify)``."""
    if signature is not None:
        return f"its signature is {signature.result.value} ({MEANINGS[signature.result]})"
    return f"its content is {describe(verdict)}"


def _signed_fingerprint(record: ImageRecord | None) -> str | None:
    """The fingerprint of ``record``'s signature properties; None when it has none to tell
    (no record, or one rebuilt from an entry)."""
    if record is None or not record.raw or record.rebuilt:
        return None
    return Signed.of(record.raw).fingerprint()


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


def _log_failure(task: asyncio.Task[AuditResult]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("safety audit failed", exc_info=task.exception())


__all__ = [
    "HEADER",
    "AuditResult",
    "FillAudit",
    "Safety",
    "UnsafeImage",
    "describe",
    "header_value",
    "reason",
]
