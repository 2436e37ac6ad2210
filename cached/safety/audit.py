"""Audit mode (``image_safety_mode: audit``, the default): every fill's content is inspected as
it streams, its verdict is stored with the entry (``user.cached.verdict``, before the commit
record), logged, and sent in ``Cached-Image-Verdict`` on hits. Nothing is refused: images are
served as they would be without inspection.

Ownership and threads:

- :class:`Safety`, one per daemon (built by ``app.py``), belongs to the event loop: its map of
  known verdicts is read and changed on the loop only. Reading a verdict from an entry's
  xattr (the first hit of an entry this daemon did not fill) runs on the store's I/O threads.
- :class:`FillAudit`, one per fill, belongs to that fill. Its :class:`Inspector` is a stream
  consumer fed on the fill's feeder lane; :meth:`FillAudit.finish` runs on the same lane after
  the last feed (it catches up on bytes the stream skipped, judges, and writes the xattr
  through the fill's file descriptor); the loop reads :attr:`FillAudit.verdict` after that job
  is done and reports it with :meth:`Safety.report`.

Not here yet (issue 18): ``enforce`` (refusing unsafe images), re-inspection of entries
filled before inspection or under another oslo.utils version or policy. Signatures are
checked beside the verdict by :mod:`cached.safety.signatures`.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from cached import metrics
from cached.safety import record
from cached.safety.inspect import VERSION, Inspector
from cached.safety.verdict import NAME, Declared, Policy, Verdict, declared_by, judge
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


class Safety:
    """Audit-mode inspection for the whole daemon.

    Args:
        policy: allowed formats and non-fatal checks.
        file_backend: the upstream is a ``file://`` store (its raw/bare is no declaration).
        run: runs a blocking call on the cache's I/O threads (``Store.run``).
    """

    def __init__(
        self,
        policy: Policy,
        *,
        file_backend: bool,
        run: Callable[..., Awaitable[Any]],
    ):
        self.policy = policy
        self._file_backend = file_backend
        self._run = run
        self._fingerprint = policy.fingerprint()
        # image id -> (its entry, the header of its current verdict or None); loop only
        self._known: dict[str, tuple[weakref.ref[Entry], str | None]] = {}
        self._inserted = 0

    def for_record(self, image: ImageRecord) -> FillAudit:
        """The inspection of a fill of ``image`` (Filler's hook)."""
        declared = declared_by(
            image.raw.get("disk_format"),
            image.raw.get("container_format"),
            file_backend=self._file_backend,
        )
        return FillAudit(image.id, declared, self.policy, self.report)

    def report(self, entry: Entry, audit: FillAudit) -> None:
        """A fill committed ``entry``: log its verdict and remember it for hits. Loop only."""
        verdict = audit.verdict
        if verdict is None:
            return
        level = logging.INFO if verdict.allowed else logging.WARNING
        log.log(
            level,
            "image %s content %s: detected %s, declared %s%s (oslo.utils %s)",
            entry.image_id,
            verdict.outcome.value,
            verdict.detected,
            verdict.declared or "nothing",
            f", failed {','.join(verdict.checks)}" if verdict.checks else "",
            verdict.version,
        )
        metrics.image_judged(verdict.outcome.value)
        self._remember(entry, verdict)

    async def header_for(self, entry: Entry) -> str | None:
        """The ``Cached-Image-Verdict`` value for a hit on ``entry``, or None if it has no
        current verdict (filled before inspection, by another oslo.utils or policy)."""
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

    def _remember(self, entry: Entry, verdict: Verdict | None) -> str | None:
        """Keep the header of ``entry``'s verdict (None: no current verdict); returns it."""
        current = (
            verdict is not None
            and verdict.version == VERSION
            and verdict.policy == self._fingerprint
        )
        header = header_value(verdict) if verdict is not None and current else None
        self._known[entry.image_id] = (weakref.ref(entry), header)
        self._inserted += 1
        if self._inserted % _SWEEP_EVERY == 0:
            for image_id, (ref, _) in list(self._known.items()):
                if ref() is None:
                    del self._known[image_id]
        return header


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


__all__ = ["HEADER", "FillAudit", "Safety", "header_value"]
