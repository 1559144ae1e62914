#!/usr/bin/env bash
# Create .venv and install Trainyard with the worker, local-mode and test extras.
# Picks the torch build first, so the `torch>=2.3` range in pyproject.toml never
# pulls a multi-GB CUDA wheel onto a machine without an NVIDIA GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${TRAINYARD_VENV:-.venv}
TORCH_VERSION=${TRAINYARD_TORCH_VERSION:-2.13.0}
stamp="$VENV/.trainyard-installed"
want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import torch, server, worker" 2>/dev/null; then
  exit 0  # already installed from these exact files
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# --no-compile, then one parallel compileall at the end: pip compiles file by file on one
# core. The compiling itself is not optional: with PYTHONDONTWRITEBYTECODE set (as on CI
# machines) nothing imported is ever cached, and every process would compile torch again
# (import torch: 6 s instead of 2.5 s; each worker, CLI and test process pays it).
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install: NVIDIA GPU found; installing the default (CUDA) torch build"
    "${pip[@]}" install -q --no-compile "torch>=2.3"
  elif "${pip[@]}" install -q --no-compile --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
    echo "install: no NVIDIA GPU; installed torch $TORCH_VERSION from a local wheel"
  else
    index=${TRAINYARD_TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
    echo "install: no NVIDIA GPU; installing the CPU torch build from $index"
    "${pip[@]}" install -q --no-compile torch --index-url "$index"
  fi
fi

"${pip[@]}" install -q --no-compile -e ".[worker,local,dev]"
"$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null || true
echo "$want" >"$stamp"
echo "install: ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'))"
