"""The ``fleet`` scenario (issue 17): peer fill between the members of a fleet, against the
same members without it, one daemon, and HAProxy's URI hashing in front of members without
it, all measured in one run, each cold (a fresh image id), in front of one origin.

The origin is the fake Glance (``bench/origin.py``) with a rate cap **shared by all its
connections** (``--shared-rate``, default 100 MiB/s: one token bucket over every data
response, as a backend's link would be), logging every request with the bytes it really
sent. Its one-copy time (one client straight from it) is measured in the same run and is the
yardstick of every "last client" time.

Systems (every process on 127.0.0.1, every cache directory under the work dir, every process
stopped by its pid when the scenario ends):

- **peer fill**: N = 3 ``cached serve`` with ``fleet_self``/``fleet_members``/
  ``fleet_secret_file`` (a random key, mode 0600) and the service token (so a member that
  owns an image fetches it for a sibling); 8 clients per member started at once. Then the
  owner (the member the upstream's bytes went to) is killed and one client fetches the image
  from a sibling again.
- **no peer fill**: the same 3 members with no fleet keys.
- **one daemon**: 8 clients.
- **HAProxy** (Debian's 2.6, ``balance uri``, ``hash-type consistent``, TCP health checks)
  in front of the 3 members without peer fill, 24 clients; egress per controller from its
  stats socket. Then the member holding the image is killed (``SIGKILL``) and one client
  fetches it again through HAProxy.
- **peer fill, TLS** (``--fleet-tls``): the peer-fill members listening with a self-signed
  certificate (``bench/tls.py``), siblings calling each other over https.
- **N = 5 and 7**, one client per member, 256 MiB (``--fleet-n``).
- **peer fill, scaled origin** (``--fleet-scaled-rate``, default 40 MiB/s): the same peer
  fill in front of a second origin capped at a rate this machine's cores can carry, its own
  one-copy time, the same goals.
- **a cold range on a non-owner** (``--fleet-range-tries``, default 3): ``bytes=OFF-+1MB``
  (``Settings.range_offset``, 500 MB on 1 GiB) of a fresh image asked of the member second in
  its rendezvous order (``cached.fleet.ring.order``); TTFB and the upstream bytes against one
  chunk (``cached.store.chunks.chunk_size_for``).

Why the time targets are missed is measured too: after the runs the bench's own process
writes N x 1 GiB into a new file (new page-cache pages, per GiB), overwrites its last GiB
and hashes 1 GiB with sha512 (``fleet-machine``), and each run's CPU (members, curl
clients, origin, HAProxy) is set against the CPU the machine has in 1.25 x the one-copy
time (``fleet-cpu``).

Upstream requests are counted twice: from the origin's access log (data GETs, the
authorisation probes ``bytes=0-0`` apart) and from each daemon's ``cached_upstream_requests``
/ ``cached_upstream_bytes``. CPU per member is utime+stime of its process from
``/proc/PID/stat``, read before the clients start and after it went idle. Nothing here is
asserted: the issue's targets are printed as ``goal:`` lines.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import clients, measure
from bench.env import GIB, MIB, Cached, Env, OriginLog, Upstream
from bench.origin import DataFile
from bench.procs import Proc, free_port, wait_port
from bench.report import Column, Table, at_most, ratio
from bench.scenarios import wait_cpu_idle
from bench.tls import self_signed
from cached.fleet.ring import order
from cached.store.chunks import chunk_size_for

PEER, NOPEER, ONE, HAPROXY, PEER_TLS = (
    "3 members, peer fill",
    "3 members, no peer fill",
    "1 daemon",
    "HAProxy uri hash, 3 members",
    "3 members, peer fill, TLS",
)
ALONE = "origin alone, 1 client"
SERVICE_TOKEN = clients.TOKEN  # the origin accepts any token


@dataclass
class FleetOptions:
    """What ``python -m bench`` passes down (``--fleet-*`` options)."""

    rate: int = 100 * MIB
    members: int = 3
    clients: int = 8
    tls: bool = True
    wide: tuple[int, ...] = (5, 7)
    wide_size: int = 256 * MIB
    lookup_timeout: float | None = None  # None: the daemon's default (0.2 s)
    scaled_rate: int = 40 * MIB  # the peer fill again at a cap the machine can carry; 0: not
    range_tries: int = 3  # cold 1 MB ranges on a non-owner, each a fresh image id


OPTIONS = FleetOptions()


class Origin:
    """The fake Glance with the shared cap, its own access log (``name``: of its log files,
    for a second origin at another rate)."""

    def __init__(self, env: Env, rate: int, name: str = "fleet-origin") -> None:
        self.env = env
        self.rate = rate
        self.log = OriginLog(env.logs / f"{name}-access.log")
        self.port = free_port()
        argv = [
            sys.executable,
            "-m",
            "bench.origin",
            "--root",
            str(env.images.www),
            "--port",
            str(self.port),
            "--shared-rate",
            str(rate),
            "--log",
            str(self.log.path),
        ]
        self.proc = Proc(name, argv, env.logs / f"{name}.out")
        self.proc.wait_listening()
        wait_port(self.port)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, image_id: str) -> str:
        return f"http://127.0.0.1:{self.port}/v2/images/{image_id}/file"

    def stop(self) -> None:
        self.proc.stop()


def scrape(daemon: Cached) -> dict[str, float]:
    """A daemon's /metrics: sample (with labels) -> value; {} if it does not answer."""
    cert = daemon.config.get("tls_cert_file")
    context = ssl.create_default_context(cafile=str(cert)) if cert else None
    try:
        with urllib.request.urlopen(f"{daemon.base}/metrics", timeout=10, context=context) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _m(samples: dict[str, float], name: str) -> float:
    return samples.get(name, 0.0)


