#!/usr/bin/env bash
# Sets up everything dreamer needs, idempotently: a second run checks and returns in seconds.
#   1. system libraries for headless MuJoCo rendering (EGL/Mesa), when missing and we may install them;
#   2. a virtual environment in .venv;
#   3. torch (kept if already there: install a CUDA torch in .venv first to use a GPU);
#   4. the dependencies declared in pyproject.toml (the project itself is not installed: it runs from here).
set -euo pipefail
cd "$(dirname "$0")"

log() { echo "[setup] $*"; }

if ! ldconfig -p 2>/dev/null | grep -q 'libEGL.so.1' || ! ldconfig -p 2>/dev/null | grep -q 'libEGL_mesa.so.0'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing EGL/Mesa libraries for headless MuJoCo rendering"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libegl1 libegl-mesa0 libgl1 libgles2 >/dev/null
  else
    log "warning: libEGL/Mesa not found; install libegl1 libegl-mesa0 libgl1 (needed for MUJOCO_GL=egl)"
  fi
fi

[ -x .venv/bin/python ] || { log "creating .venv"; python3 -m venv .venv; }
PY=.venv/bin/python
pip_quiet() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true; }

stamp=.venv/.dreamer-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c "import torch, torchrl, dm_control, hydra" 2>/dev/null; then
  log "environment up to date"
  exit 0
fi

if ! "$PY" -c "import torch" 2>/dev/null; then
  # TORCH_INDEX_URL lets a CPU-only machine elsewhere pick PyTorch's CPU index; on ours the range resolves to a local
  # CPU wheel. A GPU user installs a CUDA torch into .venv before running this script.
  log "installing torch"
  pip_quiet "torch>=2.1,<2.14" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
log "installing dependencies from pyproject.toml"
pip_quiet ".[dev]"
"$PY" -c "import torch, torchrl, tensordict, hydra, dm_control, gymnasium, wandb" || { log "install failed"; exit 1; }
echo "$want" > "$stamp"
log "done (torch $("$PY" -c 'import torch; print(torch.__version__)'))"
