"""nginx from Debian as the origin and as the proxy_cache baseline, and optional Varnish.

The origin serves the bench's ``www`` tree like Glance (record JSON + file with Range) on a
fast port and on a slow port (``limit_rate 100m``: 100 MiB/s per connection, about a 1 GbE
Glance backend).  The proxy puts ``proxy_cache`` in front of each origin port, once as a
whole-object cache with ``proxy_cache_lock`` and long lock timeouts (the best non-slice setup
in PEERS.md 2c) and once with ``slice 8m`` + lock (the fix for cold ranges).  Settings follow
PEERS.md §3 except ``tcp_nopush off`` (the 40 ms keep-alive stall of 2f) and the tuned proxy
buffers (nginx's best cold-miss CPU).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.procs import Proc, free_port, wait_port

COMMON = """\
user root;
worker_processes {workers};
daemon off;
pid {run}/{name}.pid;
error_log {logs}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
    default_type application/octet-stream;
    types {{ }}
    sendfile on;
    tcp_nopush off;
    keepalive_requests 100000;
    client_body_temp_path {tmp}/{name}_body;
    proxy_temp_path {tmp}/{name}_proxy;
    fastcgi_temp_path {tmp}/{name}_fcgi;
    uwsgi_temp_path {tmp}/{name}_uwsgi;
    scgi_temp_path {tmp}/{name}_scgi;
{body}
}}
"""

ORIGIN_SERVER = """\
    server {{
        listen 127.0.0.1:{port};
        root {www};
        {extra}
        location ~ "^/v2/images/([^/]+)$" {{
            default_type application/json;
            try_files /records/$1.json =404;
        }}
        location ~ "^/v2/images/([^/]+)/file$" {{
            try_files /images/$1 =404;
        }}
    }}
"""

ORIGIN_LOG = """\
    log_format o '$msec "$request" $status $body_bytes_sent range="$http_range" port=$server_port';
    access_log {logs}/origin-access.log o;
"""

PROXY_HEAD = """\
    log_format p '$msec "$request" $status $body_bytes_sent cache=$upstream_cache_status '
                 'ustatus=$upstream_status ubytes=$upstream_bytes_received rt=$request_time '
                 'range="$http_range" port=$server_port';
    access_log {logs}/proxy-access.log p;
    proxy_buffer_size 64k;
    proxy_buffers 16 1m;
    proxy_busy_buffers_size 2m;
"""

PROXY_SERVER = """\
    proxy_cache_path {cache}/{zone} levels=1:2 keys_zone={zone}:10m max_size=200g inactive=7d
                     use_temp_path=off;
    upstream {zone}_up {{ server 127.0.0.1:{upstream}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            {slice}
            proxy_pass http://{zone}_up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering on;
            proxy_cache {zone};
            proxy_cache_key {key};
            proxy_cache_valid 200 206 7d;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 300s;
            proxy_cache_lock_age 300s;
            add_header X-Cache $upstream_cache_status;
        }}
    }}
