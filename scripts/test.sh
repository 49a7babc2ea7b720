#!/usr/bin/env bash
# The README's test command: set up, then run the whole suite (8 simulated CPU devices, see tests/conftest.py).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
exec "${JAXLORA_VENV:-$root/.venv}/bin/python" -m pytest -q "$@"