METRICS = {
    "up_data_requests": 'cached_upstream_requests_total{kind="data"}',
    "up_range_requests": 'cached_upstream_requests_total{kind="range"}',
    "up_data_bytes": 'cached_upstream_bytes_total{kind="data"}',
    "up_range_bytes": 'cached_upstream_bytes_total{kind="range"}',
    "peer_sent": 'cached_fleet_peer_bytes_total{direction="sent"}',
    "peer_received": 'cached_fleet_peer_bytes_total{direction="received"}',
    "from_copy": 'cached_fleet_transfers_total{source="copy"}',
    "from_fill": 'cached_fleet_transfers_total{source="fill"}',
    "from_upstream": 'cached_fleet_transfers_total{source="upstream"}',
}


@dataclass
class Fleet:
    """N daemons of one run; ``peer``: configured as a fleet (else plain daemons)."""

    env: Env
    origin: Origin
    n: int
    peer: bool
    tls: tuple[Path, Path] | None = None
    label: str = "fleet"
    members: list[Cached] = field(default_factory=list)

    def start(self) -> Fleet:
        ids = [f"ctl-{i + 1}" for i in range(self.n)]
        ports = [free_port() for _ in ids]
        scheme = "https" if self.tls else "http"
        conf_dir = self.env.settings.workdir / "conf"
        conf_dir.mkdir(parents=True, exist_ok=True)
        key = conf_dir / "fleet.key"
        key.write_bytes(os.urandom(48).hex().encode())
        key.chmod(0o600)
        for member_id, port in zip(ids, ports, strict=True):
            config: dict[str, object] = {}
            if self.peer:
                config |= {
                    "fleet_self": member_id,
                    "fleet_members": [
                        {"id": i, "url": f"{scheme}://127.0.0.1:{p}"}
                        for i, p in zip(ids, ports, strict=True)
                    ],
                    "fleet_secret_file": str(key),
                    "service_token": SERVICE_TOKEN,
                }
                if OPTIONS.lookup_timeout is not None:
                    config["fleet_lookup_timeout"] = OPTIONS.lookup_timeout
            if self.tls:
                cert, pem = self.tls
                config |= {
                    "tls_cert_file": str(cert),
                    "tls_key_file": str(pem),
                    "upstream_ca_file": str(cert),  # how siblings' certificates are verified
                }
            name = f"{self.label}-{member_id}"
            cache_dir = self.env.settings.workdir / "cache-cached" / name
            shutil.rmtree(cache_dir, ignore_errors=True)
            daemon = Cached(
                self.env,
                self.origin.port,
                cache_dir,
                name,
                config,
                listen=f"127.0.0.1:{port}",
            )
            self.members.append(daemon)
            daemon.start()
        return self

    def stop(self) -> None:
        for d in self.members:
            d.stop()
            shutil.rmtree(d.cache_dir, ignore_errors=True)

    @property
    def pids(self) -> list[int]:
        return [d.pid for d in self.members if d.proc]


@dataclass
class ColdRun:
    """One cold batch of clients: what they saw, what the origin and each member did."""

    fetches: list[clients.Fetch]
    up: Upstream
    member_cpu: list[float]
    member_metrics: list[dict[str, float]]  # deltas, keys of METRICS
    served: list[int]  # body bytes each member sent its clients
    size: int
    machine: float  # the machine's busy share of all CPUs while the clients ran (anyone's)
    filled: list[float | None]  # s from the launch to each member's verified fill (None: none)
    origin_cpu: float = 0.0  # the origin's CPU s over the same span as the members'
    busy_cpu: float = 0.0  # CPU s the whole machine was busy while the clients ran (anyone's)
    # The members' event-loop threads, summed: s on a CPU, s runnable waiting for one.
    loop_ran: float = 0.0
    loop_waited: float = 0.0

    @property
    def client_cpu(self) -> float:
        return sum(f.client_cpu for f in self.fetches)

    @property
    def writers(self) -> int:
        """Members that wrote (and verified) a copy of their own."""
        return sum(1 for x in self.filled if x is not None)

    @property
    def last(self) -> float:
        return max(f.done for f in self.fetches)

    @property
    def ttfbs(self) -> list[float]:
        return [f.ttfb for f in self.fetches]

    def total(self, key: str) -> float:
        return sum(m[key] for m in self.member_metrics)

    def to_json(self) -> dict[str, object]:
        return {
            "upstream": self.up.__dict__,
            "member_cpu": self.member_cpu,
            "member_metrics": self.member_metrics,
            "served": self.served,
            "machine_busy": self.machine,
            "fills_verified_s": self.filled,
            "origin_cpu": self.origin_cpu,
            "client_cpu": self.client_cpu,
            "machine_busy_cpu_s": self.busy_cpu,
            "clients": [f.to_json() for f in self.fetches],
        }


def _deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: _m(after, name) - _m(before, name) for k, name in METRICS.items()}


