#!/usr/bin/env bash
# Installs what `cargo build --features cuda` needs, from NVIDIA's wheels on PyPI, into a
# cache folder outside the repository, and prints the environment to use:
#
#   eval "$(tools/gpu/setup-cuda.sh)" && cargo build --release -p flipsketch-cli --features cuda
#
# No GPU is needed to build. What it installs (CUDA 13.0, the cuda-toolkit 13.0.2 set): nvcc
# and its back end (nvvm, crt), the runtime and its headers, CCCL headers, cuBLAS, cuRAND and
# NVRTC, which candle's CUDA backend (cudarc) links. The CUDA 12 wheels are no use here:
# nvidia-cuda-nvcc-cu12 holds only ptxas and libnvvm, not the nvcc compiler driver; CUDA 13's
# nvidia-cuda-nvcc has it. The resulting binary needs an NVIDIA driver of the R580 series or
# newer (what CUDA 13 requires) at run time.
#
# The driver's libcuda.so is not on PyPI (it comes with the driver): a link stub is generated
# from the toolkit's cuda.h (every cu* name exported as an empty function, soname
# libcuda.so.1), as the toolkit's own lib/stubs/libcuda.so is; at run time the driver's real
# libcuda.so.1 is loaded instead.
#
# Compute capability: CUDA_COMPUTE_CAP (default 80). candle compiles its kernels to PTX for
# that one architecture; PTX for compute_80 is compiled by the driver for any newer GPU
# (A100 = 80, L4/L40 = 89, H100/H200 = 90), so 80 covers Ampere and later. Set
# CUDA_COMPUTE_CAP=90 to compile for Hopper only.
#
# Environment: FLIPSKETCH_CUDA_CACHE (default ~/.cache/flipsketch-cuda), PYTHON (default
# python3). Re-running reuses what is installed.
set -euo pipefail

cache="${FLIPSKETCH_CUDA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/flipsketch-cuda}"
python="${PYTHON:-python3}"
cap="${CUDA_COMPUTE_CAP:-80}"
packages=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85
    nvidia-cublas==13.1.0.3
    nvidia-curand==10.4.0.35
    nvidia-cuda-nvrtc==13.0.88
)
stamp_want="$(printf '%s\n' "${packages[@]}" | sha256sum | cut -c1-16)"
prefix="$cache/cuda-13.0-$stamp_want"
root="$prefix/nvidia/cu13"

log() { echo "setup-cuda: $*" >&2; }

if [ ! -f "$prefix/.complete" ]; then
    command -v "$python" >/dev/null || { log "error: $python not found"; exit 1; }
    command -v gcc >/dev/null || { log "error: gcc is needed (nvcc's host compiler)"; exit 1; }
    log "installing ${packages[*]} into $prefix"
    rm -rf "$prefix"
    mkdir -p "$prefix"
    "$python" -m pip install --quiet --disable-pip-version-check --no-deps \
        --target "$prefix" "${packages[@]}" >&2
    [ -x "$root/bin/nvcc" ] || { log "error: $root/bin/nvcc is missing after the install"; exit 1; }

    # Linker names (libcublas.so -> libcublas.so.13): the wheels ship only the versioned files.
    for lib in "$root"/lib/lib*.so.*; do
        base="${lib##*/}"
        dev="${base%%.so.*}.so"
        [ -e "$root/lib/$dev" ] || ln -s "$base" "$root/lib/$dev"
    done

    # A link stub for the driver library (see above).
    mkdir -p "$root/lib/stubs"
    grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$root/include/cuda.h" | sort -u |
        sed 's/.*/void &(void) {}/' > "$prefix/libcuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/stubs/libcuda.so" "$prefix/libcuda_stub.c"

    # nvcc finds its back end, headers and libraries relative to itself (nvcc.profile).
    "$root/bin/nvcc" --version >&2
    touch "$prefix/.complete"
fi

# What cargo and the build scripts read: cudarc takes the CUDA version from `nvcc --version`
# and searches CUDA_HOME/lib{,/stubs} for the libraries; candle's kernels are compiled by the
# nvcc on the PATH for CUDA_COMPUTE_CAP. FLIPSKETCH_CUDA_RPATH is written into the flipsketch
# binary (crates/cli/build.rs), so that it finds cuBLAS & co. in the cache at run time without
# LD_LIBRARY_PATH (the driver's libcuda comes from the system); LD_LIBRARY_PATH serves the
# test binaries.
cat <<EOF
export CUDA_HOME="$root"
export CUDA_PATH="$root"
export PATH="$root/bin:\$PATH"
export CUDA_COMPUTE_CAP="$cap"
export LD_LIBRARY_PATH="$root/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export FLIPSKETCH_CUDA_RPATH="$root/lib"
EOF
