"""Reading a test daemon's metrics: a real ``GET /metrics`` scrape on its management socket,
parsed with prometheus-client's own parser, and the difference an action makes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from conftest import Daemon, manage
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(daemon: Daemon) -> Samples:
    # The test daemons have a management socket: /metrics is served there only.
    async with manage(daemon).get(f"{daemon.admin_base}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class Delta:
    """Differences between two scrapes."""

    def __init__(self, before: Samples, after: Samples) -> None:
        self.before, self.after = before, after

    def __call__(self, name: str, **labels: str) -> float:
        return value(self.after, name, **labels) - value(self.before, name, **labels)


def downloads(samples: Samples) -> float:
    return sum(v for (name, _), v in samples.items() if name == "cached_requests_total")


async def measure(daemon: Daemon, action: Callable[[], object], requests: int = 1) -> Delta:
    """Scrape before and after ``action`` made ``requests`` downloads (a download is counted
    when the server logs it, which may come just after the client has the whole body)."""
    before = await scrape(daemon)
    result = action()
    if asyncio.iscoroutine(result):
        await result
    for _ in range(500):
        after = await scrape(daemon)
        if downloads(after) - downloads(before) >= requests:
            return Delta(before, after)
        await asyncio.sleep(0.01)
    raise AssertionError(f"{requests} downloads were never counted")
