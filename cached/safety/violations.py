"""The verdict records of images that violate the enforced policy (``image_safety_mode:
enforce``): one small file per image in ``<image_cache_dir>/verdicts/<id>``, outside
``invalid/`` (which ``clean`` empties), so a restarted daemon still knows not to cache them.

A record binds the verdict to the image's id and ``os_hash_value`` (the image's content, as
the upstream states it)::

    {"v":1,"id":"<uuid>","os_hash_value":"<hex>|null","verdict":{<user.cached.verdict>}}

An image kept out for its signature (``image_signature_verify``: a result
:meth:`~cached.safety.signature.SignatureCheck.allows` refuses) has the content verdict it
got (allowed) and the signature check, with the fingerprint of the signature properties and
of the anchors it was made for, under one more key::

    {..., "signature":{<user.cached.signature>}}

Parsing is strict (the verdict part by :func:`cached.safety.record.loads`); an unreadable
record is logged and removed: the image is then cached and inspected again.

Blocking file functions, no shared state: call them from the cache's I/O threads.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cached.ids import is_image_id
from cached.safety import record, signature
from cached.safety.signature import Check
from cached.safety.verdict import Verdict
from cached.store import codec

log = logging.getLogger(__name__)

DIRECTORY = "verdicts"
VERSION = 1
MAX_LEN = 1024
_KEYS = frozenset(["v", "id", "os_hash_value", "verdict"])
_OPTIONAL = frozenset(["signature"])
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class Violation:
    """An image the enforced policy keeps out of the cache, and why: its content ``verdict``
    (violating), or, when ``signature`` is set, its signature check (the verdict then is the
    content's, allowed)."""

    image_id: str
    os_hash_value: str | None
    verdict: Verdict
    signature: Check | None = None

    def properties_differ(self, fingerprint: str | None) -> bool:
        """Whether this is a signature violation made for other signature properties than
        those of ``fingerprint`` (:meth:`~cached.safety.signature.Signed.fingerprint` of the
        image's record now; None: not known, the record stands)."""
        return (
            self.signature is not None
            and fingerprint is not None
            and self.signature.fingerprint != fingerprint
        )

    def applies_to(self, os_hash_value: str | None) -> bool:
        """Whether this record speaks of an image whose content hash is ``os_hash_value``
        (unknown on either side: it does, to be safe)."""
        return (
            self.os_hash_value is None
            or os_hash_value is None
            or (self.os_hash_value == os_hash_value)
        )


def dumps(violation: Violation) -> bytes:
    inner = codec.loads_object(record.dumps(violation.verdict), max_len=record.MAX_LEN, max_depth=2)
    doc = {
        "v": VERSION,
        "id": violation.image_id,
        "os_hash_value": violation.os_hash_value,
        "verdict": inner,
    }
    if violation.signature is not None:
        doc["signature"] = codec.loads_object(
            signature.dumps(violation.signature), max_len=signature.MAX_LEN, max_depth=1
        )
    raw = codec.dumps(doc)
    loads(raw)  # never write what would be refused when read back
    return raw


def loads(raw: bytes) -> Violation:
    """Decode a record. Raises ValueError: not exactly what :func:`dumps` writes."""
    doc = codec.loads_object(raw, max_len=MAX_LEN, max_depth=3)
    if not _KEYS <= doc.keys() <= _KEYS | _OPTIONAL:
        raise ValueError(f"keys {sorted(doc.keys())[:8]}")
    if codec.int_field(doc, "v", low=VERSION, high=VERSION) != VERSION:
        raise ValueError("unknown version")  # pragma: no cover - int_field bounds it
    image_id = doc["id"]
    if not isinstance(image_id, str) or not is_image_id(image_id):
        raise ValueError("id: not an image id")
    hash_value = codec.str_field(doc, "os_hash_value", max_len=256)
    if hash_value is not None and (not hash_value or not set(hash_value) <= _HEX):
        raise ValueError("os_hash_value: not hex")
    if not isinstance(doc["verdict"], dict):
        raise ValueError("verdict: not an object")
    verdict = record.loads(codec.dumps(doc["verdict"]))
    check = None
    if "signature" in doc:
        if not isinstance(doc["signature"], dict):
            raise ValueError("signature: not an object")
        check = signature.loads(codec.dumps(doc["signature"]))
    return Violation(image_id, hash_value, verdict, check)


def write(root: Path, violation: Violation) -> None:
    """Store ``violation`` (atomically: a temporary file renamed over the old record)."""
    directory = root / DIRECTORY
    directory.mkdir(exist_ok=True)
    target = directory / violation.image_id
    temporary = directory / f".{violation.image_id}.tmp"
    with open(temporary, "wb") as out:
        out.write(dumps(violation))
        out.flush()
        os.fsync(out.fileno())
    os.rename(temporary, target)


def remove(root: Path, image_id: str) -> bool:
    """Forget the record of ``image_id``; False if there was none."""
    try:
        os.unlink(root / DIRECTORY / image_id)
    except FileNotFoundError:
        return False
    return True


def load_all(root: Path) -> list[Violation]:
    """Every readable record in ``root``'s ``verdicts/`` (created if missing); unreadable
    ones are logged and removed."""
    directory = root / DIRECTORY
    directory.mkdir(exist_ok=True)
    found = []
    for name in sorted(os.listdir(directory)):
        path = directory / name
        if not is_image_id(name):
            if name.startswith(".") and name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # a write that a crash interrupted
            continue
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_LEN + 1)
            violation = loads(raw)
            if violation.image_id != name:
                raise ValueError(f"names {violation.image_id}")
        except (OSError, ValueError) as exc:
            log.warning("unreadable verdict record %s (removed): %s", path, exc)
            path.unlink(missing_ok=True)
            continue
        found.append(violation)
    return found


__all__ = ["DIRECTORY", "Violation", "dumps", "load_all", "loads", "remove", "write"]
