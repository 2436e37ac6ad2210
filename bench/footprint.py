"""Many clients and many entries: 32 hits on 32 images, 64 KiB hits under wrk, peak RSS while
serving 32 concurrent whole-image downloads, and start-up time with many entries on disk."""

from __future__ import annotations

import os
import shutil
import statistics
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from bench import clients, measure
from bench.env import GIB, MIB, Cached, Env
from bench.report import Column, Table, ratio
from bench.scenarios import CACHED, System, cache_word, check, proxies, rotate


def multi(env: Env) -> list[Table]:
    s = env.settings
    data = env.data("multi", s.multi_size)
    daemon = env.cached("fast")
    systems = proxies(env, daemon, "fast")[:2]  # Varnish's RAM store would not hold them all
    direct = System("direct origin", lambda i: env.direct("fast", i), env.origin_pids)
    ids = {
        sys.name: [env.images.alias(data, f"32-{sys.name}-{k}") for k in range(s.multi_count)]
        for sys in systems
    }
    ids[direct.name] = ids[CACHED]
    for sys in systems:  # fill, untimed, four at a time
        for k in range(0, s.multi_count, 4):
            for f in clients.fetch_many([sys.url(i) for i in ids[sys.name][k : k + 4]]):
                check(env, f"fill {sys.name}", f, 200, data.size)
    measure.settle(env.origin_pids)
    entries = [daemon.entry(i) for i in ids[CACHED]]
    missing = [e for e in entries if not e.exists()]
    if missing:
        env.problem(f"32 images: {len(missing)} cached entries not complete after fill")
    rows: dict[str, list[dict[str, float]]] = {}
    rounds = max(2, s.rounds // 2)
    for r in range(rounds):
        for sys in rotate([*systems, direct], r):
            measure.settle()
            meter = measure.CpuMeter({"server": sys.roots}).start()
            with measure.RssSampler(sys.roots) as rss:
                fs = clients.fetch_many([sys.url(i) for i in ids[sys.name]])
            cpu = meter.stop()["server"]
            total = sum(f.size for f in fs)
            for f in fs:
                check(env, f"32 hits {sys.name}", f, 200, data.size)
            wall = max(f.done for f in fs)
            rows.setdefault(sys.name, []).append(
                {
                    "mb_s": total / wall / 1e6,
                    "cpu": cpu / (total / GIB),
                    "rss": rss.peak,
                    "slowest": wall,
                }
            )
        if not missing:
            measure.settle()
            wall, total = clients.dd_many(entries)
            rows.setdefault("dd x32 of cached's files (ceiling)", []).append(
                {"mb_s": total / wall / 1e6, "slowest": wall}
            )
    t = Table(
        "multi",
        f"{s.multi_count} concurrent hits on {s.multi_count} different "
        f"{data.size / MIB:g} MiB images, aggregate ({rounds} rounds)",
        [
            Column("mb_s", "MB/s"),
            Column("cpu", "server CPU s/GiB", "{:.2f}"),
            Column("rss", "peak RSS MiB", "{:.0f}"),
            Column("slowest", "slowest client s", "{:.2f}"),
        ],
    )
    for name, rs in rows.items():
        t.add(name, **{k: statistics.median(x[k] for x in rs) for k in rs[0]})
        t.raw[name] = rs
    t.rows.sort(key=lambda row: row[0] != CACHED)
    t.notes.append(
        "direct origin: 32 ids that are hard links of one file; the issue sets no target here"
    )
    return [t]


def small(env: Env) -> list[Table]:
    """64 KiB cache hits: ``wrk -t2 -c32 --latency`` (PEERS.md 2f)."""
    s = env.settings
    data = env.data("small", s.small_size)
    daemon = env.cached("fast")
    ttl = env.cached("fast", "cached-ttl", config={"auth_cache_ttl": 30}, exclusive=False)
    direct = System("direct origin", lambda i: env.direct("fast", i), env.origin_pids)
    with_ttl = System(f"{CACHED}, auth_cache_ttl 30", ttl.url, [ttl.pid])
    systems = [*proxies(env, daemon, "fast"), with_ttl, direct]
    ids = {sys.name: env.images.alias(data, f"64k-{sys.name}") for sys in systems}
    for sys in systems:
        for _ in range(2):
            f = clients.fetch(sys.url(ids[sys.name]))
            check(env, f"64 KiB warm-up {sys.name}", f, 200, data.size)
        if sys is not direct and cache_word(f) != "hit":
            env.problem(f"64 KiB {sys.name}: 2nd GET not a hit ({f.cache_status or f.x_cache!r})")
    if not clients.wrk_available():
        env.problem("wrk not installed: small-object scenario skipped")
        return []
    runs: dict[str, list[dict[str, float]]] = {}
    for r in range(s.wrk_rounds):
        for sys in rotate(systems, r):
            measure.settle()
            mark = env.log.mark()
            meter = measure.CpuMeter({"server": sys.roots}).start()
            w = clients.wrk(sys.url(ids[sys.name]), s.wrk_seconds)
            cpu = meter.stop()["server"]
            up = env.log.since(mark)
            if w.non_2xx or w.requests == 0 or w.socket_errors:
                env.problem(
                    f"64 KiB {sys.name}: {w.requests} requests, {w.non_2xx} non-2xx, "
                    f"socket errors: {w.socket_errors or 'none'}"
                )
            runs.setdefault(sys.name, []).append(
                {
                    "req_s": w.req_s,
                    "p50": w.p50_ms or 0.0,
                    "p99": w.p99_ms or 0.0,
                    "cpu_us": cpu * 1e6 / max(1, w.requests),
                    "up_per_req": 0.0 if sys is direct else up.requests / max(1, w.requests),
                }
            )
    t = Table(
        "small",
        f"{data.size >> 10} KiB hits, wrk -t2 -c32 -d{s.wrk_seconds:g}s ({s.wrk_rounds} rounds)",
        [
            Column("req_s", "req/s"),
            Column("p50", "p50 ms", "{:.2f}"),
            Column("p99", "p99 ms", "{:.2f}"),
            Column("cpu_us", "server CPU µs/req", "{:.0f}"),
            Column("up_per_req", "upstream req per req", "{:.3f}", ratio=False),
        ],
    )
    for name, rs in runs.items():
        t.add(name, **{k: statistics.median(x[k] for x in rs) for k in rs[0]})
        t.raw[name] = rs
    mine, nginx = t.value(CACHED, "req_s"), t.value("nginx proxy_cache", "req_s")
    share = ratio(mine, nginx)
    t.goal("req/s >= 0.15x nginx", share, share is not None and share >= 0.15, "{:.2f}x")
    return [t]


def rss(env: Env) -> list[Table]:
    """Peak RSS while serving 32 concurrent downloads of one image: cold fan-out, then hits."""
    s = env.settings
    data = env.data("img", s.size)
    daemon = env.cached("fast")
    systems = proxies(env, daemon, "fast")[:2]
    n = s.rss_clients
    t = Table(
        "rss",
        f"{n} concurrent downloads of one {data.size / GIB:g} GiB image: memory",
        [
            Column("cold_mb_s", "cold MB/s aggr."),
            Column("cold_rss", "cold peak RSS MiB", "{:.0f}"),
            Column("hit_mb_s", "hit MB/s aggr."),
            Column("hit_rss", "hit peak RSS MiB", "{:.0f}"),
            Column("hwm", "VmHWM MiB", "{:.0f}"),
            Column("gets", "upstream GETs", "{:.0f}", ratio=False),
        ],
    )
    for sys in systems:
        image_id = env.images.alias(data, f"rss-{sys.name}")
        row: dict[str, float] = {}
        for phase in ("cold", "hit"):
            measure.settle(env.origin_pids)
            mark = env.log.mark()
            with measure.RssSampler(sys.roots) as sampler:
                fs = clients.fetch_many([sys.url(image_id)] * n)
                if phase == "cold":
                    measure.wait_io_idle(env.origin_pids)
            for f in fs:
                check(env, f"{n} clients {phase} {sys.name}", f, 200, data.size)
            row[f"{phase}_mb_s"] = sum(f.size for f in fs) / max(f.done for f in fs) / 1e6
            row[f"{phase}_rss"] = sampler.peak
            if phase == "cold":
                row["gets"] = env.log.since(mark).data_gets
        row["hwm"] = measure.rss_mib(sys.roots, "VmHWM")
        t.add(sys.name, **row)
    t.notes.append("nginx: master + workers + cache helpers summed; VmHWM is since start-up")
    peak = max((t.value(CACHED, k) or 0.0) for k in ("cold_rss", "hit_rss", "hwm"))
    t.goal("peak RSS <= 150 MiB", peak, peak <= 150, "{:.0f} MiB")
    return [t]


def _first_ok(url: str, timeout: float = 30.0) -> float:
    """Poll ``url`` until it answers 200; return time.monotonic() at that moment."""
    deadline = time.monotonic() + timeout
    req = urllib.request.Request(url, headers={"X-Auth-Token": clients.TOKEN})
    while True:
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                resp.read()
                if resp.status == 200:
                    return time.monotonic()
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no 200 from {url} within {timeout}s")
        time.sleep(0.005)


def _clone(src: Path, count: int) -> None:
    """``count`` copies of a complete entry (file + user.* xattrs) under new uuid names."""
    attrs = {n: os.getxattr(src, n) for n in os.listxattr(src)}
    for _ in range(count):
        dst = src.parent / str(uuid.uuid4())
        shutil.copyfile(src, dst)
        for name, value in attrs.items():
            os.setxattr(dst, name, value)


def _count_entries(cache_dir: Path) -> int:
    return sum(1 for p in cache_dir.iterdir() if p.is_file())


def startup(env: Env) -> list[Table]:
    """Start-up to listening and to the first hit, with 1 and with N entries on disk."""
    s = env.settings
    data = env.data("small", s.small_size)
    image_id = env.images.alias(data, "startup")
    daemon = env.cached("fast", name="startup")
    url = daemon.url(image_id)
    for _ in range(2):
        check(env, "startup fill", clients.fetch(url), 200, data.size)
    entry = daemon.entry(image_id)
    deadline = time.monotonic() + 10
    while not entry.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    env.stop_cached()
    if not entry.exists():
        env.problem(f"startup: no complete entry {entry} after a miss and a hit")
        return []
    t = Table(
        "startup",
        f"Start-up with {s.entries:,} entries on disk ({s.startup_rounds} rounds)",
        [
            Column("listen", "to listening s", "{:.3f}"),
            Column("first", "to first hit s", "{:.3f}"),
            Column("cpu", "CPU s", "{:.2f}"),
            Column("entries", "entries after", "{:.0f}", ratio=False),
        ],
        cached_row=f"cached, {s.entries:,} entries",
    )

    def measure_start(label: str) -> None:
        rs = []
        for _ in range(s.startup_rounds):
            os.sync()
            measure.wait_quiet()
            d: Cached = env.cached("fast", name="startup", wipe=False)
            assert d.proc is not None
            first = _first_ok(d.url(image_id)) - d.proc.started_at
            rs.append({"listen": d.startup_s, "first": first, "cpu": measure.cpu_seconds([d.pid])})
            env.stop_cached()
        row = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
        t.add(label, **row, entries=_count_entries(entry.parent))
        t.raw[label] = rs

    measure_start("cached, 1 entry")
    t0 = time.monotonic()
    _clone(entry, s.entries - 1)
    t.notes.append(
        f"cloning {s.entries - 1:,} entries took {time.monotonic() - t0:.1f} s; "
        "their metadata is in the page cache (warm restart)"
    )
    measure_start(t.cached_row)
    got = t.value(t.cached_row, "entries")
    if got is not None and got < s.entries:
        env.problem(f"startup: only {got:.0f} of {s.entries} entries left after start-up")
    first = t.value(t.cached_row, "first")
    t.goal(
        f"{s.entries:,} entries ready in <= 2 s",
        first,
        first is not None and first <= 2,
        "{:.3f} s",
    )
    return [t]
