#!/usr/bin/env bash
# Format (once) and mount the JuiceFS volume configured in .env; values already in the
# environment win over .env. Running it twice is harmless.
set -euo pipefail
cd "$(dirname "$0")"
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
if ! "$python" -c "import juicecache.volume" 2>/dev/null; then
    echo "start_juice.sh: error: dependencies missing: run 'make setup' (or pip install -r requirements.txt)" >&2
    exit 1
fi
exec "$python" main.py mount "$@"
