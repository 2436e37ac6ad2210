"""Signature verification as images are cached and hit (``image_signature_verify``; issue 18,
"Optional: signatures"): the verifier is :mod:`cached.safety.signature`; this module wires it
to fills and hits.

- **As an image is cached**: the fill's record has the signature properties. The digest to
  verify is the fill's own :class:`~cached.digest.Digest` when the hash method is the record's
  ``os_hash_algo`` (sha512 by default: no extra cost); else one more stream consumer, a
  :class:`Digest` of the hash method, rides the fill's feeder lane (fed in stream order and
  caught up from the file on range fills and resumes, like the digest and the inspector).
  The result is judged and stored in ``user.cached.signature`` on the feeder lane after the
  digest matched, before the commit record (which then covers it).
- **On a hit**: the result sent in ``Cached-Image-Signature`` is the one remembered, else the
  entry's xattr. It is verified again from the file when the properties it was made for are
  not the image's any more: a change seen through the proxy (:meth:`Signatures.changed`, from
  ``Proxy.image_changed`` after a successful PATCH), or a record at hand (a partial entry's)
  whose properties differ; also when the entry has no (parseable) result, when the anchors
  changed, or when the certificate chain has expired since. Verifying again costs one
  public-key operation when the hash method is the entry's ``os_hash_algo`` (the digest of a
  complete entry is its ``os_hash_value``), else hashing the file on the cache's I/O threads;
  the result is re-recorded with the commit record (``integrity.write_access``).
- **By the audit job and an admin's recheck** (``Safety.check_signature``): the same, against
  the record the daemon looks up with its own credentials (:meth:`Signatures.verified` also
  says whether the result was verified again), so a property changed at the upstream is
  noticed without a hit.

Nothing is refused here; enforce mode (a hit = complete + verdict allowed + signature
allowed) is :mod:`cached.safety.audit`'s, which asks this module:

- **At the end of a fill**: :attr:`FillSignature.allowed` (after :meth:`FillSignature.finish`)
  is :meth:`cached.safety.signature.SignatureCheck.allows` ``(check.result, required)``: a
  signed image must verify; an unsigned one passes unless ``image_signature_required``. The
  fill (``Fill._finish``) tells its ``FillAudit`` when it does not, before the commit: the
  image is then kept out like a content violation, and :meth:`FillSignature.rejected`
  reports the result (logged, counted) in place of :meth:`FillSignature.committed`.
- **Before a hit**: ``check = await signatures.check_for(entry, record, fetch)`` then
  :meth:`Signatures.allows`; None (no result can be had now: no record for an entry
  without one) is refused. ``check_for`` may hash the file (a hash method other than
  ``os_hash_algo``, after a change): it is awaited before the response's headers.

A record rebuilt from an entry (``ImageRecord.rebuilt``: a resume, a reader midway) has no
signature properties to check: its fill gets no :class:`FillSignature`, and the first hit
verifies (looking the record up).

Ownership and threads: a :class:`FillSignature` belongs to one fill: :meth:`~FillSignature.
attach` runs on the loop as the fill is built, :meth:`~FillSignature.finish` on its feeder
lane after the last feed and catch-up, :meth:`~FillSignature.committed` on the loop.
:class:`Signatures`, one per daemon, belongs to the event loop (its maps are read and changed
there only); its file work runs on the store's I/O threads.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from cached import metrics
from cached.digest import Digest
from cached.safety.signature import (
    NAME,
    Anchors,
    Check,
    Result,
    SignatureCheck,
    Signed,
    dumps,
    loads,
    verify,
)
from cached.store import integrity, xattrs
from cached.store.entry import Entry
from cached.upstream import ImageRecord

log = logging.getLogger(__name__)

HEADER = "Cached-Image-Signature"
_READ = 4 << 20
_HEX = re.compile(r"[0-9a-fA-F]+")
_MAX_CHANGED = 1 << 16  # image ids remembered as changed; beyond: every stored result doubted
_SWEEP_EVERY = 1024

# Fetches the image's current record for a hit (None: not available now).
FetchRecord = Callable[[], Awaitable[ImageRecord | None]]


class FillSignature:
    """The signature check of one fill (see the module docstring for its threads)."""

    def __init__(
        self,
        image_id: str,
        signed: Signed,
        anchors: Anchors,
        on_commit: Callable[[Entry, FillSignature], None] | None = None,
        *,
        required: bool = False,
        on_reject: Callable[[FillSignature], None] | None = None,
    ):
        self.image_id = image_id
        self.signed = signed
        self.required = required  # image_signature_required (for allowed)
        self._anchors = anchors
        self._on_commit = on_commit
        self._on_reject = on_reject
        self._digest: Digest | None = None  # the fill's own, or ours
        self.consumer: Digest | None = None  # ours: one more stream consumer
        self.check: Check | None = None

    def attach(self, digest: Digest | None) -> Digest | None:
        """Take the fill's ``digest``; returns the stream consumer to add to the fill when
        the hash method is not the digest's (None: nothing to add). Loop, at fill build."""
        name = self.signed.hash_name
        if self.signed.unsigned or name is None:
            return None  # nothing to hash for (verify() tells why)
        if digest is not None and digest.algo == name:
            self._digest = digest
            return None
        self._digest = self.consumer = Digest(name, "")
        return self.consumer

    def finish(self, fd: int, size: int) -> bool:
        """Verify and store the result on the entry's file (feeder lane, after the catch-up
        and the digest matched, before the commit). Returns True (a feeder job's shape)."""
        digest = None
        if self._digest is not None and self._digest.position == size:
            digest = bytes.fromhex(self._digest.hexdigest())
        self.check = verify(self.signed, digest, self._anchors)
        try:
            xattrs.write(fd, NAME, dumps(self.check))
        except (OSError, ValueError) as exc:
            log.warning("cannot store the signature result of %s: %s", self.image_id, exc)
        return True

    def committed(self, entry: Entry) -> None:
        """The fill committed ``entry`` (after :meth:`finish`): report. Loop only."""
        if self._on_commit is not None:
            self._on_commit(entry, self)

    @property
    def allowed(self) -> bool:
        """Whether the result lets the image be a hit under enforce
        (:meth:`SignatureCheck.allows`); False before :meth:`finish` ran (fails closed).
        Loop only, after the finish job."""
        return self.check is not None and SignatureCheck.allows(self.check.result, self.required)

    def rejected(self) -> None:
        """The fill ended without a commit because of enforce (the image is kept out): report
        the result all the same (logged, counted). Loop only, after :meth:`finish`."""
        if self._on_reject is not None:
            self._on_reject(self)


