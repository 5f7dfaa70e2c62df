#!/usr/bin/env bash
# The official `openai` Python client in its own venv, for cli/tests/openai.rs (which finds
# it through TROUPE_OPENAI_PYTHON, or at this default path). Idempotent: an existing venv with
# the pinned version is kept. Prints the venv's python as its last line.
#
# env: TROUPE_HOME  where the venv goes (default ~/.cache/troupe): $TROUPE_HOME/openai-venv
#      PYTHON       the interpreter that makes the venv (default python3)
set -euo pipefail

OPENAI_VERSION=3.51.0
venv="${TROUPE_HOME:-$HOME/.cache/troupe}/openai-venv"
python="${PYTHON:-python3}"

if [[ -x "$venv/bin/python" ]] \
  && "$venv/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null; then
  echo "$venv/bin/python"
  exit 0
fi
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "openai==$OPENAI_VERSION" >&2
"$venv/bin/python" -c "import openai; print('openai', openai.__version__)" >&2
echo "$venv/bin/python"
