"""The README's install recipe, run as written (issue 19 item 1).

The block under ``#### Install`` in README.md is read from the file (never a copy) and run
by bash as root in a private mount and network namespace: overlays with a tmpfs upper layer
cover every tree it writes (``/etc``, ``/opt``, ``/usr/local``, ``/var``, ``/run`` and the
checkout, where ``pip install .`` builds), so nothing it does outlives the namespace; the
network is loopback only (pip installs from a wheelhouse ``.ci/run`` downloads beforehand,
``$CACHED_WHEELHOUSE``). ``systemctl`` is tests/unitrun.py, which starts the unit the recipe
installed the way systemd does (``RuntimeDirectory=``, ``ExecStartPre=``, ``ExecStart=`` as
``User=``, ``Type=notify``). Checked: the recipe succeeds; the service is active (READY=1
received, process running); ``cached-manage list-cached`` works on the node with no options;
``/metrics`` is scrapeable; and the machine is as it was.

Also (item 21): ``python -m build`` makes an sdist and, from it, a wheel, offline (the build
backend from the same wheelhouse); that wheel installs with pip in a new virtualenv, and
its ``cached --version`` says the version. Nothing is written in the checkout (the build
runs on a copy of it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cached import __version__

ROOT = Path(__file__).resolve().parent.parent
WHEELHOUSE = Path(os.environ.get("CACHED_WHEELHOUSE", ROOT / ".ci" / "wheelhouse"))
# What the recipe makes (each must be as it was after the test).
TOUCHED = (
    "/etc/cached",
    "/opt/cached",
    "/usr/local/bin/cached",
    "/usr/local/bin/cached-manage",
    "/var/lib/cached",
    "/run/cached",
    "/etc/systemd/system/cached.service",
    "/usr/share/doc/cached",
)


def install_block() -> str:
    """The first fenced block after the README's ``#### Install`` heading."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^#### Install\n.*?^```\n(.*?)^```\n", text, re.MULTILINE | re.DOTALL)
    assert match, "README.md has no '#### Install' section with a code block"
    return match[1]


def missing(reason: str) -> None:
    if os.environ.get("CACHED_TOOLS_REQUIRED") or os.environ.get("CACHED_MOUNT_REQUIRED"):
        pytest.fail(f"{reason} (required here)")
    pytest.skip(reason)


DRIVER = r"""
set -euo pipefail
ov=$1 checkout=$2 wheelhouse=$3 recipe=$4 out=$5
mount --make-rprivate /
mount -t tmpfs tmpfs "$ov"
for dir in /etc /opt /usr/local /var /run "$checkout" /usr/share/doc; do
    name=$(echo "$dir" | tr / _)
    mkdir -p "$ov/$name/upper" "$ov/$name/work"
    mount -t overlay overlay \
        -o "lowerdir=$dir,upperdir=$ov/$name/upper,workdir=$ov/$name/work" "$dir"
done
ip link set lo up
mkdir -p "$ov/bin"
printf '#!/bin/sh\nexec /usr/bin/python3 %s/tests/unitrun.py %s/unitrun "$@"\n' \
    "$checkout" "$ov" > "$ov/bin/systemctl"
chmod +x "$ov/bin/systemctl"
export PATH="$ov/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
unset PYTHONPATH VIRTUAL_ENV
export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_FIND_LINKS="$wheelhouse"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
finish() {
    systemctl stop cached >/dev/null 2>&1 || true
    cp "$ov"/unitrun/*.log "$out/" 2>/dev/null || true
}
trap finish EXIT
cd "$checkout"
echo "=== recipe"
bash -euo pipefail -x "$recipe"
echo "=== checks"
systemctl is-active cached
cached-manage list-cached > "$out/list-cached"
cached --version > "$out/version"
/opt/cached/bin/python -c 'import importlib.metadata as m; print(m.version("cached"))' \
    > "$out/dist-version"
curl -sf http://127.0.0.1:9293/metrics > "$out/metrics"
cp "$ov/unitrun/cached.service.json" "$out/state.json"
systemctl stop cached
systemctl is-active cached || true
"""