class Signatures:
    """Signature checks for the whole daemon (loop-owned; see the module docstring).

    Args:
        anchors: the certificates (``image_signature_certificate_dir``, ``..._ca_file``).
        required: ``image_signature_required`` (for :meth:`allows`; audit refuses nothing).
        run: runs a blocking call on the cache's I/O threads (``Store.run``).
    """

    def __init__(self, anchors: Anchors, *, required: bool, run: Callable[..., Awaitable[Any]]):
        self.anchors = anchors
        self.required = required
        self._run = run
        # image id -> (its entry, its current check); loop only
        self._known: dict[str, tuple[weakref.ref[Entry], Check]] = {}
        self._changed: set[str] = set()  # properties may have changed since last checked
        self._doubt_stored = False  # _changed overflowed: stored results need a record
        self._verifying: dict[str, asyncio.Future[tuple[Check | None, bool]]] = {}
        self._inserted = 0

    def allows(self, check: Check | None) -> bool:
        """Whether ``check`` (from :meth:`check_for`) lets the image be a hit under this
        daemon's ``image_signature_required``; None (cannot be told now) does not: enforce
        mode fails closed. Audit mode never asks."""
        return check is not None and SignatureCheck.allows(check.result, self.required)

    def for_record(self, image: ImageRecord) -> FillSignature | None:
        """The check of a fill of ``image`` (Filler's hook); None when the record was rebuilt
        from an entry (``ImageRecord.rebuilt``, a resume: its properties are not known; the
        first hit checks)."""
        if not image.raw or image.rebuilt:
            return None
        return FillSignature(
            image.id,
            Signed.of(image.raw),
            self.anchors,
            self._committed,
            required=self.required,
            on_reject=self._rejected,
        )

    def _rejected(self, fill: FillSignature) -> None:
        if fill.check is not None:
            self._report(fill.image_id, fill.check, fill.signed)

    def _committed(self, entry: Entry, fill: FillSignature) -> None:
        if fill.check is not None:
            self._changed.discard(entry.image_id)
            self._report(entry.image_id, fill.check, fill.signed)
            self._remember(entry, fill.check)

    def changed(self, image_id: str, *, deleted: bool = False) -> None:
        """The image's record changed upstream (a PATCH through the proxy): check again
        before the next hit says anything. Loop only."""
        self._known.pop(image_id, None)
        if deleted:
            self._changed.discard(image_id)
            return
        if len(self._changed) >= _MAX_CHANGED:
            self._changed.clear()
            self._known.clear()
            self._doubt_stored = True
        self._changed.add(image_id)

    async def header_for(
        self, entry: Entry, record: ImageRecord | None, fetch: FetchRecord
    ) -> str | None:
        """The ``Cached-Image-Signature`` value for a hit on ``entry`` (None: unknown now)."""
        check = await self.check_for(entry, record, fetch)
        return None if check is None else check.result.value

    async def check_for(
        self, entry: Entry, record: ImageRecord | None, fetch: FetchRecord
    ) -> Check | None:
        """The current signature check of complete ``entry``, verified again if needed (see
        the module docstring); ``record``: the image's record if the caller has one,
        ``fetch``: how to get one when it is needed. None: it cannot be told now (no
        record to be had for an entry without a current result)."""
        return (await self.verified(entry, record, fetch))[0]

    async def verified(
        self, entry: Entry, record: ImageRecord | None, fetch: FetchRecord
    ) -> tuple[Check | None, bool]:
        """:meth:`check_for`, and whether the result was verified again from the file now
        (by this call or one it joined): the audit counts those."""
        image_id = entry.image_id
        known = self._known.get(image_id)
        if known is not None and known[0]() is entry and image_id not in self._changed:
            held = known[1]
            same = (
                record is None
                or not record.raw
                or (held.fingerprint == Signed.of(record.raw).fingerprint())
            )
            if same and (held.until is None or time.time() < held.until):
                return held, False
        pending = self._verifying.get(image_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[tuple[Check | None, bool]]
        future = asyncio.get_running_loop().create_future()
        self._verifying[image_id] = future
        try:
            done = await self._recheck(entry, record, fetch)
        except BaseException:
            future.set_result((None, False))
            raise
        else:
            future.set_result(done)
        finally:
            del self._verifying[image_id]
        return done

    async def _recheck(
        self, entry: Entry, record: ImageRecord | None, fetch: FetchRecord
    ) -> tuple[Check | None, bool]:
        image_id = entry.image_id
        try:
            stored = await self._run(_read_check, entry.path)
        except OSError as exc:
            log.debug("cannot read the signature result of %s: %s", image_id, exc)
            return None, False
        doubted = stored is None or self._doubt_stored or image_id in self._changed
        if doubted and (record is None or not record.raw):
            record = await fetch()
        now = time.time()
        if record is None or not record.raw:  # the properties cannot be known now
            if (
                not doubted
                and stored is not None
                and (stored.current(stored.fingerprint, self.anchors.fingerprint, now))
            ):
                return self._remember(entry, stored), False
            return None, False
        signed = Signed.of(record.raw)
        if stored is not None and stored.current(
            signed.fingerprint(), self.anchors.fingerprint, now
        ):
            self._changed.discard(image_id)
            return self._remember(entry, stored), False
        try:
            check: Check = await self._run(_verify_entry, entry, signed, self.anchors)
        except Exception as exc:  # the file (evicted, unreadable) or the cache's threads
            log.warning("cannot verify the signature of %s again: %s", image_id, exc)
            return None, False  # a hit is still a hit; enforce counts None as not allowed
        self._changed.discard(image_id)
        self._report(image_id, check, signed, again=True)
        return self._remember(entry, check), True

    def _report(self, image_id: str, check: Check, signed: Signed, again: bool = False) -> None:
        bad = check.result not in (Result.VERIFIED, Result.UNSIGNED)
        level = logging.WARNING if bad or (check.result is Result.UNSIGNED and self.required) else (
            logging.INFO
        )  # fmt: skip
        certificate = signed.certificate if isinstance(signed.certificate, str) else None
        log.log(
            level,
            "image %s signature %s%s%s%s",
            image_id,
            check.result.value,
            f" (certificate {certificate[:64]})" if certificate else "",
            f": {check.reason}" if check.reason else "",
            " (verified again from the cached file)" if again else "",
        )
        metrics.image_signature_checked(check.result.value)

    def _remember(self, entry: Entry, check: Check) -> Check:
        self._known[entry.image_id] = (weakref.ref(entry), check)
        self._inserted += 1
        if self._inserted % _SWEEP_EVERY == 0:
            for image_id, (ref, _) in list(self._known.items()):
                if ref() is None:
                    del self._known[image_id]
        return check


def _read_check(path: os.PathLike[str] | str) -> Check | None:
    """The entry's stored check, None if it has none or it does not parse. Blocking."""
    raw = xattrs.read_all(path).get(NAME)
    if raw is None:
        return None
    try:
        return loads(raw)
    except ValueError as exc:
        log.warning("unreadable signature result on %s: %s", path, exc)
        return None


def _verify_entry(entry: Entry, signed: Signed, anchors: Anchors) -> Check:
    """Verify ``signed`` over the complete entry's file and store the result (re-recording
    the commit record). Blocking: the cache's I/O threads."""
    name = signed.hash_name
    digest = None
    if not signed.unsigned and name is not None:
        value = entry.os_hash_value or ""
        if entry.os_hash_algo == name and _HEX.fullmatch(value):
            digest = bytes.fromhex(value)  # a complete entry's data has this digest
        else:
            digest = _hash_file(entry.path, name)
    check = verify(signed, digest, anchors)
    integrity.write_access(entry, entry.path, {NAME: dumps(check)})
    return check


def _hash_file(path: os.PathLike[str] | str, name: str) -> bytes:
    h = hashlib.new(name)
    with open(path, "rb", buffering=0) as f:
        while data := f.read(_READ):
            h.update(data)
    return h.digest()


__all__ = ["HEADER", "FillSignature", "Signatures"]