def cold_run(
    env: Env,
    origin: Origin,
    members: list[Cached],
    urls: list[str],
    owner_of: Callable[[str], int],
    size: int,
) -> ColdRun:
    """Start every client in ``urls`` at once; wait for all, for the origin's and the
    members' quiet; ``owner_of(url)``: the index of the member serving that URL."""
    pids = [d.pid for d in members]
    measure.settle([origin.pid])
    mark = origin.log.mark()
    metrics0 = [scrape(d) for d in members]
    cpu0 = [measure.cpu_seconds([p]) for p in pids]
    origin0 = measure.cpu_seconds([origin.pid])
    loops0 = [measure.main_thread_sched(p) for p in pids]
    busy0, t0, launched = measure.busy_seconds(), time.monotonic(), time.time()
    fs = clients.fetch_many(urls, max_time=900)
    busy, elapsed = measure.busy_seconds() - busy0, time.monotonic() - t0
    loops = [measure.main_thread_sched(p) for p in pids]
    loop_ran = sum(b[0] - a[0] for a, b in zip(loops0, loops, strict=True))
    loop_waited = sum(b[1] - a[1] for a, b in zip(loops0, loops, strict=True))
    measure.wait_io_idle([origin.pid])
    wait_cpu_idle(pids)
    cpu = [measure.cpu_seconds([p]) - c for p, c in zip(pids, cpu0, strict=True)]
    origin_cpu = measure.cpu_seconds([origin.pid]) - origin0
    metrics = [_deltas(m0, scrape(d)) for m0, d in zip(metrics0, members, strict=True)]
    served = [0] * len(members)
    for url, f in zip(urls, fs, strict=True):
        served[owner_of(url)] += f.size
    for i, f in enumerate(fs):
        if f.error or f.code != 200 or f.size != size:
            env.problem(f"fleet client #{i} {f.url}: HTTP {f.code}, {f.size} B {f.error}")
    machine = busy / (elapsed * (os.cpu_count() or 1))
    image_id = urls[0].split("/v2/images/")[1].split("/")[0]
    filled = [_verified_at(d, image_id, launched) for d in members]
    up = origin.log.since(mark)
    return ColdRun(
        fs, up, cpu, metrics, served, size, machine, filled, origin_cpu, busy, loop_ran, loop_waited
    )


def _verified_at(daemon: Cached, image_id: str, since: float) -> float | None:
    """Seconds from ``since`` (time.time()) to the daemon's log line saying its fill of
    ``image_id`` was verified (None: it had no fill of its own). Log times are local, ms."""
    log = daemon.env.logs / f"{daemon.name}.log"
    pattern = re.compile(
        rf"^(\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{{3}}) \w+ cached\.fill: cached "
        rf"{re.escape(image_id)}: \d+ bytes, \w+ verified",
        re.MULTILINE,
    )
    m = pattern.search(log.read_text(errors="replace")) if log.exists() else None
    if m is None:
        return None
    return time.mktime(time.strptime(m[1], "%Y-%m-%d %H:%M:%S")) + int(m[2]) / 1e3 - since


def verify_copies(env: Env, members: list[Cached], image_id: str, md5: str, where: str) -> None:
    """Each member holds its own verified copy: a download of it is a hit with the right md5."""
    for d in members:
        f = clients.fetch(d.url(image_id))
        if "hit" not in f.cache_status:
            env.problem(f"{where}: {d.name} answered {f.cache_status!r}, not a hit")
        got = clients.md5_of_url(d.url(image_id))
        if got != md5:
            env.problem(f"{where}: {d.name} body md5 {got} != {md5}")


# --- HAProxy ------------------------------------------------------------------------------


class HAProxy:
    """haproxy -db (foreground) with ``balance uri`` / ``hash-type consistent``."""

    def __init__(self, env: Env, members: list[Cached]) -> None:
        self.port = free_port()
        run_dir = env.settings.workdir / "haproxy"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        self.sock = run_dir / "stats.sock"
        servers = "\n".join(
            f"  server m{i} 127.0.0.1:{d.port} check inter 300ms fall 1 rise 2"
            for i, d in enumerate(members)
        )
        cfg = run_dir / "haproxy.cfg"
        cfg.write_text(
            f"""global
  stats socket {self.sock} mode 600 level admin
  maxconn 2000
defaults
  mode http
  timeout connect 2s
  timeout client 900s
  timeout server 900s
  retries 3
  option redispatch
frontend fe
  bind 127.0.0.1:{self.port}
  default_backend members
backend members
  balance uri
  hash-type consistent
{servers}
"""
        )
        self.proc = Proc("haproxy", ["haproxy", "-db", "-f", str(cfg)], env.logs / "haproxy.log")
        wait_port(self.port)

    def url(self, image_id: str) -> str:
        return f"http://127.0.0.1:{self.port}/v2/images/{image_id}/file"

    def stats(self) -> dict[str, dict[str, str]]:
        """``show stat``: server name -> its CSV fields."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.sock))
            s.sendall(b"show stat\n")
            chunks = []
            while data := s.recv(65536):
                chunks.append(data)
        lines = b"".join(chunks).decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        out = {}
        for line in lines[1:]:
            if line:
                row = dict(zip(header, line.split(","), strict=False))
                out[row["svname"]] = row
        return out

    def bytes_out(self, n: int) -> list[int]:
        st = self.stats()
        return [int(st.get(f"m{i}", {}).get("bout") or 0) for i in range(n)]

    def wait_down(self, i: int, timeout: float = 15.0) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.stats().get(f"m{i}", {}).get("status", "").startswith("DOWN"):
                return time.monotonic() - t0
            time.sleep(0.05)
        raise TimeoutError(f"haproxy never marked m{i} down")

    def stop(self) -> None:
        self.proc.stop()


def haproxy_available(env: Env) -> bool:
    if shutil.which("haproxy"):
        return True
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("bench: apt-get install -y haproxy", flush=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "haproxy"],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            stdout=subprocess.DEVNULL,
        )
    if shutil.which("haproxy"):
        return True
    env.problem("fleet: no haproxy (apt-get install haproxy): its rows are left out")
    return False


# --- the scenario -------------------------------------------------------------------------


def _one_copy(
    env: Env, origin: Origin, data_name: str, size: int, rounds: int = 2, tag: str = "alone"
) -> float:
    """The origin's one-copy time: one client straight from it, median of ``rounds``."""
    data = env.data(data_name, size)
    times = []
    for r in range(rounds):
        image_id = env.images.alias(data, f"fleet-{tag}-{size}-{r}")
        measure.settle([origin.pid])
        f = clients.fetch(origin.url(image_id))
        if f.code != 200 or f.size != size:
            env.problem(f"fleet: origin alone: HTTP {f.code}, {f.size} B")
        times.append(f.total)
    return statistics.median(times)


