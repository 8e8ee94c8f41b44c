#!/usr/bin/env bash
# Create or reuse the project virtual environment at .venv (repo root) from constraints.txt.
# Reused only when its recorded hash matches constraints.txt + setup.cfg + this script;
# otherwise rebuilt from scratch, so a stale environment can never hide a missing pin.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=.venv
STAMP=$VENV/.gmeta-stack-hash
want=$(cat constraints.txt setup.cfg tools/bootstrap.sh | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/gmeta" ]; then
  echo "[bootstrap] reusing $VENV (stack hash $want)"
  exit 0
fi

start=$(date +%s)
echo "[bootstrap] building $VENV from constraints.txt (stack hash $want); first time takes ~6 min"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade "pip>=24" "setuptools>=68,<76" wheel
echo "[bootstrap] installing TensorFlow, tensorflow-io, pyarrow, MLflow (pinned)"
$PIP install -q -c constraints.txt tensorflow-cpu tensorflow-io tensorflow-io-gcs-filesystem \
  mlflow pyarrow numpy protobuf absl-py psutil matplotlib requests scipy cloudpickle optuna pytest pytest-timeout pytest-xdist packaging
echo "[bootstrap] building Horovod from source with Gloo + TensorFlow (about 3 min on 2 cores)"
HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=gloo \
MAKEFLAGS="-j$(nproc)" \
  $PIP install -q --no-cache-dir --no-build-isolation -c constraints.txt horovod
echo "[bootstrap] installing gmeta (editable)"
$PIP install -q --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c "import horovod.tensorflow as h; assert h.gloo_built(), 'Horovod built without Gloo'"
echo "$want" > "$STAMP"
echo "[bootstrap] done in $(( $(date +%s) - start )) s"
