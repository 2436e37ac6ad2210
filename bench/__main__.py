"""``python -m bench``: measure cached against the tools operators would use instead.

Sets everything up on loopback (data, nginx origin, nginx proxy_cache, Varnish if present,
cached), runs the scenarios, prints one table per scenario and writes a JSON file.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import fleet, footprint, measure, procs, ranges, safety, scenarios, tls
from bench.env import MIB, Env, Settings, cached_command, parse_size
from bench.report import Table, render, update_readme, write_json

SCENARIOS: dict[str, Callable[[Env], list[Table]]] = {
    "digest": scenarios.digest,
    "single": scenarios.single,
    "concurrent": scenarios.concurrent,
    "range": ranges.point_range,
    "random-ranges": ranges.random_ranges,
    "multi": footprint.multi,
    "small": footprint.small,
    "rss": footprint.rss,
    "startup": footprint.startup,
    "tls": tls.tls,
    "safety": safety.safety,
    "fleet": fleet.fleet,
}
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes, ~1 minute")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cached-bench"))
    p.add_argument("--only", help="comma-separated scenarios: " + ",".join(SCENARIOS))
    p.add_argument("--skip", default="", help="comma-separated scenarios to leave out")
    p.add_argument("--size", type=parse_size, help="image size (default 1G, quick 256M)")
    p.add_argument("--rounds", type=int, help="rounds of the single-stream scenario")
    p.add_argument("--entries", type=int, help="cache entries for the start-up scenario")
    p.add_argument(
        "--origin",
        choices=("nginx", "aiohttp"),
        default="nginx",
        help="upstream for every system: nginx (default) or the fake Glance",
    )
    p.add_argument(
        "--varnish",
        action=argparse.BooleanOptionalAction,
        help="include Varnish (default: in full mode, if installed)",
    )
    p.add_argument(
        "--fleet-rate",
        type=parse_size,
        default=100 * MIB,
        help="fleet: origin cap, all connections",
    )
    p.add_argument("--fleet-members", type=int, default=3, help="fleet: N of the 8-client runs")
    p.add_argument("--fleet-clients", type=int, default=8, help="fleet: clients per member")
    p.add_argument(
        "--fleet-n", default="5,7", help="fleet: N of the one-client-each runs ('' for none)"
    )
    p.add_argument("--fleet-wide-size", type=parse_size, default=256 * MIB)
    p.add_argument(
        "--fleet-tls", action=argparse.BooleanOptionalAction, default=True,
        help="fleet: also the peer-fill members over TLS",
    )  # fmt: skip
    p.add_argument(
        "--fleet-lookup-timeout", type=float, help="fleet: the members' fleet_lookup_timeout"
    )
    p.add_argument(
        "--fleet-scaled-rate",
        type=lambda text: parse_size(text) if text.strip() else 0,
        default=40 * MIB,
        help="fleet: the peer fill again with the origin at this cap ('' or 0 for none)",
    )
    p.add_argument(
        "--fleet-range-tries",
        type=int,
        default=3,
        help="fleet: cold 1 MB ranges asked of a non-owner, each a fresh image (0 for none)",
    )
    p.add_argument("--cached-cmd", help="how to run cached (default: the `cached` script)")
    p.add_argument("--json", type=Path, help="result file (default bench/results/DATE.json)")
    p.add_argument("--no-install", action="store_true", help="never apt-get install")
    p.add_argument("--keep", action="store_true", help="keep cache dirs in the work dir")
    p.add_argument(
        "--update-readme", action="store_true", help="write this run's tables into bench/README.md"
    )
    return p.parse_args(argv)


def ensure_tools(want_varnish: bool, allow_install: bool) -> None:
    """nginx is required, wrk and Varnish optional; install from Debian if root."""
    missing = [
        pkg
        for pkg, exe in (("nginx", "nginx"), ("wrk", "wrk"), ("curl", "curl"))
        if not shutil.which(exe)
    ]
    if want_varnish and not shutil.which("varnishd"):
        missing.append("varnish")
    if not missing:
        return
    if allow_install and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"bench: apt-get install -y {' '.join(missing)}", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", *missing]
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode:
            subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
            subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL)
    for exe in ("nginx", "curl"):
        if not shutil.which(exe):
            sys.exit(f"bench: {exe} is required (apt-get install {exe})")


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "missing"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "?"


def metadata(args: argparse.Namespace, settings: Settings) -> dict[str, object]:
    repo = Path(__file__).resolve().parent.parent
    git = subprocess.run(
        ["git", "-C", str(repo), "describe", "--always", "--dirty"], capture_output=True, text=True
    )
    rev = git.stdout.strip() if git.returncode == 0 else "uncommitted"
    import aiohttp

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "mode": "quick" if args.quick else "full",
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "mem_gib": round(
                os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / (1 << 30), 1
            ),
        },
        "cached": rev,
        "versions": {
            "python": platform.python_version(),
            "aiohttp": aiohttp.__version__,
            "nginx": _version(["nginx", "-v"]),
            "varnish": _version(["varnishd", "-V"]),
            "curl": _version(["curl", "--version"]),
            "wrk": _version(["wrk", "-v"]),
        },
        "settings": {k: str(v) for k, v in vars(settings).items()},
        "argv": sys.argv,
    }


def settings_from(args: argparse.Namespace) -> Settings:
    s = Settings.quick(args.workdir) if args.quick else Settings(args.workdir)
    if args.size:
        s.size = args.size
    if args.rounds:
        s.rounds = args.rounds
    if args.entries:
        s.entries = args.entries
    if args.varnish is not None:
        s.varnish = args.varnish
    s.origin = args.origin
    s.cached_cmd = args.cached_cmd.split() if args.cached_cmd else cached_command()
    fleet.OPTIONS = fleet.FleetOptions(
        rate=args.fleet_rate,
        members=args.fleet_members,
        clients=args.fleet_clients,
        tls=args.fleet_tls,
        wide=tuple(int(n) for n in args.fleet_n.split(",") if n),
        wide_size=args.fleet_wide_size,
        lookup_timeout=args.fleet_lookup_timeout,
        scaled_rate=args.fleet_scaled_rate,
        range_tries=args.fleet_range_tries,
    )
    return s


def check_cached(cmd: list[str]) -> None:
    out = subprocess.run([*cmd, "serve", "--help"], capture_output=True, text=True)
    if out.returncode:
        sys.exit(
            f"bench: `{' '.join(cmd)} serve --help` failed; is cached installed "
            f"(pip install -e .)?\n{out.stderr[-2000:]}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    names = args.only.split(",") if args.only else list(SCENARIOS)
    names = [n for n in names if n not in args.skip.split(",")]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        sys.exit(f"bench: unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    ensure_tools(settings.varnish, not args.no_install)
    check_cached(settings.cached_cmd)
    settings.workdir.mkdir(parents=True, exist_ok=True)
    meta = metadata(args, settings)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.json or RESULTS / f"{stamp}-{meta['mode']}.json"
    tables: list[Table] = []
    procs.install_signal_handlers()
    measure.QUIET_MAX_WAIT = settings.quiet_max_wait
    env = Env(settings)
    t0 = time.monotonic()
    status = 0
    try:
        env.start()
        for name in names:
            print(f"bench: {name} ...", flush=True)
            ts = time.monotonic()
            try:
                new = SCENARIOS[name](env)
            except (RuntimeError, TimeoutError, OSError) as exc:
                env.problem(f"scenario {name} failed: {exc!r}")
                new = []
            env.check_alive(name)
            for t in new:
                print(t.markdown() + "\n", flush=True)
            print(f"bench: {name} took {time.monotonic() - ts:.0f} s", flush=True)
            tables += new
            env.reset_caches()
    except (KeyboardInterrupt, SystemExit):
        env.problem("interrupted: the results below are partial")
        status = 130
    finally:
        env.close()
        procs.stop_all()
        if not args.keep:
            for sub in ("cache-cached", "cache-nginx", "www"):
                shutil.rmtree(settings.workdir / sub, ignore_errors=True)
    meta["duration_s"] = round(time.monotonic() - t0, 1)
    header = (
        f"## cached bench, {meta['mode']} mode, {meta['date']}, "
        f"{os.cpu_count()} CPUs, cached {meta['cached']}"
    )
    text = render(tables, env.problems, header)
    print("\n" + text)
    write_json(out, meta, tables, env.problems)
    out.with_suffix(".md").write_text(text + "\n")
    if args.update_readme:
        update_readme(
            Path(__file__).resolve().parent / "README.md",
            text.replace("## cached bench, ", "Run: ", 1),
        )
    print(f"\nbench: results in {out} (and .md); took {meta['duration_s']} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