def test_the_readme_install_recipe_ends_in_a_managed_scrapeable_service(
    tmp_path: Path,
) -> None:
    if os.geteuid() != 0:
        missing("the install recipe runs as root")
    for tool in ("unshare", "ip", "setpriv", "curl"):
        if shutil.which(tool) is None:
            missing(f"{tool} is not installed (.ci/run installs it)")
    if not Path("/usr/bin/python3").exists():
        missing("no system python3 (apt-get install python3 python3-venv)")
    if not any(WHEELHOUSE.glob("aiohttp-*.whl")):
        missing(f"no wheelhouse at {WHEELHOUSE} (.ci/run downloads it)")
    before = {path: os.path.lexists(path) for path in TOUCHED}
    recipe = tmp_path / "recipe.sh"
    recipe.write_text(install_block())
    driver = tmp_path / "driver.sh"
    driver.write_text(DRIVER)
    out = tmp_path / "out"
    out.mkdir()
    ov = tmp_path / "ov"
    ov.mkdir()
    res = subprocess.run(
        ["unshare", "--mount", "--net", "--fork", "bash", str(driver),
         str(ov), str(ROOT), str(WHEELHOUSE), str(recipe), str(out)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600, check=False,
    )  # fmt: skip
    journal = "".join(p.read_text() for p in out.glob("*.log"))
    report = f"{res.stdout}\n{res.stderr}\n--- the service's log:\n{journal}"
    assert res.returncode == 0, report
    # systemctl status (the recipe's last systemctl) said active: READY=1 came, and
    # the recipe's own cached-manage and curl lines passed (set -e).
    assert "Active: active (running)" in res.stdout, report
    assert "=== checks\nactive\n" in res.stdout, report
    assert (out / "list-cached").read_text() == "No cached images.\n"
    # The installed package says its version, the one its metadata has (item 21).
    assert (out / "version").read_text() == f"cached {__version__}\n"
    assert (out / "dist-version").read_text() == f"{__version__}\n"
    metrics = (out / "metrics").read_text()
    assert "\ncached_cache_max_bytes 2.147483648e+11\n" in metrics, metrics
    assert res.stdout.rstrip().endswith("inactive"), report  # stopped cleanly at the end
    # Nothing the recipe wrote is left on the machine.
    assert {path: os.path.lexists(path) for path in TOUCHED} == before


def offline_pip() -> dict[str, str]:
    """The environment for pip (and ``build``'s isolated environment) with no index but
    the wheelhouse."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env.update(
        PIP_CONFIG_FILE=os.devnull,
        PIP_NO_INDEX="1",
        PIP_FIND_LINKS=str(WHEELHOUSE),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PIP_NO_CACHE_DIR="1",
    )
    return env


def test_a_wheel_from_python_m_build_installs_in_a_clean_virtualenv(tmp_path: Path) -> None:
    """Item 21: ``python -m build``, then ``pip install`` of its wheel in a new virtualenv;
    ``cached --version`` names the version."""
    try:
        import build  # noqa: F401  (the test extra; .ci/run installs it)
    except ImportError:
        missing("the 'build' package is not installed (pip install -e '.[test]')")
    if not any(WHEELHOUSE.glob("setuptools-*.whl")):
        missing(f"no wheelhouse with setuptools at {WHEELHOUSE} (.ci/run downloads it)")
    source = tmp_path / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".ci", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".venv"
        ),
    )
    env = offline_pip()
    dist = tmp_path / "dist"

    def run(*argv: str | Path) -> str:
        res = subprocess.run(
            [str(a) for a in argv], capture_output=True, text=True, env=env,
            stdin=subprocess.DEVNULL, timeout=300, check=False,
        )  # fmt: skip
        assert res.returncode == 0, f"{argv}:\n{res.stdout}\n{res.stderr}"
        return res.stdout

    run(sys.executable, "-m", "build", "--outdir", dist, source)
    wheels = sorted(dist.glob("cached-*.whl"))
    assert [w.name for w in wheels] == [f"cached-{__version__}-py3-none-any.whl"]
    assert sorted(dist.glob("cached-*.tar.gz")) != []
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin" / "pip", "install", wheels[0])
    assert run(venv / "bin" / "cached", "--version") == f"cached {__version__}\n"
    assert run(venv / "bin" / "cached-manage", "--help")
