"""The cache directory: the set of entries, the download queue, and space accounting.

Layout (Glance's words): ``<root>/<id>`` complete and verified; ``<root>/incomplete/<id>``
being filled (sparse, with a presence bitmap); ``<root>/invalid/<id>`` failed verification;
``<root>/queue/<id>`` empty markers of images queued for prefetch, in mtime order.

Every method blocks on the filesystem: call it from an executor.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from cached.ids import is_image_id as is_image_id  # re-export: proxy.py still imports it here
from cached.store import entry as entries
from cached.store.entry import Entry, State

log = logging.getLogger(__name__)


class Store:
    """All entries under one cache directory, indexed in memory by image id."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.incomplete_dir = self.root / "incomplete"
        self.invalid_dir = self.root / "invalid"
        self.queue_dir = self.root / "queue"
        self.entries: dict[str, Entry] = {}
        self.invalid: set[str] = set()

    def open(self) -> None:
        """Create the sub-directories and rebuild the index from the files and their xattrs."""
        for d in (self.incomplete_dir, self.invalid_dir, self.queue_dir):
            d.mkdir(exist_ok=True)
        started = time.monotonic()
        self.entries.clear()
        for name in os.listdir(self.root):
            if is_image_id(name):
                self._load(self.root / name, State.COMPLETE)
        for name in os.listdir(self.incomplete_dir):
            if is_image_id(name):
                self._load(self.incomplete_dir / name, State.FILLING)
        self.invalid = {n for n in os.listdir(self.invalid_dir) if is_image_id(n)}
        log.info(
            "cache index: %d complete, %d partial, %d invalid in %.3fs (%s)",
            sum(e.complete for e in self.entries.values()),
            sum(not e.complete for e in self.entries.values()),
            len(self.invalid),
            time.monotonic() - started,
            self.root,
        )

    def _load(self, path: Path, expected: State) -> None:
        try:
            entry = entries.load(path)
        except (OSError, ValueError) as exc:
            if expected is State.FILLING:
                # A partial file without usable metadata holds nothing we can trust.
                log.warning("dropping unusable partial entry %s: %s", path, exc)
                path.unlink(missing_ok=True)
            else:
                log.warning("ignoring %s: %s", path, exc)
            return
        if entry.state is State.COMPLETE and expected is State.FILLING:
            # Verified, then the daemon stopped between the state write and the rename.
            final = self.root / entry.image_id
            os.rename(path, final)
            entry.path = final
            log.info("finished committing %s", entry.image_id)
        elif entry.state is not expected:
            log.warning("ignoring %s: state %s in the %s area", path, entry.state.value, expected)
            return
        self.entries[entry.image_id] = entry

    def get(self, image_id: str) -> Entry | None:
        return self.entries.get(image_id)

    def create(
        self,
        image_id: str,
        size: int,
        *,
        checksum: str | None,
        os_hash_algo: str | None,
        os_hash_value: str | None,
    ) -> Entry:
        """Create a new partial entry in ``incomplete/`` (a sparse file of ``size`` bytes)."""
        self._check_id(image_id)
        path = self.incomplete_dir / image_id
        path.unlink(missing_ok=True)
        entry = entries.create(
            path,
            image_id,
            size,
            checksum=checksum,
            os_hash_algo=os_hash_algo,
            os_hash_value=os_hash_value,
        )
        self.entries[image_id] = entry
        return entry

    def commit(self, entry: Entry) -> bool:
        """Make a verified entry servable: mark it complete and move it out of incomplete/.

        Returns False when the entry was removed meanwhile (it is then not re-created).
        """
        if entry.removed:
            return False
        entries.write_state(entry.path, State.COMPLETE)
        final = self.root / entry.image_id
        os.rename(entry.path, final)
        entry.path = final
        entry.state = State.COMPLETE
        self.touch(entry, hit=False)  # the download that filled it was an access too
        try:
            _fsync_dir(self.root)
            _fsync_dir(self.incomplete_dir)
        except OSError as exc:  # the data is flushed; only the rename may not survive a crash
            log.warning("cannot flush the directory of %s: %s", final, exc)
        if entry.removed:  # deleted while we renamed: finish the delete
            final.unlink(missing_ok=True)
            return False
        return True

    def invalidate(self, entry: Entry, reason: str) -> None:
        """Move an entry that failed verification to invalid/; it is never served."""
        self.entries.pop(entry.image_id, None)
        if entry.removed:
            return
        entries.set_state(entry, entry.path, State.INVALID, error=reason)
        target = self.invalid_dir / entry.image_id
        os.rename(entry.path, target)
        entry.path = target
        self.invalid.add(entry.image_id)

    def remove(self, image_id: str) -> Entry | None:
        """Delete an entry (complete or partial). Open readers keep their file until they close."""
        entry = self.entries.pop(image_id, None)
        if entry is None:
            return None
        entry.removed = True
        entry.path.unlink(missing_ok=True)
        return entry

    def remove_invalid(self, image_id: str) -> bool:
        self.invalid.discard(image_id)
        try:
            (self.invalid_dir / image_id).unlink()
            return True
        except FileNotFoundError:
            return False

    def touch(self, entry: Entry, *, hit: bool) -> None:
        if not entry.removed:
            try:
                entries.touch(entry, hit=hit)
            except OSError as exc:  # read-only or full: a hit is still a hit
                log.debug("cannot record access to %s: %s", entry.path, exc)

    def complete_entries(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.complete]

    def partial_entries(self) -> list[Entry]:
        return [e for e in self.entries.values() if not e.complete]

    def total_size(self) -> int:
        """Bytes the cache holds: complete entries plus the filled part of partial ones."""
        return sum(e.size if e.complete else e.present_bytes() for e in self.entries.values())

    # The prefetch queue: zero-byte marker files, ordered by mtime (Glance's queue/).
    def enqueue(self, image_id: str) -> bool:
        self._check_id(image_id)
        marker = self.queue_dir / image_id
        if marker.exists():
            return False
        marker.touch()
        return True

    def dequeue(self, image_id: str) -> bool:
        self._check_id(image_id)
        try:
            (self.queue_dir / image_id).unlink()
            return True
        except FileNotFoundError:
            return False

    def queued(self) -> list[str]:
        markers = []
        for name in os.listdir(self.queue_dir):
            if is_image_id(name):
                try:
                    markers.append((os.stat(self.queue_dir / name).st_mtime, name))
                except FileNotFoundError:
                    continue
        return [name for _, name in sorted(markers)]

    @staticmethod
    def _check_id(image_id: str) -> None:
        if not is_image_id(image_id):
            raise ValueError(f"not an image id: {image_id!r}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
