#!/usr/bin/env bash
# Install everything hvdllm needs, from nothing, idempotently:
#   1. an MPI (Debian's OpenMPI) unless one is already on PATH (cluster: `module load openmpi`);
#   2. a virtual environment (.venv) with torch, tensorflow-cpu, numpy, mpi4py, ...;
#      HVDLLM_SYSTEM_PACKAGES=1 makes the venv see the cluster's own torch/TF instead;
#   3. Horovod 0.28.1 built from its PyPI sdist with the patches today's frameworks need,
#      the wheel cached outside the repo keyed by (horovod, torch, tf, python, gpu-ops) so a
#      second install takes seconds;
#   4. hvdllm itself, editable.
# A stamp file makes a second call a no-op in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${HVDLLM_VENV:-$ROOT/.venv}
CACHE=${HVDLLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvdllm}
HOROVOD_VERSION=0.28.1
TORCH_SPEC=${HVDLLM_TORCH_SPEC:-torch==2.13.0}
# A GPU node (nvidia-smi lists a device): TensorFlow's CUDA build and Horovod's NCCL operations,
# unless set otherwise (torch's PyPI wheel for Linux already carries CUDA).
GPU=0
if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  GPU=1
  HOROVOD_GPU_OPERATIONS=${HOROVOD_GPU_OPERATIONS:-NCCL}
  export HOROVOD_GPU_OPERATIONS
fi
if [[ $GPU == 1 ]]; then
  TF_SPEC=${HVDLLM_TF_SPEC:-tensorflow[and-cuda]==2.21.0}
else
  TF_SPEC=${HVDLLM_TF_SPEC:-tensorflow-cpu==2.21.0}
fi
STAMP=$VENV/.hvdllm-installed
t0=$(date +%s)

# What the environment is built for. The stamp holds it: a change (another framework version,
# HOROVOD_GPU_OPERATIONS set or unset, the system's packages) runs the install again, and
# Horovod's wheel, keyed by it too, is rebuilt or taken from its cache.
SETTINGS="torch=$TORCH_SPEC tf=$TF_SPEC gpu-ops=${HOROVOD_GPU_OPERATIONS:-cpu} system=${HVDLLM_SYSTEM_PACKAGES:-0}"
up_to_date() {
  [[ -f $STAMP && $STAMP -nt setup.cfg && $STAMP -nt scripts/bootstrap.sh && $STAMP -nt scripts/constraints.txt \
     && "$(cat "$STAMP")" == "$SETTINGS" ]]
}
if [[ ${1:-} == --check ]]; then   # exit 0 when nothing would be installed (tests, scripts)
  up_to_date && { echo "[bootstrap] up to date: $SETTINGS"; exit 0; }
  echo "[bootstrap] would install: $SETTINGS (stamp: $(cat "$STAMP" 2>/dev/null || echo none))"
  exit 1
fi
if up_to_date; then
  exit 0
fi
say() { echo "[bootstrap] $*"; }

# 1. MPI ------------------------------------------------------------------------------------
if ! command -v mpicc >/dev/null || ! command -v mpirun >/dev/null; then
  if command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
    say "no MPI on PATH: installing Debian's OpenMPI"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenmpi-dev openmpi-bin >/dev/null
  else
    echo "[bootstrap] error: no MPI found (mpicc/mpirun). Load one (e.g. 'module load openmpi')" \
         "or install libopenmpi-dev + openmpi-bin, then run again." >&2
    exit 1
  fi
fi

# 2. virtual environment ----------------------------------------------------------------------
if [[ ! -x $VENV/bin/python ]]; then
  say "creating $VENV"
  if [[ ${HVDLLM_SYSTEM_PACKAGES:-0} == 1 ]]; then
    python3 -m venv --system-site-packages "$VENV"
  else
    python3 -m venv "$VENV"
  fi
