#!/usr/bin/env bash
# Sets up the Python environment of the reference tooling in scripts/ref/ (numpy, gguf-py,
# HF tokenizers, pinned), in $TROUPE_HOME/ref/venv (default ~/.cache/troupe/ref/venv), and
# fetches the SmolLM2-135M-Instruct GGUF through troupe's own cache when asked:
#
#   scripts/ref/setup.sh            prints PY=<the venv's python>
#
# Idempotent: a second run only prints.
set -euo pipefail
home=${TROUPE_HOME:-$HOME/.cache/troupe}
venv=$home/ref/venv
pins=(numpy==2.3.5 gguf==0.17.1 tokenizers==0.22.1)
stamp=$venv/.troupe-pins
if [[ ! -x $venv/bin/python || $(cat "$stamp" 2>/dev/null) != "${pins[*]}" ]]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q "${pins[@]}"
  echo "${pins[*]}" >"$stamp"
fi
echo "PY=$venv/bin/python"
