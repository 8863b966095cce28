#!/usr/bin/env bash
# Create or update .venv so it matches pyproject.toml. Idempotent: a stamp holding the hash of
# pyproject.toml skips the install when nothing changed. torch is installed first and pinned to
# the CPU wheel pip finds locally, so no dependency can pull a CUDA build (SPEC §8).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
stamp="$venv/.mindhier-installed"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[mindhier] setting up $venv (one time, about a minute) ..." >&2
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
log="$venv/install.log"
pipi() { "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" >>"$log" 2>&1 \
         || { echo "[mindhier] pip install $* failed; see $log" >&2; tail -n 20 "$log" >&2; exit 1; }; }
: > "$log"
pipi "torch==2.13.0"
pipi -e "$root[dev]"
echo "$want" > "$stamp"
echo "[mindhier] environment ready" >&2
