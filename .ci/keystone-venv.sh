#!/usr/bin/env bash
# keystone-venv.sh - make sure a virtualenv holds the real OpenStack Keystone used by the
# keystone test tier (tests/test_real_keystone.py): keystone 30.0.0 served by gunicorn,
# pinned by tests/data/keystone-constraints.txt (the versions that were tested).
#
# usage: .ci/keystone-venv.sh [VENV]
#   VENV defaults to ${CACHED_KEYSTONE_VENV:-$HOME/.cache/cached-keystone-venv}
#
# A fast no-op when the venv is already complete; otherwise it creates/fills it (pure-Python
# wheels: under a minute from a cold pip cache here). Safe to run concurrently: installs are
# serialised by flock. Environment: PYTHON (interpreter for `-m venv`, default python3).
set -euo pipefail

KEYSTONE_VERSION=30.0.0
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
constraints="$here/tests/data/keystone-constraints.txt"
venv=${1:-${CACHED_KEYSTONE_VENV:-$HOME/.cache/cached-keystone-venv}}
python=${PYTHON:-python3}

complete() {
    [ -x "$venv/bin/gunicorn" ] && [ -x "$venv/bin/keystone-manage" ] &&
    "$venv/bin/python" - "$KEYSTONE_VERSION" 2>/dev/null <<'PY'
import importlib.metadata as m, sys
sys.exit(0 if m.version("keystone") == sys.argv[1] and m.version("gunicorn") else 1)
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
echo "keystone-venv.sh: installing keystone==$KEYSTONE_VERSION and gunicorn into $venv" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --disable-pip-version-check -q \
    -c "$constraints" "keystone==$KEYSTONE_VERSION" gunicorn
complete || { echo "keystone-venv.sh: $venv is still incomplete after pip install" >&2; exit 1; }
echo "keystone-venv.sh: done in $(( $(date +%s) - t0 ))s" >&2