def _row(run: ColdRun, one_copy: float) -> dict[str, object]:
    return {
        "clients": len(run.fetches),
        "gets": run.up.data_gets,
        "daemon_gets": run.total("up_data_requests") + run.total("up_range_requests"),
        "up_x": run.up.data_bytes / run.size,
        "ttfb_med": statistics.median(run.ttfbs) * 1e3,
        "ttfb_max": max(run.ttfbs) * 1e3,
        "last": run.last,
        "filled": max((x for x in run.filled if x is not None), default=None),
        "vs_one": run.last / one_copy,
        "cpu": sum(run.member_cpu) / (sum(run.served) / GIB or 1),
        "peer_mib": run.total("peer_sent") / MIB,
        "mb_s": sum(f.size for f in run.fetches) / run.last / 1e6,
        "busy": run.machine * 100,
    }


def _member_rows(t: Table, system: str, run: ColdRun, egress: list[int] | None = None) -> None:
    for i, (cpu, m, served) in enumerate(
        zip(run.member_cpu, run.member_metrics, run.served, strict=True)
    ):
        out = egress[i] if egress is not None else served + m["peer_sent"]
        up = m["up_data_bytes"] + m["up_range_bytes"]
        role = "upstream" if up > run.size / 2 else ("sibling" if m["peer_received"] else "")
        t.add(
            f"{system}: ctl-{i + 1}" + (f" ({role})" if role else ""),
            cpu=cpu,
            cpu_gib=cpu / (served / GIB) if served else None,
            cpu_fill=cpu / (run.size / GIB),
            egress=out / GIB,
            up_mib=up / MIB,
            peer_sent=m["peer_sent"] / MIB,
            peer_recv=m["peer_received"] / MIB,
        )


def _main_columns() -> list[Column]:
    return [
        Column("clients", "clients", ratio=False),
        Column("gets", "upstream GETs (origin log)", ratio=False),
        Column("daemon_gets", "upstream GETs (daemons)", ratio=False),
        Column("up_x", "upstream bytes / size", "{:.3f}"),
        Column("ttfb_med", "TTFB med ms", "{:.1f}"),
        Column("ttfb_max", "TTFB max ms", "{:.1f}"),
        Column("last", "last client s", "{:.2f}"),
        Column("filled", "last fill verified s", "{:.2f}"),
        Column("vs_one", "last / one-copy time", "{:.2f}"),
        Column("cpu", "CPU s/GiB served (all members)", "{:.2f}"),
        Column("peer_mib", "sibling-to-sibling MiB", "{:.0f}", ratio=False),
        Column("mb_s", "clients' MB/s (all)", "{:.0f}"),
        Column("busy", "machine CPU busy %", "{:.0f}", ratio=False),
    ]


# --- what the machine charges per byte, and what each run needed -------------------------

FRESH, OVERWRITE, SHA512 = (
    "pwritev 1 MiB pieces into a new file (new page-cache pages)",
    "pwritev over its last GiB again (cached pages)",
    "sha512 (hashlib, in memory; Glance's os_hash_algo)",
)


def _machine_table(env: Env, size: int) -> Table:
    """The per-byte costs every member pays, measured in this process after the runs (so it
    disturbs none): writing ``size`` bytes into a new file (new page-cache pages, as the
    members' fills do; each GiB on its own row), overwriting its last GiB, and sha512 over
    1 GiB. The test file goes in the work dir (where the members' caches were); deleted."""
    where = env.settings.workdir / "machine"
    where.mkdir(parents=True, exist_ok=True)
    try:
        measure.settle()
        writes = measure.page_write_cost(str(where), size)
    finally:
        shutil.rmtree(where, ignore_errors=True)
    os.sync()
    measure.settle()
    sha = measure.hash_cost("sha512", GIB)
    t = Table(
        "fleet-machine",
        f"fleet: this machine's cost of the per-byte work every member does (the bench's own "
        f"process after the runs, time.process_time; a new file of {size / GIB:g} GiB, as "
        f"{size / GIB:g} members' 1 GiB copies)",
        [
            Column("cpu", "CPU s per GiB", "{:.2f}", ratio=False),
            Column("mb_s", "MB/s (wall)", "{:.0f}", ratio=False),
        ],
        cached_row="",
    )
    t.add(FRESH, cpu=writes["fresh_cpu_s_per_gib"], mb_s=writes["fresh_mb_s"])
    for i, seg in enumerate(writes["segments"]):
        t.add(f"... its GiB {i + 1}", cpu=seg["cpu_s_per_gib"], mb_s=seg["mb_s"])
    t.add(OVERWRITE, cpu=writes["overwrite_cpu_s_per_gib"], mb_s=writes["overwrite_mb_s"])
    t.add(SHA512, cpu=sha["cpu_s_per_gib"], mb_s=sha["mb_s"])
    t.raw = {"page_writes": writes, "sha512": sha}
    t.notes += [
        "a new file tends to get first the pages the machine freed just before (here the "
        "last fleet's cache files, deleted moments earlier), then pages free for longer; "
        "the rows per GiB show what its pages cost on this machine, in order",
        "every member writes its own copy of the image into new pages of its cache file and "
        "hashes it with sha512 to verify it: the fleet-cpu table's estimates are members x "
        "GiB x the first row's (the whole new file) and the sha512 row's CPU s per GiB",
    ]
    return t


