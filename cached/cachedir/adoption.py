"""Taking over Glance's image cache: its complete files become cache entries, each verified
against the upstream's digest before it is first served (the rules and the file work are in
:mod:`cached.store.adopt`).

Two ways in, both through :meth:`Adopter.adopt` with the upstream's record of the image:

- At start (:meth:`Adopter.run`, a background task), when the daemon has service
  credentials: every Glance file is looked up upstream, adopted and verified in turn, at
  full disk speed, so later downloads are plain hits.
- At the first download of such an image (the proxy's miss path asks before it starts a
  fill), with the record fetched for that caller: adopted and verified while the client
  waits, then served as a hit. Without service credentials this is the only way in.

A file whose size or digest does not match is never served: the verification moves it to
``invalid/`` and that download fetches the image again. A file that cannot be adopted (the
upstream gives no digest, the image is gone upstream) is left where it is, with a warning.

State: ``Store.foreign`` (the Glance files not adopted yet) is read and changed only on the
event loop, here; an id leaves it before the first ``await`` of its adoption, so each file is
adopted once. The index entry is added on the loop, as every other.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from cached.cachedir.reverify import Integrity
from cached.errors import CachedError
from cached.store import Entry, Store
from cached.store import adopt as files
from cached.upstream import Backend, Credentials, ImageRecord

log = logging.getLogger("cached.adoption")


class Adopter:
    """Adopts the Glance files of one cache directory.

    Args:
        store: the cache directory and its index (``Store.foreign``: what is left to adopt).
        backend: the upstream, asked for image records.
        integrity: verifies an adopted entry before it is served.
        service: the daemon's own credentials, or None (then only at first download).
    """

    def __init__(
        self,
        store: Store,
        backend: Backend,
        integrity: Integrity,
        service: Callable[[], Awaitable[Credentials | None]] | None,
    ) -> None:
        self._store = store
        self._backend = backend
        self._integrity = integrity
        self._service = service
        self.adopted = 0
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Adopt what the index found, in the background (with service credentials)."""
        count = len(self._store.foreign)
        if not count:
            return
        if self._service is None:
            log.warning(
                "%d image file(s) of Glance's cache found in %s: each is adopted at its first "
                "download, once verified against the upstream's digest (configure "
                "service_token or keystone credentials to adopt them all at start)",
                count,
                self._store.root,
            )
            return
        log.info("adopting %d image file(s) of Glance's cache in %s", count, self._store.root)
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        assert self._service is not None
        creds = await self._service()
        if creds is None:
            return
        for image_id in sorted(self._store.foreign):
            try:
                record = await self._backend.record(image_id, creds)
            except CachedError as exc:  # refused, gone, or unreachable
                log.warning(
                    "Glance's cached file of %s not adopted (the upstream's record: %s); "
                    "left in place",
                    image_id,
                    exc,
                )
                continue
            await self.adopt(record)

    async def adopt(self, record: ImageRecord) -> Entry | None:
        """Adopt ``record``'s image if Glance's file of it is here and not adopted yet, and
        verify it now: the entry if it is good, None otherwise (or if there is no such
        file; a mismatch is in ``invalid/`` by then)."""
        image_id = record.id
        if image_id not in self._store.foreign:
            return None
        self._store.foreign.discard(image_id)  # on the loop, before any await: once each
        try:
            entry = await self._store.run(
                files.adopt,
                self._store.root,
                image_id,
                record.size,
                record.checksum,
                record.os_hash_algo,
                record.os_hash_value,
            )
        except (ValueError, OSError) as exc:
            log.warning("Glance's cached file not adopted, left in place: %s", exc)
            return None
        if self._store.get(image_id) is not None:  # cached fetched it meanwhile
            return None
        self._store.entries[image_id] = entry
        if not await self._integrity.verify(entry):
            log.warning("Glance's cached file of %s failed verification: not served", image_id)
            return None
        self.adopted += 1
        log.info("adopted Glance's cached file of %s (%d bytes, digest verified)", image_id,
                 entry.size)  # fmt: skip
        return entry

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


__all__ = ["Adopter"]
