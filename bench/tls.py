"""The ``tls`` scenario: what TLS on cached's listener costs, against the same daemon build
listening in plain HTTP, measured interleaved in the same run.

Both daemons run at once in front of the fast origin (each with its own cache dir); curl
trusts a self-signed certificate made here with ``openssl`` (``CURL_CA_BUNDLE``). Cold misses
use a fresh image id each; hits re-read the newest cold id. A plain hit goes out with
``sendfile``; under userspace TLS asyncio cannot use it, so cached reads the file in a thread
and writes through the TLS transport: the hit rows show what that costs. The notes say
whether kernel TLS (kTLS), which would give sendfile back, is usable on this machine.
"""

from __future__ import annotations

import os
import ssl
import statistics
import subprocess
from pathlib import Path

from bench.env import GIB, Env
from bench.report import Column, Table
from bench.scenarios import FOREIGN_LIMIT, Run, System, check, rotate, timed_fetch

PLAIN, TLS = "cached (plain HTTP)", "cached (TLS)"


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A P-256 key and a certificate for 127.0.0.1 (valid a day), made by ``openssl``."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "bench-cert.pem", directory / "bench-key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def ktls_status() -> list[str]:
    """What this machine offers for kernel TLS, in words."""
    notes = []
    try:
        ulps = Path("/proc/sys/net/ipv4/tcp_available_ulp").read_text().split()
    except OSError:
        ulps = []
    modules = Path("/proc/modules")
    loaded = modules.exists() and any(
        line.split()[0] == "tls" for line in modules.read_text().splitlines()
    )
    notes.append(
        "kTLS in the kernel: "
        + ("available" if "tls" in ulps or loaded else "not available")
        + f" (tcp_available_ulp: {' '.join(ulps) or 'none'}; "
        + ("/proc/modules: tls loaded" if loaded else "/proc/modules: " + (
            "no tls module" if modules.exists() else "absent, no loadable modules"))
        + ")"
    )  # fmt: skip
    notes.append(
        f"kTLS in Python's ssl ({ssl.OPENSSL_VERSION}): "
        + ("ssl.OP_ENABLE_KTLS exists" if hasattr(ssl, "OP_ENABLE_KTLS") else
           "no ssl.OP_ENABLE_KTLS (Python 3.12+); asyncio's TLS runs over memory BIOs, "
           "so the kernel never sees the socket's TLS state either way")
    )  # fmt: skip
    return notes


def tls(env: Env) -> list[Table]:
    s = env.settings
    data = env.data("img", s.size)
    gib = data.size / GIB
    cert, key = self_signed(s.workdir / "conf")
    plain = env.cached("fast", name="cached-plain")
    secure = env.cached(
        "fast",
        name="cached-tls",
        config={"tls_cert_file": str(cert), "tls_key_file": str(key)},
        exclusive=False,
    )
    systems = [
        System(PLAIN, plain.url, [plain.pid]),
        System(TLS, secure.url, [secure.pid]),  # https: the daemon has a certificate
    ]
    old_bundle = os.environ.get("CURL_CA_BUNDLE")
    os.environ["CURL_CA_BUNDLE"] = str(cert)
    cold: dict[str, list[Run]] = {}
    warm: dict[str, list[Run]] = {}
    newest: dict[str, str] = {}
    serial = iter(range(1 << 30))
    try:
        for r in range(s.rounds):
            for sys in rotate(systems, r):

                def fresh(sys: System = sys) -> str:
                    return env.images.alias(data, f"tls-{sys.name}-{next(serial)}")

                run = timed_fetch(env, sys, fresh, "cold")
                check(env, f"cold {sys.name}", run.fetch, 200, data.size)
                newest[sys.name] = run.image_id
                cold.setdefault(sys.name, []).append(run)
        for r in range(s.rounds):
            for sys in rotate(systems, r):
                run = timed_fetch(env, sys, lambda sys=sys: newest[sys.name], "hit")
                check(env, f"hit {sys.name}", run.fetch, 200, data.size)
                if "hit" not in run.fetch.cache_status:
                    env.problem(f"hit {sys.name}: cache status {run.fetch.cache_status!r}")
                warm.setdefault(sys.name, []).append(run)
    finally:
        if old_bundle is None:
            os.environ.pop("CURL_CA_BUNDLE", None)
        else:
            os.environ["CURL_CA_BUNDLE"] = old_bundle
    t = Table(
        "tls",
        f"TLS on the listener, {gib:g} GiB, one client, fast origin ({s.rounds} rounds)",
        [
            Column("miss_mb_s", "miss MB/s"),
            Column("miss_cpu", "miss CPU s/GiB", "{:.2f}"),
            Column("hit_mb_s", "hit MB/s"),
            Column("hit_cpu", "hit CPU s/GiB", "{:.2f}"),
            Column("foreign", "max foreign CPU s", "{:.2f}", ratio=False),
        ],
        cached_row=TLS,
    )
    for sys in systems:
        c, w = cold[sys.name], warm[sys.name]
        t.add(
            sys.name,
            miss_mb_s=statistics.median(x.fetch.mb_s for x in c),
            miss_cpu=statistics.median(x.cpu for x in c) / gib,
            hit_mb_s=statistics.median(x.fetch.mb_s for x in w),
            hit_cpu=statistics.median(x.cpu for x in w) / gib,
            foreign=max(x.foreign for x in [*c, *w]),
        )
        t.raw[sys.name] = {"cold": [x.to_json() for x in c], "hit": [x.to_json() for x in w]}
    extra_hit = _minus(t.value(TLS, "hit_cpu"), t.value(PLAIN, "hit_cpu"))
    extra_miss = _minus(t.value(TLS, "miss_cpu"), t.value(PLAIN, "miss_cpu"))
    if extra_hit is not None and extra_miss is not None:
        t.notes.append(
            f"TLS adds {extra_hit:.2f} CPU s/GiB to a hit (sendfile lost: read in a thread, "
            f"encrypt, write) and {extra_miss:.2f} CPU s/GiB to a miss (encrypt only; a miss "
            "never used sendfile)"
        )
    t.notes.append(
        "(x) here is TLS ÷ plain; the ECDHE-P256 certificate is made by openssl for the run; "
        f"foreign CPU: runs retried when > {FOREIGN_LIMIT['hit']} s (hit) / "
        f"{FOREIGN_LIMIT['cold']} s (cold)"
    )
    t.notes.extend(ktls_status())
    return [t]


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b
