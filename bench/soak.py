"""The cache under pressure (issue 14): a soak of ~200 clients over a working set several
times the cache, with the cache's limits sampled every second and its hit ratio set beside an
LRU simulation of the same recorded trace and cache size.

    python -m bench.soak                      # 200 clients, 120 s, 128 MiB cache, 4x working set
    python -m bench.soak --clients 200 --seconds 300 --cache 256 --factor 4
    python -m bench.soak --tree /tmp/base     # the same soak against another build (baseline)

What runs (all on loopback, every process stopped by its pid on any exit):
- ``cached serve`` (this checkout, or ``--tree``: ``python -P -m cached.cli``) in front of a
  ``file://`` store of random images (2-24 MiB, Zipf-distributed popularity, ``--factor``
  times the cache in all);
- its cache directory on a tmpfs of ``--fs`` MiB (default: four times the cache and its
  free-space floor), so the free-space floor (``min_free_space``) is a real limit: entries evicted
  while still read keep their blocks until their readers finish;
- ``--clients`` client tasks, each downloading whole images back to back (``--think`` seconds
  apart), recording per request its start, image, size, status and ``Cache-Status``;
- a sampler, every second: the bytes of the cache's files on disk (complete and partial;
  ``du``), the daemon's own count (``cached_cache_bytes``), and the filesystem's free space.

Reported (never asserted): over-limit samples (disk bytes above ``image_cache_max_size``, free
space below the floor), peaks, and hit ratios — the daemon's (``hit``; and ``hit`` or
``collapsed``, i.e. requests that started no upstream transfer of their own) beside an LRU
cache of the same size and admission rule (``max_image_fraction``) replaying the same trace
in request order, by requests and by bytes. The raw numbers go to
``bench/results/soak-DATE.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from bench.procs import Proc, free_port, install_signal_handlers, stop_all, wait_port

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Request:
    start: float
    image: str
    size: int
    status: int = 0
    outcome: str = ""  # the Cache-Status outcome: hit, miss, collapsed, bypass..., error
    got: int = 0
    seconds: float = 0.0


@dataclass
class Sample:
    t: float
    disk_bytes: int  # files of the cache on disk (root and incomplete/), allocated blocks
    index_bytes: int | None  # cached_cache_bytes (None: the scrape failed)
    free_bytes: int


@dataclass
class Result:
    config: dict[str, object]
    requests: list[Request] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)


def outcome_of(cache_status: str | None) -> str:
    """``cached; hit`` -> hit, ``cached; fwd=uri-miss; collapsed`` -> collapsed, ``cached;
    fwd=bypass; detail=cache-full`` -> bypass:cache-full."""
    if not cache_status:
        return "none"
    parts = [p.strip() for p in cache_status.split(";")[1:]]
    if "hit" in parts:
        return "hit"
    if "collapsed" in parts:
        return "collapsed"
    if "fwd=bypass" in parts:
        detail = next((p.split("=", 1)[1] for p in parts if p.startswith("detail=")), "")
        return f"bypass:{detail}" if detail else "bypass"
    return "miss"


def lru(trace: list[tuple[str, int]], capacity: int, largest: int) -> tuple[float, float]:
    """Request and byte hit ratios of an LRU cache of ``capacity`` bytes over ``trace`` (image,
    size), admitting images of at most ``largest`` bytes (the daemon's admission rule)."""
    held: collections.OrderedDict[str, int] = collections.OrderedDict()
    used = hits = hit_bytes = total_bytes = 0
    for image, size in trace:
        total_bytes += size
        if image in held:
            held.move_to_end(image)
            hits += 1
            hit_bytes += size
            continue
        if size > largest:
            continue
        while held and used + size > capacity:
            _, gone = held.popitem(last=False)
            used -= gone
        held[image] = size
        used += size
    n = len(trace)
    return (hits / n if n else 0.0, hit_bytes / total_bytes if total_bytes else 0.0)


def make_images(store: Path, total: int, rng: random.Random) -> dict[str, int]:
    """Random images of 2-24 MiB adding up to about ``total`` bytes (kept between runs)."""
    store.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    for path in sorted(store.iterdir()):
        sizes[path.name] = path.stat().st_size
    made = sum(sizes.values())
    while made < total:
        size = rng.randint(2 * MiB, 24 * MiB)
        image = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        with open(store / image, "wb") as f:
            f.write(os.urandom(size))
        sizes[image] = size
        made += size
    return sizes


def mount_tmpfs(path: Path, size_mib: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        print(f"soak: no tmpfs ({res.stderr.strip()}): the free-space floor is not exercised")
        return False
    return True


def disk_bytes(cache: Path) -> int:
    """Blocks held by the cache's files (complete and partial), as ``du`` counts them."""
    total = 0
    for d in (cache, cache / "incomplete"):
        try:
            with os.scandir(d) as it:
                for e in it:
                    if e.is_file(follow_symlinks=False):
                        try:
                            total += e.stat(follow_symlinks=False).st_blocks * 512
                        except FileNotFoundError:
                            pass
        except FileNotFoundError:
            pass
    return total


_GAUGE = re.compile(rb"^cached_cache_bytes(?:\{[^}]*\})? ([0-9.e+]+)$", re.M)


def sampler(url: str, cache: Path, out: list[Sample], stop: threading.Event) -> None:
    """Every second, on a thread of its own (the clients keep the event loop busy)."""
    t0 = time.monotonic()
    tick = t0
    while not stop.is_set():
        index = None
        try:
            with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
                m = _GAUGE.search(resp.read())
                index = int(float(m.group(1))) if m else None
        except OSError:
            pass
        st = os.statvfs(cache)
        out.append(
            Sample(time.monotonic() - t0, disk_bytes(cache), index, st.f_bavail * st.f_frsize)
        )
        tick += 1.0
        stop.wait(max(0.0, tick - time.monotonic()))


async def client(
    session: aiohttp.ClientSession,
    url: str,
    images: list[str],
    weights: list[float],
    sizes: dict[str, int],
    rng: random.Random,
    think: float,
    until: float,
    out: list[Request],
) -> None:
    while time.monotonic() < until:
        image = rng.choices(images, weights)[0]
        req = Request(time.monotonic(), image, sizes[image])
        out.append(req)
        try:
            async with session.get(f"{url}/v2/images/{image}/file") as resp:
                req.status = resp.status
                req.outcome = outcome_of(resp.headers.get("Cache-Status"))
                async for piece in resp.content.iter_chunked(1 << 20):
                    req.got += len(piece)
        except (aiohttp.ClientError, TimeoutError) as exc:
            req.outcome = req.outcome or "error"
            req.status = req.status or -1
            print(f"soak: {image}: {exc!r}")
        req.seconds = time.monotonic() - req.start
        if req.got != req.size and req.status == 200:
            req.outcome = "short"
        if think:
            await asyncio.sleep(rng.uniform(0, 2 * think))


async def drive(args: argparse.Namespace, url: str, cache: Path, sizes: dict[str, int]) -> Result:
    rng = random.Random(args.seed)
    images = sorted(sizes)
    rng.shuffle(images)
    weights = [1 / (rank + 1) ** args.zipf for rank in range(len(images))]
    result = Result(vars(args) | {"images": len(images), "working_set": sum(sizes.values())})
    stop = threading.Event()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        sampling = threading.Thread(target=sampler, args=(url, cache, result.samples, stop))
        sampling.start()
        until = time.monotonic() + args.seconds
        clients = [
            client(
                session,
                url,
                images,
                weights,
                sizes,
                random.Random(rng.random()),
                args.think,
                until,
                result.requests,
            )
            for _ in range(args.clients)
        ]
        await asyncio.gather(*clients)
        await asyncio.sleep(2)  # a few idle samples: does the cache settle under its limits?
        stop.set()
        await asyncio.to_thread(sampling.join)
    return result


def report(result: Result, max_size: int, floor: int, fraction: float) -> dict[str, object]:
    reqs = sorted(result.requests, key=lambda r: r.start)
    done = [r for r in reqs if r.status == 200 and r.outcome not in ("error", "short")]
    outcomes = collections.Counter(r.outcome for r in reqs)
    by_bytes: collections.Counter[str] = collections.Counter()
    for r in done:
        by_bytes[r.outcome] += r.size
    n, total = len(done), sum(r.size for r in done)
    hit = sum(r.outcome == "hit" for r in done)
    hit_b = by_bytes["hit"]
    joined = hit + sum(r.outcome == "collapsed" for r in done)
    joined_b = hit_b + by_bytes["collapsed"]
    lru_req, lru_bytes = lru([(r.image, r.size) for r in done], max_size, int(max_size * fraction))
    samples = result.samples
    over = [s for s in samples if s.disk_bytes > max_size]
    index_over = [s for s in samples if s.index_bytes is not None and s.index_bytes > max_size]
    below = [s for s in samples if s.free_bytes < floor]
    summary: dict[str, object] = {
        "requests": len(reqs),
        "completed": n,
        "outcomes": dict(outcomes),
        "bytes_by_outcome": dict(by_bytes),
        "hit_ratio_requests": hit / n if n else 0.0,
        "hit_ratio_bytes": hit_b / total if total else 0.0,
        "no_own_transfer_ratio_requests": joined / n if n else 0.0,
        "no_own_transfer_ratio_bytes": joined_b / total if total else 0.0,
        "lru_hit_ratio_requests": lru_req,
        "lru_hit_ratio_bytes": lru_bytes,
        "samples": len(samples),
        "samples_over_max_size_disk": len(over),
        "samples_over_max_size_index": len(index_over),
        "samples_below_free_floor": len(below),
        "peak_disk_bytes": max((s.disk_bytes for s in samples), default=0),
        "peak_index_bytes": max((s.index_bytes or 0 for s in samples), default=0),
        "least_free_bytes": min((s.free_bytes for s in samples), default=0),
        "max_size": max_size,
        "free_floor": floor,
    }
    return summary


def print_summary(s: dict[str, object]) -> None:
    mib = lambda v: f"{int(v) / MiB:.1f} MiB"  # noqa: E731
    print()
    print(f"requests: {s['requests']} ({s['completed']} complete 200s); outcomes {s['outcomes']}")
    print("| hit ratio | requests | bytes |")
    print("|---|---|---|")
    print(f"| cached: hit | {s['hit_ratio_requests']:.3f} | {s['hit_ratio_bytes']:.3f} |")
    print(
        f"| cached: hit or collapsed (no own upstream transfer) | "
        f"{s['no_own_transfer_ratio_requests']:.3f} | {s['no_own_transfer_ratio_bytes']:.3f} |"
    )
    print(
        f"| LRU simulation, same trace and size | {s['lru_hit_ratio_requests']:.3f} | "
        f"{s['lru_hit_ratio_bytes']:.3f} |"
    )
    print(
        f"samples: {s['samples']}; over max size {mib(s['max_size'])}: "
        f"{s['samples_over_max_size_disk']} on disk (peak {mib(s['peak_disk_bytes'])}), "
        f"{s['samples_over_max_size_index']} by the daemon's count "
        f"(peak {mib(s['peak_index_bytes'])}); below the free-space floor "
        f"{mib(s['free_floor'])}: {s['samples_below_free_floor']} "
        f"(least free {mib(s['least_free_bytes'])})"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--cache", type=int, default=128, help="image_cache_max_size, MiB")
    p.add_argument("--factor", type=float, default=4.0, help="working set / cache size")
    p.add_argument("--floor", type=int, default=16, help="min_free_space, MiB")
    p.add_argument("--fs", type=int, default=0, help="tmpfs size, MiB (0: cache+floor+25%%)")
    p.add_argument("--fraction", type=float, default=0.5, help="max_image_fraction")
    p.add_argument("--zipf", type=float, default=0.9, help="popularity skew (Zipf s)")
    p.add_argument("--think", type=float, default=0.2, help="mean pause between requests, s")
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cached-soak"))
    p.add_argument(
        "--tree", type=Path, default=ROOT, help="source tree of the cached to run (A/B: a baseline)"
    )
    args = p.parse_args(argv)

    install_signal_handlers()
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    sizes = make_images(
        work / f"images-{args.cache}x{args.factor:g}-{args.seed}",
        int(args.cache * MiB * args.factor),
        random.Random(args.seed),
    )
    cache = work / "cache"
    # Room for the cache, its floor, and entries evicted while still read (their blocks are
    # freed when their readers finish: with 200 clients that can be several caches' worth).
    fs = args.fs or 4 * args.cache + args.floor
    mounted = mount_tmpfs(cache, fs)
    conf = work / "soak.yaml"
    port = free_port()
    conf.write_text(
        json.dumps(
            {
                "upstream": f"file://{work / f'images-{args.cache}x{args.factor:g}-{args.seed}'}",
                "image_cache_dir": str(cache),
                "listen": f"127.0.0.1:{port}",
                "image_cache_max_size": f"{args.cache}M",
                "max_image_fraction": args.fraction,
                "min_free_space": f"{args.floor}M",
                "log_level": "warning",
                "max_connections_per_address": 2 * args.clients + 64,
            }
        )
    )
    env = {"PYTHONPATH": str(args.tree.resolve())}
    daemon = Proc(
        "cached",
        # -P: the tree named by PYTHONPATH runs, not the one in the current directory.
        [sys.executable, "-P", "-m", "cached.cli", "serve", "-c", str(conf)],
        work / "cached.log",
        env,
    )
    try:
        wait_port(port, 60)
        if daemon.popen.poll() is not None:
            raise RuntimeError(f"cached exited: {daemon.tail()}")
        url = f"http://127.0.0.1:{port}"
        print(
            f"soak: {args.clients} clients, {args.seconds:g} s, cache {args.cache} MiB, "
            f"working set {sum(sizes.values()) / MiB:.0f} MiB in {len(sizes)} images, "
            f"tmpfs {fs if mounted else '-'} MiB, floor {args.floor} MiB"
        )
        result = asyncio.run(drive(args, url, cache, sizes))
    finally:
        stop_all()
        if mounted:
            subprocess.run(["umount", "-l", str(cache)], check=False)
    summary = report(result, args.cache * MiB, args.floor * MiB, args.fraction)
    print_summary(summary)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    path = out / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(
        json.dumps(
            {
                "summary": summary,
                "config": result.config | {"workdir": str(work)},
                "samples": [asdict(s) for s in result.samples],
                "requests": [asdict(r) for r in result.requests],
            },
            default=str,
        )
    )
    print(f"soak: raw numbers in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
