"""Inspecting a complete entry again, from its file (issue 18, "A hit"): entries filled
before inspection existed, or whose verdict was made by another oslo.utils version or under
another policy (:meth:`cached.safety.verdict.Policy.fingerprint`), are inspected on their
first hit and by the ``audit`` job (:meth:`cached.safety.audit.Safety.audit`).

The inspector reads the file as a fill's catch-up does (:meth:`Inspector.catch_up`: aligned
64 KiB reads until decided, then the last bytes if a VMDK footer is wanted), so a
re-inspection gives the verdict the fill would have given. The new verdict is written with
:func:`cached.store.integrity.write_access`, which re-records the commit record after the
xattr write (or writes nothing when the file is no longer the one last verified).

Every function here blocks: call it from the store's I/O threads (``Store.run``), never from
the loop. No shared state but the entry's ``identity``/``suspect``, under its
``identity_lock`` (inside ``write_access``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cached.safety import record
from cached.safety.inspect import VERSION, Inspector
from cached.safety.verdict import Declared, Observation, Policy, Verdict, judge
from cached.store import integrity, xattrs
from cached.store.entry import Entry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inspected:
    """One re-inspection: the verdict, and what it cost (in the I/O thread)."""

    verdict: Verdict
    seconds: float  # wall time: open, reads, inspection, judging, the xattr write
    cpu_seconds: float  # the thread's CPU time for the same
    stored: bool  # the verdict was written (or, the file changed meanwhile, left) to the file


def inspect_entry(entry: Entry, declared: Declared, policy: Policy, store: bool) -> Inspected:
    """Inspect the complete ``entry`` from its file and judge it against ``declared``;
    with ``store``, write the verdict to the file (re-recording the commit record).

    Read errors become an ``error`` verdict (never raised); such a verdict is not stored (the
    next hit or audit tries again). Blocking.

    Returns: the verdict and its cost; ``stored`` False when ``store`` was False or the
    verdict is an ``error`` of reading the file.
    """
    started, cpu = time.perf_counter(), time.thread_time()
    try:
        fd = os.open(entry.path, os.O_RDONLY)
    except OSError as exc:
        seen = Observation((), 0, VERSION, f"{type(exc).__name__}: {exc.strerror or exc}"[:200])
    else:
        try:
            seen = Inspector().catch_up(fd, entry.size)
        finally:
            os.close(fd)
    verdict = judge(seen, declared, policy)
    stored = False
    if store and seen.error is None:
        try:
            integrity.write_access(entry, entry.path, {record.NAME: record.dumps(verdict)})
            stored = True
        except ValueError as exc:  # pragma: no cover - judge's verdicts always encode
            log.warning("cannot store the verdict of %s: %s", entry.image_id, exc)
    return Inspected(verdict, time.perf_counter() - started, time.thread_time() - cpu, stored)


def read_verdicts(paths: list[Path]) -> list[bytes | None | OSError]:
    """The raw ``user.cached.verdict`` of each file (None: it has none; an OSError: the
    file could not be read). Blocking: one call for many entries (a list, an audit)."""
    found: list[bytes | None | OSError] = []
    for path in paths:
        try:
            found.append(xattrs.read_all(path).get(record.NAME))
        except OSError as exc:
            found.append(exc)
    return found