def _budget_row(
    t: Table, name: str, run: ColdRun, one_copy: float, machine: Table, other: float
) -> None:
    """CPU the run needed (members, curl clients, origin, HAProxy) against the CPU the
    machine has in 1.25 x the one-copy time; the members' fresh-page writes and sha512
    estimated from the machine table (each member that verified a copy wrote and hashed it)."""
    members = sum(run.member_cpu)
    needed = members + run.client_cpu + run.origin_cpu + other
    has = (os.cpu_count() or 1) * 1.25 * one_copy
    copies = run.writers * run.size / GIB
    fresh, sha = machine.value(FRESH, "cpu"), machine.value(SHA512, "cpu")
    t.add(
        name,
        members=members,
        clients=run.client_cpu,
        origin=run.origin_cpu,
        other=other or None,
        needed=needed,
        busy=run.busy_cpu,
        loop_ran=run.loop_ran,
        loop_waited=run.loop_waited,
        writes=copies * fresh if fresh is not None else None,
        sha=copies * sha if sha is not None else None,
        has=has,
        need_x=needed / has,
    )
    t.notes.append(
        f"{name}: CPU the run needed {needed:.1f} s vs CPU the machine has in 1.25 x "
        f"one-copy time {has:.1f} s ({os.cpu_count()} cores x 1.25 x {one_copy:.2f} s)"
    )


def _budget_notes(t: Table) -> None:
    t.notes += [
        "members: utime+stime of each member from before the clients start until it went "
        "idle; curl clients: their rusage; origin: the fake Glance's CPU over the members' "
        "span; machine busy: all CPUs' busy time (/proc/stat, anyone's, softirq of loopback "
        "included) while the clients ran",
        "members' event loops: each member's main thread (which accepts, authorises and "
        "sends headers) while the clients ran, summed over members, from "
        "/proc/PID/task/PID/schedstat: time on a CPU, and time runnable but waiting for one "
        "(when it exceeds the time on a CPU, the TTFBs measure the machine's queue)",
        "fresh-page writes and sha512 (est.): members that verified a copy x GiB x the "
        "fleet-machine table's CPU s per GiB (new file, whole; sha512); both are parts of "
        "the members' CPU",
        "machine has: cores x 1.25 x the one-copy time of the run's origin; needed / has "
        "above 1.00: the CPU this run measured does not fit on this machine's cores within "
        "the 'last client <= 1.25 x one-copy' target (the curl clients, which would run on "
        "other hosts in a deployment, included)",
    ]


# --- a cold range on a member that does not own the image -------------------------------


def _cold_range(
    env: Env, origin: Origin, fl: Fleet, data: DataFile, image_id: str, n: int, t: Table
) -> None:
    """One ``bytes=OFF-(OFF+999999)`` of a cold ``image_id`` asked of the member second in
    the image's rendezvous order (not its owner); a row of ``t``."""
    ids = [d.name.removeprefix(f"{fl.label}-") for d in fl.members]
    ring = order(ids, image_id)
    owner, asked = ring[0], ring[1]
    member = fl.members[ids.index(asked)]
    off = env.settings.range_offset
    out = env.settings.workdir / "fleet-range.bin"
    pids = [d.pid for d in fl.members]
    measure.settle([origin.pid])
    mark, metrics0 = origin.log.mark(), [scrape(d) for d in fl.members]
    f = clients.fetch(member.url(image_id), rng=f"{off}-{off + 999_999}", out=str(out))
    wait_cpu_idle(pids)
    measure.wait_io_idle([origin.pid])
    up = origin.log.since(mark)
    deltas = [_deltas(m0, scrape(d)) for m0, d in zip(metrics0, fl.members, strict=True)]
    daemon_up = sum(m["up_data_bytes"] + m["up_range_bytes"] for m in deltas)
    with open(data.path, "rb") as src:
        want = os.pread(src.fileno(), 1_000_000, off)
    right = out.exists() and out.read_bytes() == want
    out.unlink(missing_ok=True)
    if f.code != 206 or not right:
        env.problem(f"fleet range #{n} on {asked}: HTTP {f.code}, {f.size} B, bytes right {right}")
    chunk = chunk_size_for(data.size)
    name = f"#{n}: asked {asked}, owner {owner}"
    t.add(
        name,
        code=f.code,
        right="yes" if right else "NO",
        ttfb=f.ttfb * 1e3,
        total=f.total * 1e3,
        gets=up.data_gets,
        up_mib=up.data_bytes / MIB,
        daemon_mib=daemon_up / MIB,
        chunks=up.data_bytes / chunk,
        ranges=" ".join(r.removeprefix("bytes=") for r in up.ranges) or "–",
    )
    t.raw[name] = {
        **f.to_json(),
        "upstream": up.__dict__,
        "member_metrics": deltas,
        "chunk_size": chunk,
        "owner": owner,
        "asked": asked,
    }


def _range_goals(t: Table, size: int) -> None:
    ttfbs = [v for _, row in t.rows if isinstance(v := row.get("ttfb"), float)]
    ups = [v for _, row in t.rows if isinstance(v := row.get("chunks"), float)]
    if not ttfbs:
        return
    worst, med = max(ttfbs), statistics.median(ttfbs)
    t.goal(
        f"cold 1 MB range on a non-owner: TTFB <= 50 ms ({len(ttfbs)} tries)",
        worst,
        worst <= 50,
        f"{{:.1f}} ms max, {med:.1f} ms median",
    )
    chunk = chunk_size_for(size)
    t.goal(
        f"cold 1 MB range on a non-owner: upstream <= 1 chunk ({chunk / MIB:g} MiB)",
        max(ups),
        max(ups) <= 1.0,
        "{:.2f} chunks max (origin log)",
    )
    t.notes.append(
        "the member asked is second in the image's rendezvous order (cached.fleet.ring.order "
        "over the members' ids), so it asks the owner for the covering chunk; chunk size: "
        "cached.store.chunks.chunk_size_for(size); upstream bytes from the origin's access "
        "log and from the daemons' cached_upstream_bytes (data + range), both after the "
        "origin and the members went quiet; TTFB includes curl's connect"
    )


