"""Range scenarios: the 1 MB range at offset 500 MB on a cold image, and random 1 MiB ranges
cold then warm.  Upstream traffic is read two ways: bytes the origin wrote by the time the
response ended (``/proc/<pid>/io`` wchar, counts transfers still in flight) and, after the
origin went quiet, its access log (requests and bytes of completed transfers)."""

from __future__ import annotations

import functools
import os
import random
import statistics
import tempfile
from pathlib import Path

from bench import clients, measure
from bench.env import MIB, Env
from bench.origin import DataFile
from bench.report import Column, Table, at_most
from bench.scenarios import CACHED, System, check, proxies, rotate

CHUNK = 4 * MIB  # cached's fill unit for cold ranges


def _verify(env: Env, where: str, out: Path, data: DataFile, offset: int, length: int) -> None:
    with open(data.path, "rb") as f:
        want = os.pread(f.fileno(), length, offset)
    if out.read_bytes() != want:
        env.problem(f"{where}: range body differs from the image bytes at {offset}")


def point_range(env: Env) -> list[Table]:
    """``bytes=OFF-(OFF+999999)`` on a cold image, behind the fast and the slow origin."""
    s = env.settings
    data = env.data("img", s.size)
    off = s.range_offset
    rng = f"{off}-{off + 999_999}"
    out = Path(tempfile.mkdtemp(dir=s.workdir)) / "range.bin"
    tables = []
    for which in s.range_origins:
        daemon = env.cached(which)
        direct = System("direct origin", functools.partial(env.direct, which), env.origin_pids)
        systems = [*proxies(env, daemon, which, slice_too=True), direct]
        runs: dict[str, list[dict[str, float]]] = {}
        raw: dict[str, list[dict[str, object]]] = {}
        for r in range(s.concurrent_rounds):
            for sys in rotate(systems, r):
                image_id = env.images.alias(data, f"r-{which}-{sys.name}-{r}")
                measure.settle(env.origin_pids)
                mark, w0 = env.log.mark(), measure.wchar(env.origin_pids)
                f = clients.fetch(sys.url(image_id), rng=rng, out=str(out))
                at_response = measure.wchar(env.origin_pids) - w0
                measure.wait_io_idle(env.origin_pids)
                up = env.log.since(mark)
                check(env, f"range {which} {sys.name}", f, 206, 1_000_000)
                if f.code == 206:
                    _verify(env, f"range {which} {sys.name}", out, data, off, 1_000_000)
                runs.setdefault(sys.name, []).append(
                    {
                        "ttfb": f.ttfb * 1e3,
                        "total": f.total * 1e3,
                        "at_resp": at_response / 1e6,
                        "gets": up.data_gets,
                        "up_mb": up.data_bytes / 1e6,
                    }
                )
                raw.setdefault(sys.name, []).append({**f.to_json(), "upstream": up.__dict__})
        t = Table(
            f"range_{which}",
            f"1 MB range `bytes={rng}`, cold image, {which} origin ({s.concurrent_rounds} rounds)",
            [
                Column("ttfb", "TTFB ms", "{:.1f}"),
                Column("total", "total ms", "{:.1f}"),
                Column("at_resp", "upstream MB by response end", "{:.1f}"),
                Column("gets", "upstream GETs (all)", "{:.0f}", ratio=False),
                Column("up_mb", "upstream MB (all)", "{:.1f}"),
            ],
        )
        for name, rs in runs.items():
            keys = ("ttfb", "total", "at_resp", "gets", "up_mb")
            t.add(name, **{k: statistics.median(x[k] for x in rs) for k in keys})
            t.raw[name] = {"summary": rs, "fetches": raw[name]}
        ttfb = max((x["ttfb"] for x in runs[CACHED]), default=None)
        t.goal("TTFB <= 30 ms (worst round)", ttfb, ttfb is not None and ttfb <= 30, "{:.1f} ms")
        by_resp = max((x["at_resp"] for x in runs[CACHED]), default=None)
        t.goal(
            "upstream bytes <= one 4 MiB chunk by response end (+64 KiB: record, headers)",
            by_resp,
            at_most(by_resp, (CHUNK + 65536) / 1e6),
            "{:.2f} MB",
        )
        t.notes.append("'(all)' columns: after the origin went quiet, including background fill")
        tables.append(t)
    return tables


def random_ranges(env: Env) -> list[Table]:
    """N random 1 MiB ranges on a cold image (fast origin), then the same N again (warm)."""
    s = env.settings
    data = env.data("img", s.size)
    rnd = random.Random(4)
    offsets = [rnd.randrange(0, data.size - MIB) for _ in range(s.ranges)]
    out = Path(tempfile.mkdtemp(dir=s.workdir)) / "range.bin"
    daemon = env.cached("fast")
    direct = System("direct origin", lambda i: env.direct("fast", i), env.origin_pids)
    systems = [*proxies(env, daemon, "fast", slice_too=True), direct]
    t = Table(
        "random_ranges",
        f"{s.ranges} random 1 MiB ranges, cold image then warm, fast origin",
        [
            Column("cold_p50", "cold TTFB p50 ms", "{:.1f}"),
            Column("cold_max", "cold TTFB max ms", "{:.1f}"),
            Column("warm_p50", "warm TTFB p50 ms", "{:.2f}"),
            Column("warm_max", "warm TTFB max ms", "{:.2f}"),
            Column("gets", "upstream GETs", "{:.0f}", ratio=False),
            Column("up_mib", "upstream MiB", "{:.0f}"),
        ],
    )
    for sys in systems:
        image_id = env.images.alias(data, f"rr-{sys.name}")
        passes = []
        for label in ("cold", "warm"):
            measure.settle(env.origin_pids)
            mark = env.log.mark()
            fs = []
            for o in offsets:
                f = clients.fetch(sys.url(image_id), rng=f"{o}-{o + MIB - 1}", out=str(out))
                check(env, f"random range {label} {sys.name}", f, 206, MIB)
                if f.code == 206:
                    _verify(env, f"random range {label} {sys.name}", out, data, o, MIB)
                fs.append(f)
            measure.wait_io_idle(env.origin_pids)
            passes.append((fs, env.log.since(mark)))
        (cold, up), (warm, _) = passes
        ct, wt = [f.ttfb * 1e3 for f in cold], [f.ttfb * 1e3 for f in warm]
        t.add(
            sys.name,
            cold_p50=statistics.median(ct),
            cold_max=max(ct),
            warm_p50=statistics.median(wt),
            warm_max=max(wt),
            gets=up.data_gets,
            up_mib=up.data_bytes / MIB,
        )
        t.raw[sys.name] = {
            "cold": [f.to_json() for f in cold],
            "warm": [f.to_json() for f in warm],
            "upstream_cold": up.__dict__,
        }
    worst = t.value(CACHED, "cold_max")
    t.goal(
        "cold TTFB <= 30 ms (every range)",
        worst,
        worst is not None and worst <= 30,
        "{:.1f} ms max",
    )
    t.notes.append("upstream columns: cold pass, counted after the origin went quiet")
    return [t]
