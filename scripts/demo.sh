#!/usr/bin/env bash
# The offline demo: set up .venv if needed, then `mindhier demo` (arguments pass through).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/venv.sh"
cd "$root"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$root/.venv/bin/mindhier" demo "$@"