def fleet(env: Env) -> list[Table]:
    s = env.settings
    o = OPTIONS
    origin = Origin(env, o.rate)
    data = env.data("img", s.size)
    gib = data.size / GIB
    serial = iter(range(1 << 30))

    def fresh(tag: str) -> str:
        return env.images.alias(data, f"fleet-{tag}-{next(serial)}")

    main = Table(
        "fleet",
        f"fleet: {o.members} members x {o.clients} cold clients, one {gib:g} GiB image, origin "
        f"capped at {o.rate / MIB:.0f} MiB/s shared by all connections",
        _main_columns(),
        cached_row=PEER,
    )
    scaled_name = f"{PEER}, origin at {o.scaled_rate / MIB:g} MiB/s"
    scaled_alone = f"origin alone at {o.scaled_rate / MIB:g} MiB/s, 1 client"
    scaled = Table(
        "fleet-scaled",
        f"fleet: the same {o.members} x {o.clients} peer fill, origin capped at "
        f"{o.scaled_rate / MIB:g} MiB/s (a rate this machine's cores can carry), {gib:g} GiB",
        _main_columns(),
        cached_row=scaled_name,
    )
    budget = Table(
        "fleet-cpu",
        f"fleet: CPU each run needed against the CPU the machine has in 1.25 x its one-copy "
        f"time ({os.cpu_count()} cores), {gib:g} GiB",
        [
            Column("members", "members CPU s", "{:.1f}", ratio=False),
            Column("clients", "curl clients CPU s", "{:.1f}", ratio=False),
            Column("origin", "origin CPU s", "{:.1f}", ratio=False),
            Column("other", "HAProxy CPU s", "{:.1f}", ratio=False),
            Column("needed", "needed CPU s (sum)", "{:.1f}", ratio=False),
            Column("busy", "machine busy CPU s (clients running)", "{:.1f}", ratio=False),
            Column("loop_ran", "members' event loops on a CPU s", "{:.1f}", ratio=False),
            Column(
                "loop_waited", "members' event loops waiting for a CPU s", "{:.1f}", ratio=False
            ),
            Column("writes", "fresh-page writes CPU s (est.)", "{:.1f}", ratio=False),
            Column("sha", "sha512 CPU s (est.)", "{:.1f}", ratio=False),
            Column("has", "machine has CPU s", "{:.1f}", ratio=False),
            Column("need_x", "needed / has", "{:.2f}", ratio=False),
        ],
        cached_row="",
    )
    ranged = Table(
        "fleet-range",
        f"fleet: a cold 1 MB range `bytes={s.range_offset}-{s.range_offset + 999_999}` asked "
        f"of a member that is not the image's owner ({o.members} members, peer fill, origin "
        f"at {o.rate / MIB:.0f} MiB/s), each a fresh image id",
        [
            Column("code", "HTTP", ratio=False),
            Column("right", "bytes right", ratio=False),
            Column("ttfb", "TTFB ms", "{:.1f}", ratio=False),
            Column("total", "total ms", "{:.1f}", ratio=False),
            Column("gets", "upstream GETs (origin log)", ratio=False),
            Column("up_mib", "upstream MiB (origin log)", "{:.2f}", ratio=False),
            Column("daemon_mib", "upstream MiB (daemons)", "{:.2f}", ratio=False),
            Column("chunks", "upstream / chunk", "{:.2f}", ratio=False),
            Column("ranges", "upstream Range headers (origin log)", ratio=False),
        ],
        cached_row="",
    )
    per = Table(
        "fleet-members",
        f"fleet: per member (CPU from /proc/PID/stat; egress = bytes to clients + to siblings, "
        f"HAProxy: its per-server bytes out), {gib:g} GiB",
        [
            Column("cpu", "CPU s", "{:.2f}", ratio=False),
            Column("cpu_gib", "CPU s/GiB served", "{:.2f}", ratio=False),
            Column("cpu_fill", "CPU s per GiB of image", "{:.2f}", ratio=False),
            Column("egress", "egress GiB", "{:.2f}", ratio=False),
            Column("up_mib", "from upstream MiB", "{:.0f}", ratio=False),
            Column("peer_sent", "to siblings MiB", "{:.0f}", ratio=False),
            Column("peer_recv", "from siblings MiB", "{:.0f}", ratio=False),
        ],
        cached_row="",
    )
    again = Table(
        "fleet-again",
        "fleet: the holder killed, the image fetched again by one client",
        [
            Column("gets", "extra upstream GETs", ratio=False),
            Column("up_x", "extra upstream bytes / size", "{:.3f}", ratio=False),
            Column("time", "client s", "{:.2f}", ratio=False),
            Column("down", "until HAProxy saw it down s", "{:.2f}", ratio=False),
            Column("status", "cache status", ratio=False),
        ],
        cached_row="",
    )
    wide = Table(
        "fleet-wide",
        f"fleet: N members, one cold client each at once, {o.wide_size / MIB:.0f} MiB image",
        [
            Column("gets", "upstream GETs (origin log)", ratio=False),
            Column("daemon_gets", "upstream GETs (daemons)", ratio=False),
            Column("up_x", "upstream bytes / size", "{:.3f}", ratio=False),
            Column("ttfb_max", "TTFB max ms", "{:.1f}", ratio=False),
            Column("last", "last client s", "{:.2f}", ratio=False),
            Column("filled", "last fill verified s", "{:.2f}", ratio=False),
            Column("vs_one", "last / one-copy time", "{:.2f}", ratio=False),
            Column("cpu", "CPU s/GiB served (all)", "{:.2f}", ratio=False),
            Column("busy", "machine CPU busy %", "{:.0f}", ratio=False),
        ],
        cached_row="",
    )
    tables = [main, scaled, budget, ranged, per, again, wide]
    runs: dict[str, ColdRun] = {}
    copies: dict[str, float] = {}  # run -> the one-copy time it is measured against
    hap_cpu = 0.0
    try:
        one_copy = _one_copy(env, origin, "img", data.size)
        main.add(ALONE, clients=1, gets=1, up_x=1.0, last=one_copy, vs_one=1.0)

        def by_member(urls_of: list[str], members: list[Cached]) -> Callable[[str], int]:
            ports = {d.port: i for i, d in enumerate(members)}
            return lambda url: ports[int(url.split(":")[2].split("/")[0])]

        # (a) peer fill, then the owner killed
        fl = Fleet(env, origin, o.members, peer=True, label="peer").start()
        try:
            image_id = fresh("peer")
            urls = [d.url(image_id) for _ in range(o.clients) for d in fl.members]
            run = cold_run(env, origin, fl.members, urls, by_member(urls, fl.members), data.size)
            runs[PEER] = run
            verify_copies(env, fl.members, image_id, data.md5, PEER)
            owner = max(range(o.members), key=lambda i: run.member_metrics[i]["up_data_bytes"])
            fl.members[owner].proc.stop(signal.SIGKILL)  # type: ignore[union-attr]
            fl.members[owner].proc = None
            sibling = fl.members[(owner + 1) % o.members]
            mark = origin.log.mark()
            f = clients.fetch(sibling.url(image_id))
            measure.wait_io_idle([origin.pid])
            up = origin.log.since(mark)
            again.add(
                f"{PEER}: owner ctl-{owner + 1} killed, a sibling asked",
                gets=up.data_gets,
                up_x=up.data_bytes / data.size,
                time=f.total,
                status=f.cache_status,
            )
        finally:
            fl.stop()

        # (a2) the same peer fill in front of an origin at a rate the machine can carry
        if o.scaled_rate:
            slow = Origin(env, o.scaled_rate, name="fleet-origin-scaled")
            try:
                scaled_copy = _one_copy(env, slow, "img", data.size, rounds=1, tag="scaled")
                scaled.add(scaled_alone, clients=1, gets=1, up_x=1.0, last=scaled_copy, vs_one=1)
                fl = Fleet(env, slow, o.members, peer=True, label="scaled").start()
                try:
                    image_id = fresh("scaled")
                    urls = [d.url(image_id) for _ in range(o.clients) for d in fl.members]
                    run = cold_run(
                        env, slow, fl.members, urls, by_member(urls, fl.members), data.size
                    )
                    verify_copies(env, fl.members, image_id, data.md5, scaled_name)
                    scaled.add(scaled_name, **_row(run, scaled_copy))  # type: ignore[arg-type]
                    scaled.raw[scaled_name] = run.to_json()
                    scaled.raw[scaled_alone] = {"one_copy_s": scaled_copy}
                    runs[scaled_name], copies[scaled_name] = run, scaled_copy
                    _member_rows(per, scaled_name, run)
                finally:
                    fl.stop()
            finally:
                slow.stop()

        # (a3) cold 1 MB ranges asked of a non-owner
        if o.range_tries:
            fl = Fleet(env, origin, o.members, peer=True, label="range").start()
            try:
                for i in range(o.range_tries):
                    _cold_range(env, origin, fl, data, fresh("range"), i + 1, ranged)
            finally:
                fl.stop()
            _range_goals(ranged, data.size)

        # (b) the same members without peer fill
        fl = Fleet(env, origin, o.members, peer=False, label="nopeer").start()
        try:
            image_id = fresh("nopeer")
            urls = [d.url(image_id) for _ in range(o.clients) for d in fl.members]
            runs[NOPEER] = cold_run(
                env, origin, fl.members, urls, by_member(urls, fl.members), data.size
            )
        finally:
            fl.stop()

        # (c) one daemon
        fl = Fleet(env, origin, 1, peer=False, label="one").start()
        try:
            image_id = fresh("one")
            urls = [fl.members[0].url(image_id)] * o.clients
            runs[ONE] = cold_run(env, origin, fl.members, urls, lambda _u: 0, data.size)
        finally:
            fl.stop()

        # (d) HAProxy in front of members without peer fill
        if haproxy_available(env):
            fl = Fleet(env, origin, o.members, peer=False, label="haproxy").start()
            hap = HAProxy(env, fl.members)
            try:
                image_id = fresh("haproxy")
                urls = [hap.url(image_id)] * (o.clients * o.members)
                out0 = hap.bytes_out(o.members)
                hap_cpu = measure.cpu_seconds([hap.proc.pid])
                run = cold_run(env, origin, fl.members, urls, lambda _u: 0, data.size)
                hap_cpu = measure.cpu_seconds([hap.proc.pid]) - hap_cpu
                egress = [b - a for a, b in zip(out0, hap.bytes_out(o.members), strict=True)]
                run.served = egress  # who served the clients: HAProxy's per-server bytes out
                runs[HAPROXY] = run
                holder = max(range(o.members), key=lambda i: egress[i])
                fl.members[holder].proc.stop(signal.SIGKILL)  # type: ignore[union-attr]
                fl.members[holder].proc = None
                down = hap.wait_down(holder)
                mark = origin.log.mark()
                f = clients.fetch(hap.url(image_id))
                measure.wait_io_idle([origin.pid])
                up = origin.log.since(mark)
                again.add(
                    f"{HAPROXY}: holder ctl-{holder + 1} killed",
                    gets=up.data_gets,
                    up_x=up.data_bytes / data.size,
                    time=f.total,
                    down=down,
                    status=f.cache_status,
                )
                if f.code != 200 or f.size != data.size:
                    env.problem(f"haproxy after the kill: HTTP {f.code}, {f.size} B")
            finally:
                hap.stop()
                fl.stop()

        # (e) peer fill over TLS
        if o.tls:
            cert_key = self_signed(env.settings.workdir / "conf")
            old_bundle = os.environ.get("CURL_CA_BUNDLE")
            os.environ["CURL_CA_BUNDLE"] = str(cert_key[0])
            fl = Fleet(env, origin, o.members, peer=True, tls=cert_key, label="tls").start()
            try:
                image_id = fresh("tls")
                urls = [d.url(image_id) for _ in range(o.clients) for d in fl.members]
                runs[PEER_TLS] = cold_run(
                    env, origin, fl.members, urls, by_member(urls, fl.members), data.size
                )
            finally:
                fl.stop()
                if old_bundle is None:
                    os.environ.pop("CURL_CA_BUNDLE", None)
                else:
                    os.environ["CURL_CA_BUNDLE"] = old_bundle

        for name in (PEER, NOPEER, ONE, HAPROXY, PEER_TLS):
            if name in runs:
                copies[name] = one_copy
                main.add(name, **_row(runs[name], one_copy))  # type: ignore[arg-type]
                _member_rows(per, name, runs[name])
                main.raw[name] = runs[name].to_json()
            if name == HAPROXY and name in runs:
                served = sum(runs[name].served)
                per.add(
                    f"{HAPROXY}: the haproxy process",
                    cpu=hap_cpu,
                    cpu_gib=hap_cpu / (served / GIB) if served else None,
                    egress=served / GIB,
                )
        main.raw[ALONE] = {"one_copy_s": one_copy}

        # (f) N = 5, 7: one client each, a smaller image
        if o.wide:
            small = env.data("img-wide", o.wide_size)
            wide_copy = _one_copy(env, origin, "img-wide", small.size)
            wide.add(ALONE, gets=1, up_x=1.0, last=wide_copy, vs_one=1.0)
            for n in o.wide:
                fl = Fleet(env, origin, n, peer=True, label=f"wide{n}").start()
                try:
                    image_id = env.images.alias(small, f"fleet-wide-{n}-{next(serial)}")
                    urls = [d.url(image_id) for d in fl.members]
                    run = cold_run(
                        env, origin, fl.members, urls, by_member(urls, fl.members), small.size
                    )
                    row = _row(run, wide_copy)
                    name = f"N = {n}, peer fill"
                    wide.add(name, **{c.key: row[c.key] for c in wide.columns})  # type: ignore[arg-type]
                    wide.raw[name] = run.to_json()
                finally:
                    fl.stop()
    finally:
        origin.stop()
    machine = _machine_table(env, o.members * GIB)
    tables.insert(2, machine)
    _goals(main, wide, runs)
    if scaled_name in runs:
        _peer_goals(scaled, scaled_name, runs[scaled_name], scaled_alone)
    for name in (PEER, scaled_name, NOPEER, ONE, HAPROXY, PEER_TLS):
        if name in runs:
            other = hap_cpu if name == HAPROXY else 0.0
            _budget_row(budget, name, runs[name], copies[name], machine, other)
    _budget_notes(budget)
    return [t for t in tables if t.rows]


