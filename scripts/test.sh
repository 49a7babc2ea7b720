#!/usr/bin/env bash
# The README's test command: set up, then run the whole suite (8 simulated CPU devices per worker, see
# tests/conftest.py).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
# Two workers (pytest-xdist), one test file each at a time: tracing and XLA compilation are single-threaded, so two
# files in parallel use the 2-core CI machine's second core. Pass -n 0 to run in one process. --durations: the 25
# slowest tests are listed at the end, to keep the suite's time in view (README, Tests).
exec "${JAXLORA_VENV:-$root/.venv}/bin/python" -m pytest -q -n 2 --dist loadfile --durations=25 "$@"
