#!/usr/bin/env bash
# The test suite, exactly as CI runs it: set up .venv if needed, then pytest (offline).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/venv.sh"
cd "$root"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$root/.venv/bin/python" -m pytest -n "${MINDHIER_TEST_WORKERS:-2}" "$@"
