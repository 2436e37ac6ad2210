"""The bench's world: settings, work dir, origin, baselines, and cached daemons on demand."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import nginx
from bench.origin import DataFile, Images, make_data
from bench.procs import Proc, free_port, wait_port

MIB, GIB = 1 << 20, 1 << 30
SLOW_RATE = 100 * MIB  # the throttled origin, per connection


@dataclass
class Settings:
    """Sizes and repeat counts; ``quick()`` gives the ~1 minute variant."""

    workdir: Path
    size: int = GIB
    rounds: int = 5
    clients: int = 8
    concurrent_rounds: int = 2
    multi_count: int = 32
    multi_size: int = 256 * MIB
    rss_clients: int = 32
    small_size: int = 64 << 10
    wrk_seconds: float = 10
    wrk_rounds: int = 2
    ranges: int = 16
    entries: int = 10_000
    startup_rounds: int = 3
    varnish: bool = True
    range_origins: tuple[str, ...] = ("fast", "slow")
    quiet_max_wait: float = 3.0
    tries: int = 3  # attempts of a single-client run disturbed by other processes
    origin: str = "nginx"
    cached_cmd: list[str] = field(default_factory=list)

    @classmethod
    def quick(cls, workdir: Path) -> Settings:
        return cls(
            workdir,
            size=256 * MIB,
            rounds=2,
            concurrent_rounds=1,
            multi_size=16 * MIB,
            wrk_seconds=2,
            wrk_rounds=1,
            ranges=6,
            entries=1000,
            startup_rounds=1,
            varnish=False,
            range_origins=("slow",),
            quiet_max_wait=0.5,
            tries=1,
        )

    @property
    def range_offset(self) -> int:
        """PEERS.md 2d's ``bytes=500000000-500999999``; on a smaller image the same place
        inside a 4 MiB chunk near the middle (so the range still lies within one chunk)."""
        if self.size >= 501_000_000:
            return 500_000_000
        return self.size // 2 // (4 * MIB) * (4 * MIB) + 500_000_000 % (4 * MIB)


def parse_size(text: str) -> int:
    """``1G``, ``256M``, ``64K`` or bytes (binary units)."""
    units = {"K": 1 << 10, "M": MIB, "G": GIB}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def cached_command() -> list[str]:
    """How to run ``cached``: the console script beside this Python (not a pyenv shim, which
    would add its own start-up time), else its ``main`` through this Python."""
    exe = Path(sys.executable).parent / "cached"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from cached.cli import main; sys.exit(main())"]


_LOG_RE = re.compile(r'^(\S+) "(\S+) (\S+)[^"]*" (\d+) (\d+) range="([^"]*)"')


@dataclass
class Upstream:
    """What the origin saw between two marks of its access log (completed requests only)."""

    records: int = 0
    probes: int = 0
    data_gets: int = 0
    data_bytes: int = 0
    other: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    ranges: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return self.records + self.probes + self.data_gets + self.other


class OriginLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def since(self, mark: int) -> Upstream:
        up = Upstream()
        if not self.path.exists():
            return up
        with open(self.path, "rb") as f:
            f.seek(mark)
            lines = f.read().decode(errors="replace").splitlines()
        for line in lines:
            m = _LOG_RE.match(line)
            if not m:
                continue
            _, _, path, status, sent, rng = m.groups()
            rng = "" if rng == "-" else rng
            up.statuses[int(status)] = up.statuses.get(int(status), 0) + 1
            if re.fullmatch(r"/v2/images/[^/]+", path):
                up.records += 1
            elif path.endswith("/file") and rng == "bytes=0-0":
                up.probes += 1
            elif path.endswith("/file"):
                up.data_gets += 1
                up.data_bytes += int(sent)
                if rng:
                    up.ranges.append(rng)
            else:
                up.other += 1
        return up


class Cached:
    """One ``cached serve`` process with its own cache dir."""

    def __init__(
        self,
        env: Env,
        upstream_port: int,
        cache_dir: Path,
        name: str = "cached",
        config: dict[str, object] | None = None,
        listen: str = "127.0.0.1:0",
    ):
        self.env, self.cache_dir, self.name = env, cache_dir, name
        self.upstream_port = upstream_port
        self.config = config or {}
        self.listen = listen
        self.proc: Proc | None = None
        self.port = 0
        self.startup_s = 0.0

    def start(self) -> Cached:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.cache_dir).free
        max_size = max(1, min(200, int(free * 0.8 / GIB)))
        argv = [
            *self.env.settings.cached_cmd,
            "serve",
            "--listen",
            self.listen,
            "--upstream",
            f"http://127.0.0.1:{self.upstream_port}",
            "--cache-dir",
            str(self.cache_dir),
            "--max-size",
            f"{max_size}G",
        ]
        if self.config:  # JSON scalars are valid YAML
            conf = self.env.settings.workdir / "conf" / f"{self.name}.yaml"
            conf.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in self.config.items()))
            argv += ["-c", str(conf)]
        self.proc = Proc(self.name, argv, self.env.logs / f"{self.name}.log")
        self.port = self.proc.wait_listening(60)
        assert self.proc.listen_at is not None
        self.startup_s = self.proc.listen_at - self.proc.started_at
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()
            self.proc = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def url(self, image_id: str) -> str:
        return f"{self.base}/v2/images/{image_id}/file"

    @property
    def base(self) -> str:
        scheme = "https" if self.config.get("tls_cert_file") else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def entry(self, image_id: str) -> Path:
        return self.cache_dir / image_id


class Env:
    """Owns everything a run starts; ``close()`` stops it all."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        w = settings.workdir
        self.logs = w / "logs"
        for sub in ("www", "logs", "cache-cached", "cache-nginx"):
            shutil.rmtree(w / sub, ignore_errors=True)
        self.logs.mkdir(parents=True)
        self.layout = nginx.Layout(w)
        self.images = Images(w / "www", run_tag=f"{time.time_ns()}")
        self.problems: list[str] = []
        self.digest: dict[str, float] = {}  # algo -> CPU s/GiB, filled by the digest scenario
        self.origin_procs: list[Proc | nginx.Nginx] = []
        self.proxy: nginx.NginxProxy | None = None
        self.varnish: nginx.Varnish | None = None
        self.daemons: list[Cached] = []
        self.fast = self.slow = 0
        self.log = OriginLog(self.logs / "origin-access.log")

    def data(self, name: str, size: int) -> DataFile:
        d = make_data(self.settings.workdir / "data", name, size)
        subprocess.run(["cat", str(d.path)], stdout=subprocess.DEVNULL)  # into page cache
        return d

    def start(self) -> None:
        s = self.settings
        if s.origin == "nginx":
            org, self.fast, self.slow = nginx.origin(self.layout, self.images.www)
            self.origin_procs.append(org)
        else:
            for rate in (0, SLOW_RATE):
                argv = [
                    sys.executable,
                    "-m",
                    "bench.origin",
                    "--root",
                    str(self.images.www),
                    "--port",
                    str(free_port()),
                    "--rate",
                    str(rate),
                    "--log",
                    str(self.log.path),
                ]
                p = Proc(f"fake-glance-{rate}", argv, self.logs / f"fake-glance-{rate}.out")
                port = p.wait_listening()
                wait_port(port)
                self.origin_procs.append(p)
                if rate:
                    self.slow = port
                else:
                    self.fast = port
        self.proxy = nginx.NginxProxy(self.layout, self.fast, self.slow).start()
        if s.varnish and nginx.Varnish.available():
            gib = max(2, 3 * s.size // GIB + 1)
            self.varnish = nginx.Varnish(self.layout, self.fast, self.slow, gib).start()

    @property
    def origin_pids(self) -> list[int]:
        return [p.pid for p in self.origin_procs]

    def direct(self, which: str, image_id: str) -> str:
        port = self.fast if which == "fast" else self.slow
        return f"http://127.0.0.1:{port}/v2/images/{image_id}/file"

    def cached(
        self,
        which: str = "fast",
        name: str = "cached",
        wipe: bool = True,
        config: dict[str, object] | None = None,
        exclusive: bool = True,
    ) -> Cached:
        """A new daemon; ``exclusive`` stops the others first, ``wipe`` empties its cache dir,
        ``config`` goes to a YAML file passed with ``-c``."""
        if exclusive:
            self.stop_cached()
        cache_dir = self.settings.workdir / "cache-cached" / name
        if wipe:
            shutil.rmtree(cache_dir, ignore_errors=True)
        port = self.fast if which == "fast" else self.slow
        d = Cached(self, port, cache_dir, name, config).start()
        self.daemons.append(d)
        return d

    def stop_cached(self) -> None:
        for d in self.daemons:
            d.stop()
        self.daemons.clear()

    def reset_caches(self) -> None:
        """Between scenarios: stop cached, purge nginx, restart Varnish, free the disk."""
        self.stop_cached()
        shutil.rmtree(self.settings.workdir / "cache-cached", ignore_errors=True)
        if self.proxy:
            self.proxy.purge()
        if self.varnish:
            self.varnish.stop()
            self.varnish.start()

    def check_alive(self, where: str) -> None:
        """Report servers that exited on their own (a crash shows up as failed requests too)."""
        for d in self.daemons:
            if d.proc and d.proc.popen.poll() is not None:
                self.problem(
                    f"{where}: {d.name} exited with {d.proc.popen.returncode}: {d.proc.tail(5)}"
                )
                d.proc = None

    def problem(self, text: str) -> None:
        print(f"  ! {text}", flush=True)
        self.problems.append(text)

    def close(self) -> None:
        self.stop_cached()
        if self.varnish:
            self.varnish.stop()
        if self.proxy:
            self.proxy.stop()
        for p in self.origin_procs:
            p.stop()
        os.sync()
