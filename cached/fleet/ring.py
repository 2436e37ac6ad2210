"""Who owns an image in the fleet: rendezvous (highest random weight) hashing.

A member's score for an image is the first 8 bytes of SHA-256(member id + NUL + image id),
read as a big-endian number. The member with the highest score owns the image; the members
in descending score are the order in which a fill asks them (the fallback order). Health
never moves ownership: a member that is down is skipped, the order stays. A member that
joins or leaves moves only the images whose order it heads.

Pure functions of their arguments: the same order in every process and on every host.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def score(member_id: str, image_id: str) -> int:
    """The rendezvous score of ``member_id`` for ``image_id``."""
    digest = hashlib.sha256(member_id.encode() + b"\0" + image_id.encode()).digest()
    return int.from_bytes(digest[:8], "big")


def order(member_ids: Iterable[str], image_id: str) -> list[str]:
    """``member_ids`` by descending score for ``image_id``: the owner first. (Equal scores,
    which 64 bits make vanishingly rare, are ordered by id, so every process agrees.)"""
    return sorted(member_ids, key=lambda m: (-score(m, image_id), m))


def owner(member_ids: Iterable[str], image_id: str) -> str:
    """The member that owns ``image_id``: the first of :func:`order`."""
    ids = list(member_ids)
    if not ids:
        raise ValueError("a fleet without members owns nothing")
    return min(ids, key=lambda m: (-score(m, image_id), m))
