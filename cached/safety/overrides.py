"""Admin overrides of content verdicts (issue 18): "this image may be served although its
verdict says otherwise", bound to the image id *and* its ``os_hash_value``. An override made
for one hash value does not apply to other bytes under the same id (the image's data
replaced upstream, or the override typed for another image).

Stored one small file per image, ``<image_cache_dir>/safety-overrides/<image id>`` (compact
JSON, at most 1 KiB)::

    {"v":1,"image_id":"…","os_hash_value":"ab12…","at":1765080000.5,"reason":"vendor image"}

written to a temporary name, fsynced and renamed (the directory fsynced too), so an override
survives restarts, evictions and refills of the image, and a crash leaves the old file or the
new one. The directory is made on the first override; a file that does not parse is logged
and ignored (the override is then absent: fail closed).

Pure functions and blocking file functions (call those from the store's I/O threads); the
in-memory map of overrides is :class:`cached.safety.audit.Safety`'s, on the loop.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cached.ids import is_image_id
from cached.store import codec
from cached.store.store import fsync_dir

log = logging.getLogger(__name__)

DIRNAME = "safety-overrides"
MAX_LEN = 1024
MAX_REASON = 200
VERSION = 1
HASH = re.compile(r"[0-9a-f]{32,128}")  # os_hash_value: hex (sha512 by default: 128)
_KEYS = frozenset(["v", "image_id", "os_hash_value", "at", "reason"])


@dataclass(frozen=True)
class Override:
    image_id: str
    hash_value: str  # the image's os_hash_value the override is bound to
    at: float  # epoch seconds it was made
    reason: str = ""

    def to_json(self) -> dict[str, object]:
        return {
            "image_id": self.image_id,
            "os_hash_value": self.hash_value,
            "at": self.at,
            "reason": self.reason,
        }


def clean_reason(text: object) -> str:
    """An operator's free text, made safe to store and log: printable, at most 200 chars."""
    if not isinstance(text, str):
        return ""
    return "".join(c if c.isprintable() else "?" for c in text)[:MAX_REASON]


def dumps(override: Override) -> bytes:
    doc = {"v": VERSION, **override.to_json()}
    raw = codec.dumps(doc)
    if len(raw) > MAX_LEN:  # pragma: no cover - bounded fields
        raise ValueError("override too long")
    return raw


def loads(raw: bytes) -> Override:
    """Decode an override file. Raises ValueError for anything :func:`dumps` does not write."""
    doc = codec.loads_object(raw, max_len=MAX_LEN, max_depth=1)
    if doc.keys() != _KEYS:
        raise ValueError(f"keys {sorted(doc.keys())[:8]}")
    codec.int_field(doc, "v", low=VERSION, high=VERSION)
    image_id, hash_value, at, reason = (
        doc["image_id"],
        doc["os_hash_value"],
        doc["at"],
        doc["reason"],
    )
    if not isinstance(image_id, str) or not is_image_id(image_id):
        raise ValueError("image_id: not an image id")
    if not isinstance(hash_value, str) or not HASH.fullmatch(hash_value):
        raise ValueError("os_hash_value: not a hex digest")
    if isinstance(at, bool) or not isinstance(at, int | float) or not 0 <= at < 1e11:
        raise ValueError("at: not a time")
    if not isinstance(reason, str) or clean_reason(reason) != reason:
        raise ValueError("reason: not printable text of at most 200 characters")
    return Override(image_id, hash_value, float(at), reason)


def load_all(root: Path) -> dict[str, Override]:
    """Every override stored under ``root`` (the cache directory). Blocking."""
    directory = root / DIRNAME
    found: dict[str, Override] = {}
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return found
    for name in names:
        if not is_image_id(name):
            continue  # (a temporary file of a write that crashed, or someone else's)
        try:
            override = loads((directory / name).read_bytes())
            if override.image_id != name:
                raise ValueError("image_id differs from the file name")
        except (OSError, ValueError) as exc:
            log.warning("ignoring the safety override %s: %s", directory / name, exc)
            continue
        found[name] = override
    return found


def write(root: Path, override: Override) -> None:
    """Store ``override`` durably (replacing the image's previous one). Blocking."""
    directory = root / DIRNAME
    directory.mkdir(exist_ok=True)
    final = directory / override.image_id
    temporary = directory / f".{override.image_id}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, dumps(override))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, final)
    fsync_dir(directory)


def remove(root: Path, image_id: str) -> bool:
    """Remove the image's override; whether there was one. Blocking."""
    directory = root / DIRNAME
    try:
        os.unlink(directory / image_id)
    except FileNotFoundError:
        return False
    fsync_dir(directory)
    return True
