"""The signature of peer requests: HMAC-SHA256 with the fleet key.

A request from member S to member T carries its sender, target, a Unix timestamp and
HMAC-SHA256(key, method NL path NL Range NL timestamp NL sender NL target) in hex. The target
accepts it when the signature matches under the current key or the previous one
(``fleet_previous_secret_file``, during a key change), compared in constant time, the
timestamp is within ``SKEW`` seconds of its own clock, the sender is another listed member
and the target is itself (a request signed for one member is refused by every other). The
signature covers neither the body (peer requests have none) nor the query (none is used).

There is no nonce: a request captured on its way to member T is refused by every other
member (signed for T), and accepted again by T within ``SKEW`` seconds of its timestamp
(tests/test_fleet_faults.py replays one). What a replay gets is what the captured request
got: the same method, path and ``Range`` (a ``HEAD``, the same bytes of the same image,
which the key reads anyway) or one more re-verification (``POST .../suspect``).

Requests also carry a digest of the member list (``LIST``): a sibling with another list
is logged (the fleet's members disagree; ownership then differs), not refused.

Immutable after start: a :class:`Trust` is built once from the configuration (fleet keys need
a restart) and read by any task on the loop.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cached.config import FleetMember

SKEW = 30.0  # seconds a signed timestamp may differ from this member's clock

SENDER = "X-Cached-Peer-Sender"
TARGET = "X-Cached-Peer-Target"
TIMESTAMP = "X-Cached-Peer-Time"
SIGNATURE = "X-Cached-Peer-Signature"
LIST = "X-Cached-Peer-List"


class Refused(Exception):
    """A peer request that is not signed, signed badly, stale, or meant for another member;
    the message is for this member's log only (the caller gets a bare 401)."""


def list_digest(members: Sequence[FleetMember]) -> str:
    """A short digest of the member list, the same whatever order it was written in."""
    text = "\n".join(sorted(f"{m.id} {m.url}" for m in members))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _mac(
    key: bytes, method: str, path: str, range_: str, stamp: str, sender: str, target: str
) -> str:
    message = "\n".join((method.upper(), path, range_, stamp, sender, target)).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Trust:
    """This member's id, the members and the keys: signs outgoing, checks incoming requests."""

    self_id: str
    members: tuple[FleetMember, ...]
    key: bytes
    previous_key: bytes | None = None

    @property
    def digest(self) -> str:
        return list_digest(self.members)

    def sign(
        self, method: str, path: str, target: str, range_: str = "", now: float | None = None
    ) -> dict[str, str]:
        """The headers that authenticate a request to member ``target``."""
        stamp = str(int(time.time() if now is None else now))
        return {
            SENDER: self.self_id,
            TARGET: target,
            TIMESTAMP: stamp,
            SIGNATURE: _mac(self.key, method, path, range_, stamp, self.self_id, target),
            LIST: self.digest,
        }

    def verify(
        self, method: str, path: str, headers: Mapping[str, str], now: float | None = None
    ) -> str:
        """The sender of a request to this member; raises :class:`Refused` otherwise."""
        sender = headers.get(SENDER, "")
        target = headers.get(TARGET, "")
        stamp = headers.get(TIMESTAMP, "")
        given = headers.get(SIGNATURE, "")
        if not (sender and target and stamp and given):
            raise Refused("not signed")
        if target != self.self_id:
            raise Refused(f"signed for {target[:63]!r}, not for this member")
        if sender == self.self_id or sender not in {m.id for m in self.members}:
            raise Refused(f"sender {sender[:63]!r} is not a sibling")
        try:
            skew = abs((time.time() if now is None else now) - int(stamp))
        except ValueError:
            raise Refused("bad timestamp") from None
        if skew > SKEW:
            raise Refused(f"timestamp {skew:.0f}s off (more than {SKEW:.0f}s)")
        range_ = headers.get("Range", "")
        matched = False
        for key in (self.key, self.previous_key):
            if key is not None:
                expected = _mac(key, method, path, range_, stamp, sender, target)
                matched |= hmac.compare_digest(expected.encode(), given.encode())
        if not matched:
            raise Refused("bad signature")
        return sender
