#!/usr/bin/env bash
# Unmount the JuiceFS volume configured in .env; harmless when nothing is mounted.
# A dead mount (its client killed) is detached, so start_juice.sh can mount it again.
set -euo pipefail
cd "$(dirname "$0")"
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
if ! "$python" -c "import juicecache.volume" 2>/dev/null; then
    echo "stop_juice.sh: error: dependencies missing: run 'make setup' (or pip install -r requirements.txt)" >&2
    exit 1
fi
exec "$python" main.py unmount "$@"
