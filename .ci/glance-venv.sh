#!/usr/bin/env bash
# glance-venv.sh - make sure a virtualenv holds the real OpenStack Glance used by the
# glance test tier (tests/test_real_glance.py): glance 33.0.0, python-glanceclient and
# uWSGI, pinned by tests/data/glance-constraints.txt (the versions that were tested).
#
# usage: .ci/glance-venv.sh [VENV]
#   VENV defaults to ${CACHED_GLANCE_VENV:-$HOME/.cache/cached-glance-venv}
#
# A fast no-op when the venv is already complete; otherwise it creates/fills it
# (about a minute from a cold pip cache; uWSGI is compiled, so gcc and the Python
# headers are needed). Safe to run concurrently: installs are serialised by flock.
# Environment: PYTHON (interpreter for `-m venv`, default python3).
set -euo pipefail

GLANCE_VERSION=33.0.0
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
constraints="$here/tests/data/glance-constraints.txt"
venv=${1:-${CACHED_GLANCE_VENV:-$HOME/.cache/cached-glance-venv}}
python=${PYTHON:-python3}

complete() {
    [ -x "$venv/bin/uwsgi" ] && [ -x "$venv/bin/glance" ] && [ -x "$venv/bin/glance-manage" ] &&
    "$venv/bin/python" - "$GLANCE_VERSION" 2>/dev/null <<'PY'
import importlib.metadata as m, sys
ok = m.version("glance") == sys.argv[1]
for dist in ("python-glanceclient", "uWSGI", "keystonemiddleware"):
    m.version(dist)
sys.exit(0 if ok else 1)
PY
}

complete && exit 0

mkdir -p "$(dirname "$venv")"
if command -v flock >/dev/null; then
    exec 9>"$venv.lock"
    flock 9
    complete && exit 0    # another run finished it while we waited
fi

t0=$(date +%s)
echo "glance-venv.sh: installing glance==$GLANCE_VERSION, python-glanceclient, uwsgi into $venv" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --disable-pip-version-check -q \
    -c "$constraints" "glance==$GLANCE_VERSION" python-glanceclient uwsgi
complete || { echo "glance-venv.sh: $venv is still incomplete after pip install" >&2; exit 1; }
echo "glance-venv.sh: done in $(( $(date +%s) - t0 ))s" >&2
