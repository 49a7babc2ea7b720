#!/usr/bin/env bash
# The README's first command: set up, then fine-tune SmolLM2-135M-Instruct with LoRA on CPU (a few minutes).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
exec "${JAXLORA_VENV:-$root/.venv}/bin/jaxlora" train --config configs/smollm2_135m_cpu.yaml "$@"
