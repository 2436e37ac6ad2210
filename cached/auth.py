"""Download authorisation: the upstream decides, with the caller's own credentials.

A positive answer may be reused for ``ttl`` seconds per (credentials, image), but every
change to the image that passes through the proxy forgets the answers for that image.
Negative answers are never reused: the caller gets the upstream's answer every time.
"""

from __future__ import annotations

import time

from cached.upstream import Authorization, Backend, Credentials, Decision

_MAX_REMEMBERED = 100_000


class Authorizer:
    def __init__(self, backend: Backend, ttl: float):
        self._backend = backend
        self._ttl = ttl
        self._allowed: dict[tuple[str, str], tuple[float, Authorization]] = {}
        self.probes = 0

    async def check(self, image_id: str, creds: Credentials) -> Authorization:
        key = (creds.key(), image_id)
        remembered = self._allowed.get(key)
        now = time.monotonic()
        if remembered is not None and remembered[0] > now:
            return remembered[1]
        self.probes += 1
        answer = await self._backend.authorize(image_id, creds)
        if answer.decision is Decision.ALLOW and self._ttl > 0:
            if len(self._allowed) >= _MAX_REMEMBERED:
                self._expire(now)
            self._allowed[key] = (now + self._ttl, answer)
        else:
            self._allowed.pop(key, None)
        return answer

    def forget(self, image_id: str) -> None:
        """Drop every remembered answer about ``image_id`` (it changed through us)."""
        for key in [k for k in self._allowed if k[1] == image_id]:
            del self._allowed[key]

    def _expire(self, now: float) -> None:
        for key in [k for k, (until, _) in self._allowed.items() if until <= now]:
            del self._allowed[key]
        if len(self._allowed) >= _MAX_REMEMBERED:
            self._allowed.clear()
