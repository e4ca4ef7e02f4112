#!/bin/sh
# The daemon on the moto server that moto_up.py started, in the foreground (Ctrl-C stops it).
#
#   examples/aws-offline/run.sh [DIR] [serve options...]
#
# DIR is moto_up.py's --dir (default: $TMPDIR/orchestrator-aws-offline-<uid>). The daemon runs
# with DIR/env.sh's variables (moto's endpoint, dummy credentials, the region) and
# DIR/orchestrator.toml. Python: $PYTHON, else this checkout's .venv/bin/python, else python3.
set -eu

dir=${1:-${TMPDIR:-/tmp}/orchestrator-aws-offline-$(id -u)}
if [ $# -gt 0 ]; then shift; fi
if [ ! -f "$dir/env.sh" ]; then
    echo "run.sh: no $dir/env.sh: is moto_up.py running (with --dir $dir)?" >&2
    exit 2
fi
. "$dir/env.sh"

here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-$here/../../.venv/bin/python}
[ -x "$python" ] || python=python3
exec "$python" -m orchestrator serve --config "$ORCHESTRATOR_CONFIG" "$@"