fi
PY=$VENV/bin/python
PIP="$PY -m pip --disable-pip-version-check -q"
# every install below takes the versions CI last passed with (scripts/constraints.txt)
export PIP_CONSTRAINT=$ROOT/scripts/constraints.txt
has() { "$PY" -c "import $1" 2>/dev/null; }
$PIP install --upgrade pip wheel 'setuptools<80' >/dev/null
has torch || { say "installing $TORCH_SPEC"; $PIP install "$TORCH_SPEC"; }
has tensorflow || { say "installing $TF_SPEC"; $PIP install "$TF_SPEC"; }
# mpi4py is compiled against the MPI found above (never a wheel bundling another MPI).
has mpi4py || { say "building mpi4py against $(command -v mpicc)"; $PIP install --no-binary mpi4py mpi4py; }
$PIP install numpy tokenizers matplotlib tqdm pytest pytest-timeout transformers safetensors pyarrow tensorboard 'cmake<4' packaging psutil cloudpickle pyyaml 'ruff==0.17.6'

# 3. Horovod --------------------------------------------------------------------------------------
versions=$("$PY" - <<'PY'
import sys, torch, tensorflow as tf
print(f"torch{torch.__version__.split('+')[0]}-tf{tf.__version__}-py{sys.version_info[0]}{sys.version_info[1]}")
PY
)
key="horovod${HOROVOD_VERSION}-${versions}-${HOROVOD_GPU_OPERATIONS:-cpu}"
WHEELDIR=$CACHE/wheels/$key
HOROVOD_BUILT=$VENV/.hvdllm-horovod   # the key of the Horovod wheel installed here
if ! "$PY" -c "import horovod, sys; sys.exit(horovod.__version__ != '$HOROVOD_VERSION')" 2>/dev/null \
   || ! "$PY" -c "import horovod.torch, horovod.tensorflow" 2>/dev/null \
   || [[ "$(cat "$HOROVOD_BUILT" 2>/dev/null)" != "$key" ]]; then
  if ! ls "$WHEELDIR"/horovod-*.whl >/dev/null 2>&1; then
    say "building Horovod $HOROVOD_VERSION for $key (takes 4-8 minutes once; cached in $WHEELDIR)"
    BUILD=$(mktemp -d)
    trap 'rm -rf "$BUILD"' EXIT
    $PIP download --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$BUILD"
    tar -xzf "$BUILD"/horovod-$HOROVOD_VERSION.tar.gz -C "$BUILD"
    SRC=$BUILD/horovod-$HOROVOD_VERSION
    # torch >= 2.1 needs C++17 (fixed upstream in PR #3998, never released).
    sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/' "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"
    # TF 2.21's wheel lacks the highwayhash headers xla_mpi_ops.cc includes.
    sed -i '/xla_mpi_ops.cc/d' "$SRC/horovod/tensorflow/CMakeLists.txt"
    # GCC 13 no longer pulls these in transitively.
    for h in horovod/common/group_table.h horovod/common/common.h; do
      sed -i '1i #include <string>\n#include <stdexcept>\n#include <cstdint>' "$SRC/$h"
    done
    export CMAKE_POLICY_VERSION_MINIMUM=3.5
    export PATH=$VENV/bin:$PATH
    # Gloo needs no MPI; CPU collectives run over MPI or Gloo. GPU: pass HOROVOD_GPU_OPERATIONS=NCCL.
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
    HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$(nproc)" \
      $PIP wheel --no-build-isolation --no-deps -w "$BUILD/dist" "$SRC"
    mkdir -p "$WHEELDIR"
    cp "$BUILD"/dist/horovod-*.whl "$WHEELDIR/.tmp.whl.part"
    mv "$WHEELDIR/.tmp.whl.part" "$WHEELDIR/$(basename "$BUILD"/dist/horovod-*.whl)"
  fi
  say "installing Horovod from $WHEELDIR"
  $PIP install --no-deps --force-reinstall "$WHEELDIR"/horovod-*.whl
  $PIP install cloudpickle psutil pyyaml packaging
  echo "$key" > "$HOROVOD_BUILT"
fi

# 4. hvdllm itself ----------------------------------------------------------------------------
$PIP install --no-deps --no-build-isolation -e "$ROOT" >/dev/null
"$PY" -c "import horovod.torch, horovod.tensorflow, mpi4py, torch, tensorflow" 2>/dev/null \
  || { echo "[bootstrap] error: the environment in $VENV does not import; see above" >&2; exit 1; }
echo "$SETTINGS" > "$STAMP"
say "environment ready in $(( $(date +%s) - t0 )) s: $VENV"