"""


@dataclass
class Layout:
    """Where a work dir keeps nginx's files."""

    root: Path

    def __post_init__(self) -> None:
        for sub in ("conf", "run", "logs", "tmp", "cache-nginx"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def fmt(self) -> dict[str, Path]:
        r = self.root
        return {"run": r / "run", "logs": r / "logs", "tmp": r / "tmp", "cache": r / "cache-nginx"}


class Nginx:
    """One nginx master (``daemon off``) with a generated config."""

    def __init__(self, layout: Layout, name: str, body: str, ports: list[int], workers: int = 2):
        self.layout, self.name, self.ports = layout, name, ports
        self.conf = layout.root / "conf" / f"{name}.conf"
        self.conf.write_text(COMMON.format(name=name, body=body, workers=workers, **layout.fmt()))
        self.proc: Proc | None = None

    def start(self) -> Nginx:
        argv = [
            "nginx",
            "-c",
            str(self.conf),
            "-p",
            str(self.layout.root),
            "-e",
            str(self.layout.root / "logs" / f"{self.name}-error.log"),
        ]
        check = subprocess.run([*argv, "-t"], capture_output=True, text=True)
        if check.returncode:
            raise RuntimeError(f"nginx config {self.conf} rejected:\n{check.stderr}")
        self.proc = Proc(f"nginx-{self.name}", argv, self.layout.root / "logs" / f"{self.name}.out")
        for port in self.ports:
            wait_port(port)
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()
            self.proc = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def origin(layout: Layout, www: Path) -> tuple[Nginx, int, int]:
    """Start the nginx origin; return it, its fast port and its slow (100 MiB/s) port."""
    fast, slow = free_port(), free_port()
    fmt = layout.fmt()
    body = ORIGIN_LOG.format(**fmt)
    body += ORIGIN_SERVER.format(port=fast, www=www, extra="")
    body += ORIGIN_SERVER.format(port=slow, www=www, extra="limit_rate 100m;")
    return Nginx(layout, "origin", body, [fast, slow]).start(), fast, slow


class NginxProxy:
    """The proxy_cache baseline: four servers (whole/slice x fast/slow origin)."""

    ZONES = ("whole_fast", "whole_slow", "slice_fast", "slice_slow")

    def __init__(self, layout: Layout, fast: int, slow: int) -> None:
        self.layout = layout
        self.port = {z: free_port() for z in self.ZONES}
        fmt = layout.fmt()
        body = PROXY_HEAD.format(**fmt)
        for zone in self.ZONES:
            sliced = zone.startswith("slice")
            body += PROXY_SERVER.format(
                zone=zone,
                port=self.port[zone],
                upstream=fast if zone.endswith("fast") else slow,
                cache=fmt["cache"],
                slice="slice 8m; proxy_set_header Range $slice_range;" if sliced else "",
                key="$uri$slice_range" if sliced else "$uri",
            )
        self.nginx = Nginx(layout, "proxy", body, list(self.port.values()))

    def start(self) -> NginxProxy:
        self.nginx.start()
        return self

    def purge(self) -> None:
        """Stop, empty the cache directories, start again (PEERS.md 3.2)."""
        self.nginx.stop()
        shutil.rmtree(self.layout.fmt()["cache"], ignore_errors=True)
        self.layout.fmt()["cache"].mkdir()
        self.nginx.start()

    def stop(self) -> None:
        self.nginx.stop()

    @property
    def pid(self) -> int:
        return self.nginx.pid

    def url(self, zone: str, image_id: str) -> str:
        return f"http://127.0.0.1:{self.port[zone]}/v2/images/{image_id}/file"


VCL = """\
vcl 4.1;
backend fast {{ .host = "127.0.0.1"; .port = "{fast}"; }}
backend slow {{ .host = "127.0.0.1"; .port = "{slow}"; }}
sub vcl_recv {{
    if (local.socket == "slow") {{ set req.backend_hint = slow; }}
    else {{ set req.backend_hint = fast; }}
}}
sub vcl_hash {{ hash_data(local.socket); }}
sub vcl_backend_response {{ set beresp.ttl = 1h; }}
sub vcl_deliver {{
    if (obj.hits > 0) {{ set resp.http.X-Cache = "HIT"; }}
    else {{ set resp.http.X-Cache = "MISS"; }}
}}
"""


class Varnish:
    """Varnish (malloc storage) in front of both origin ports, if ``varnishd`` exists."""

    def __init__(self, layout: Layout, fast: int, slow: int, storage_gib: int) -> None:
        self.layout = layout
        self.port = {"fast": free_port(), "slow": free_port()}
        self.vcl = layout.root / "conf" / "varnish.vcl"
        self.vcl.write_text(VCL.format(fast=fast, slow=slow))
        self.storage_gib = storage_gib
        self.proc: Proc | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("varnishd") is not None

    def start(self) -> Varnish:
        workdir = self.layout.root / "varnish"
        shutil.rmtree(workdir, ignore_errors=True)
        argv = [
            "varnishd",
            "-F",
            "-j",
            "none",
            "-n",
            str(workdir),
            "-f",
            str(self.vcl),
            "-a",
            f"fast=127.0.0.1:{self.port['fast']}",
            "-a",
            f"slow=127.0.0.1:{self.port['slow']}",
            "-s",
            f"malloc,{self.storage_gib}G",
            "-T",
            f"127.0.0.1:{free_port()}",
        ]
        self.proc = Proc("varnish", argv, self.layout.root / "logs" / "varnish.out")
        for port in self.port.values():
            wait_port(port, timeout=30)
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()
            self.proc = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def url(self, which: str, image_id: str) -> str:
        return f"http://127.0.0.1:{self.port[which]}/v2/images/{image_id}/file"
