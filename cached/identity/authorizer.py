"""Download authorisation: the upstream decides, with the caller's own credentials.

A positive answer may be reused for ``ttl`` seconds per (credentials, image), but every
change to the image that passes through the proxy forgets the answers for that image, at
once: an answer whose probe began before the latest change of its image is never stored
(a per-image change counter), so a probe in flight cannot bring a forgotten answer back.
Negative answers are never reused: the caller gets the upstream's answer every time.

``stale_if_error`` (``auth_stale_if_error``; RFC 5861's stale-if-error, for authorisation):
while the upstream is known down, a caller whose same credentials were allowed the same
image within that many seconds is allowed again, marked ``stale``, but only when the caller
(the proxy) says a complete entry is there to serve (``stale_ok``). A refusal (any 4xx) or a
change of the image through the proxy forgets that, at once.

Known down (issue 13 item 3): the last ``down_after`` probes (``auth_stale_after_failures``,
across requests, callers and images) all failed, the current one included, with no answer
from the upstream in between. A failure is no answer (refused, reset, timed out) or a 5xx;
any other answer, a 4xx included, shows the upstream up and restarts the count. One probe
that times out is never an outage: a caller who can slow its own probe down (or make the
upstream fail it) must not be served on an allowance the upstream may have withdrawn.

Owned by the event loop (``check`` and ``forget`` run there, and change the failure count).
"""

from __future__ import annotations

import logging
import time

from cached import metrics
from cached.errors import UpstreamUnavailable
from cached.upstream import Authorization, Backend, Credentials, Decision

log = logging.getLogger("cached.auth")

_MAX_REMEMBERED = 100_000


class Authorizer:
    def __init__(
        self, backend: Backend, ttl: float, stale_if_error: float = 0.0, down_after: int = 3
    ):
        self._backend = backend
        self._ttl = ttl
        self._stale = stale_if_error
        self._down_after = down_after
        self.failures = 0  # probes failed in a row (no answer, or 5xx), across requests
        # (credentials, image) -> when the upstream last allowed it (monotonic seconds)
        self._allowed_at: dict[tuple[str, str], float] = {}
        self._allowed: dict[tuple[str, str], tuple[float, Authorization]] = {}
        self._changes = 0  # how many changes were seen, in all
        self._changed_at: dict[str, int] = {}  # image id -> number of its latest change
        self._cleared_at = 0  # number of the change at which _changed_at was last cleared
        self.probes = 0

    def configure(self, ttl: float, stale_if_error: float | None = None) -> None:
        """A new ``auth_cache_ttl`` (reload). Answers already remembered keep no longer than
        the new TTL allows from when they were given; with 0 none is reused any more.
        ``stale_if_error`` (reload too): the allowances already recorded stay and count
        under the new window (turned on from 0, recording starts now)."""
        if stale_if_error is not None:
            self._stale = stale_if_error
        if ttl == self._ttl:
            return
        now = time.monotonic()
        shift = ttl - self._ttl
        self._ttl = ttl
        for key, (until, answer) in list(self._allowed.items()):
            if ttl <= 0 or until + shift <= now:
                del self._allowed[key]
            elif shift < 0:
                self._allowed[key] = (until + shift, answer)

    async def check(
        self,
        image_id: str,
        creds: Credentials,
        *,
        stale_ok: bool = False,
        accept: str | None = None,
    ) -> Authorization:
        """The upstream's answer for this caller and image (or a remembered one).

        ``stale_ok``: a complete entry is there to serve, so a stale allowance may stand in
        for an upstream that fails (see the module docstring). ``accept``: the caller's
        ``Accept``, carried by the probe, so a refusal (never remembered) comes in the
        shape the upstream gives that caller; an allowance does not depend on it.
        """
        key = (creds.key(), image_id)
        remembered = self._allowed.get(key)
        now = time.monotonic()
        if remembered is not None and remembered[0] > now:
            metrics.auth_reused()
            return remembered[1]
        self.probes += 1
        asked_after = self._changes
        try:
            answer = await self._backend.authorize(image_id, creds, accept)
        except UpstreamUnavailable as exc:
            self.failures += 1
            stale = self._stale_allowance(key, stale_ok, str(exc))
            if stale is None:
                raise
            return stale
        latest = max(self._changed_at.get(image_id, 0), self._cleared_at)
        changed = latest > asked_after
        failed = answer.decision is Decision.DENY and answer.status >= 500
        self.failures = self.failures + 1 if failed else 0  # an answer: the upstream is up
        if failed:
            stale = self._stale_allowance(key, stale_ok, f"it answered {answer.status}")
            if stale is not None:
                return stale
        elif self._stale > 0:
            if answer.decision is Decision.ALLOW and not changed:
                if len(self._allowed_at) >= _MAX_REMEMBERED:
                    self._expire_allowed(now)
                self._allowed_at[key] = now
            else:  # refused (or changed meanwhile): never served stale
                self._allowed_at.pop(key, None)
        if answer.decision is Decision.ALLOW and self._ttl > 0 and not changed:
            if len(self._allowed) >= _MAX_REMEMBERED:
                self._expire(now)
            self._allowed[key] = (now + self._ttl, answer)
        else:
            self._allowed.pop(key, None)
        return answer

    def _stale_allowance(
        self, key: tuple[str, str], stale_ok: bool, why: str
    ) -> Authorization | None:
        if not stale_ok or self._stale <= 0:
            return None
        allowed_at = self._allowed_at.get(key)
        if allowed_at is None:
            return None
        age = time.monotonic() - allowed_at
        if age > self._stale:
            return None
        if self.failures < self._down_after:
            log.info(
                "upstream failed a probe for image %s (%s): %d in a row, not known down "
                "before %d (auth_stale_after_failures): no stale allowance",
                key[1],
                why,
                self.failures,
                self._down_after,
            )
            return None
        log.warning(
            "upstream unavailable (%s): image %s served on an authorisation %.0fs old "
            "(auth_stale_if_error %gs)",
            why,
            key[1],
            age,
            self._stale,
        )
        return Authorization(Decision.ALLOW, stale=True)

    def _expire_allowed(self, now: float) -> None:
        for key in [k for k, at in self._allowed_at.items() if now - at > self._stale]:
            del self._allowed_at[key]
        if len(self._allowed_at) >= _MAX_REMEMBERED:
            self._allowed_at.clear()

    def forget(self, image_id: str) -> None:
        """Drop every remembered answer about ``image_id`` (it changed through us), and
        keep any probe already in flight from storing its answer."""
        for key in [k for k in self._allowed_at if k[1] == image_id]:
            del self._allowed_at[key]
        if self._ttl <= 0 and self._stale <= 0:
            return
        self._changes += 1
        if len(self._changed_at) >= _MAX_REMEMBERED:
            # Forgetting which image changed when: forget every answer instead.
            self._changed_at.clear()
            self._allowed.clear()
            self._cleared_at = self._changes
        self._changed_at[image_id] = self._changes
        for key in [k for k in self._allowed if k[1] == image_id]:
            del self._allowed[key]

    def _expire(self, now: float) -> None:
        for key in [k for k, (until, _) in self._allowed.items() if until <= now]:
            del self._allowed[key]
        if len(self._allowed) >= _MAX_REMEMBERED:
            self._allowed.clear()