def _peer_goals(t: Table, name: str, run: ColdRun, alone: str) -> None:
    """Issue 17's targets for a peer-fill run, against the one-copy time of row ``alone``."""
    gets = run.up.data_gets
    t.goal(f"{name}: 1 upstream data GET", gets, gets == 1, "{:.0f}")
    x = run.up.data_bytes / run.size
    t.goal(f"{name}: upstream bytes <= 1.01 x size", x, x <= 1.01, "{:.3f}x")
    worst = max(run.ttfbs) * 1e3
    t.goal(f"{name}: every TTFB <= 100 ms", worst, worst <= 100, "{:.1f} ms max")
    last, one = t.value(name, "last"), t.value(alone, "last")
    t.goal(
        f"{name}: last client <= 1.25 x the origin's one-copy time",
        ratio(last, one),
        at_most(last, one, 1.25),
        "{:.2f}x",
    )


def _goals(main: Table, wide: Table, runs: dict[str, ColdRun]) -> None:
    for name in (PEER, PEER_TLS):
        if name in runs:
            _peer_goals(main, name, runs[name], ALONE)
    for name, values in wide.rows:
        if name == ALONE:
            continue
        n_gets, wx = values.get("gets"), wide.value(name, "up_x")
        ok = n_gets == 1 and wx is not None and wx <= 1.01
        wide.goal(f"{name}: one upstream GET, bytes <= 1.01 x", wx, ok, f"{n_gets} GET, {{:.3f}}x")
    main.notes.append(
        "(x) after a baseline value = peer fill ÷ that value; 'origin alone' is one client "
        "straight from the origin (its one-copy time) in the same run"
    )
    main.notes.append(
        "last fill verified: from the clients' launch to the last member's `cached ID: ... "
        "verified` log line (its fill done, digest checked); clients reading behind the fill "
        "end later"
    )
    main.notes.append(
        "machine CPU busy %: all CPUs' busy share while the clients ran (this run's processes "
        "and anyone else's, /proc/stat, steal included); near 100 the times measure the "
        "machine, not the upstream"
    )
    main.notes.append(
        "upstream GETs: data GETs in the origin's access log (authorisation probes "
        "`bytes=0-0` and record GETs apart) and the daemons' cached_upstream_requests "
        "(data + range); sibling-to-sibling: cached_fleet_peer_bytes{direction=sent}"
    )
