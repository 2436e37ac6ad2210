"""The upstream's requests counted: a decorator of the backends (and of the pass-through
that relays to the same upstream) recording requests, errors, latency and bytes by kind in
the metrics registry, so that no backend knows metrics.

No state of its own: counters live in :class:`cached.metrics.Metrics` (thread-safe).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from cached import metrics
from cached.errors import UpstreamError, UpstreamUnavailable


class _CountingStream:
    """A DataStream that counts the bytes read through it."""

    def __init__(self, inner: Any, counter: Any) -> None:
        self._inner = inner
        self._counter = counter
        self.start: int = inner.start

    def _count(self, n: int) -> None:
        self._counter.inc(n)
        metrics.upstream_bytes(n)

    async def read(self, n: int) -> bytes:
        data: bytes = await self._inner.read(n)
        self._count(len(data))
        return data

    async def read_blocks(self, n: int) -> list[Any]:
        blocks: list[Any] = await self._inner.read_blocks(n)
        self._count(sum(len(memoryview(b)) for b in blocks))
        return blocks


async def _timed(m: metrics.Metrics, kind: str, call: Any) -> Any:
    """Await ``call`` as one upstream request of ``kind``: counted, timed, its error counted."""
    m.up_requests[kind].inc()
    started = time.monotonic()
    try:
        result = await call
    except Exception:
        m.up_errors[kind].inc()
        raise
    m.up_latency[kind].observe(time.monotonic() - started)
    return result


class MeteredBackend:
    """Wraps an upstream backend: requests, errors, latency and bytes by kind, probe results.

    Implements :class:`cached.upstream.Backend` by delegation, so no backend knows metrics.
    """

    def __init__(self, inner: Any, counts: metrics.Metrics) -> None:
        self.inner = inner
        self._m = counts

    async def _timed(self, kind: str, call: Any) -> Any:
        return await _timed(self._m, kind, call)

    async def authorize(self, image_id: str, creds: Any, accept: str | None = None) -> Any:
        try:
            answer = await self._timed("probe", self.inner.authorize(image_id, creds, accept))
        except Exception:
            self._m.probes["error"].inc()
            raise
        self._m.probes[answer.decision.value].inc()
        return answer

    async def record(self, image_id: str, creds: Any) -> Any:
        return await self._timed("record", self.inner.record(image_id, creds))

    @contextlib.asynccontextmanager
    async def open_data(
        self, image_id: str, creds: Any, start: int, end: int | None
    ) -> AsyncIterator[Any]:
        kind = "data" if end is None and start == 0 else "range"
        m = self._m
        m.up_requests[kind].inc()
        started = time.monotonic()
        try:
            async with self.inner.open_data(image_id, creds, start, end) as stream:
                m.up_latency[kind].observe(time.monotonic() - started)
                yield _CountingStream(stream, m.up_bytes[kind])
        except (UpstreamError, UpstreamUnavailable):
            m.up_errors[kind].inc()
            raise

    async def close(self) -> None:
        await self.inner.close()

    def __getattr__(self, name: str) -> Any:  # anything else a backend offers
        return getattr(self.inner, name)


class MeteredPassThrough:
    """Wraps a pass-through (``cached/edge/passthrough.py``, ``cached/edge/fileapi.py``): its
    answers, the version document too, count as upstream requests of kind ``forward``, timed until
    the status is known."""

    def __init__(self, inner: Any, counts: metrics.Metrics) -> None:
        self.inner = inner
        self._m = counts

    async def answer(self, request: Any, before_reply: Any = None) -> Any:
        m = self._m
        m.up_requests["forward"].inc()
        started = time.monotonic()

        async def timed_reply(response: Any) -> None:
            m.up_latency["forward"].observe(time.monotonic() - started)
            if before_reply is not None:
                await before_reply(response)

        try:
            return await self.inner.answer(request, timed_reply)
        except Exception:
            m.up_errors["forward"].inc()
            raise

    async def versions(self, request: Any) -> Any:
        return await _timed(self._m, "forward", self.inner.versions(request))
