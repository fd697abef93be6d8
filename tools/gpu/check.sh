#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU and its driver:
#
#   tools/gpu/check.sh [MODEL_DIR]
#
# 1. builds flipsketch with `--features cuda` (installing what that needs: Rust through rustup
#    when cargo is missing, the CUDA toolkit from PyPI through tools/gpu/setup-cuda.sh), for the
#    GPU's own compute capability;
# 2. runs the parity tests on cuda:0 (crates/pipeline/tests/device.rs: every module and the
#    whole pipeline against the diffusers references, f32 at 1e-4, bf16 within twice PyTorch's
#    own bf16 deviation);
# 3. times one UNet forward at the real shape (1 x 10 frames, 256 px) in f32 and bf16
#    (`flipsketch bench unet`, best of 3 after a warm-up);
# 4. runs one default `flipsketch animate` (3 variants, 10 frames, 25 steps) on the
#    real-shape model;
# and prints the figures on one summary line starting with "GPU CHECK:" (forward times, the
# whole run, the peak GPU memory of each part, sampled with nvidia-smi every 100 ms).
#
# MODEL_DIR: a model folder of the real shape (the real checkpoint, or random weights from
# tools/reference/make_fixtures.py --full-size); without it one is written with
# `flipsketch bench make-model` (random weights, about 7 GB, no download).
# Prebuilt binaries (an offline machine): FLIPSKETCH_BIN (a cuda build of flipsketch) and
# FLIPSKETCH_DEVICE_TESTS (the tests/device.rs binary built with --features cuda) skip step 1;
# the CUDA libraries must then be on the loader's path.
# FLIPSKETCH_CHECK_DEVICE (default cuda:0) is where steps 2-4 run; `cpu`, with prebuilt CPU
# binaries and a stand-in nvidia-smi, is a dry run of this script itself.
# Exit status: 0 when every part passed, 1 when one failed, 2 when there is no GPU.
set -uo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
work="$(mktemp -d "${TMPDIR:-/tmp}/flipsketch-gpu-check.XXXXXX")"
log() { echo "gpu-check: $*" >&2; }
fail=0
summary=()
dev="${FLIPSKETCH_CHECK_DEVICE:-cuda:0}"

# -- the GPU ---------------------------------------------------------------------------------
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    log "no NVIDIA GPU or driver here (nvidia-smi -L fails)"
    echo "GPU CHECK: skipped (no NVIDIA GPU)"
    exit 2
fi
gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 | head -1)"
driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader -i 0 | head -1)"
cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader -i 0 | head -1 | tr -d '.')"
log "GPU 0: $gpu, driver $driver, compute capability $cap"
summary+=("gpu=\"$gpu\"" "driver=$driver" "cc=$cap")

# Peak GPU memory (MiB above what was in use before) while a command runs.
peak_mib=0
with_memory() {
    local samples="$work/mem.$RANDOM"
    local base
    base="$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 | head -1)"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 100 >"$samples" 2>/dev/null &
    local sampler=$!
    "$@"
    local rc=$?
    kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
    local top
    top="$(sort -n "$samples" | tail -1)"
    peak_mib=$(( ${top:-$base} - base ))
    return $rc
}

# -- 1. build --------------------------------------------------------------------------------
bin="${FLIPSKETCH_BIN:-}"
tests="${FLIPSKETCH_DEVICE_TESTS:-}"
if [ -z "$bin" ] || [ -z "$tests" ]; then
    if ! command -v cargo >/dev/null; then
        if [ -x "$HOME/.cargo/bin/cargo" ]; then
            export PATH="$HOME/.cargo/bin:$PATH"
        else
            log "installing Rust (rustup, minimal profile)"
            curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal >&2 \
                || { log "error: cannot install Rust"; exit 1; }
            export PATH="$HOME/.cargo/bin:$PATH"
        fi
    fi
    eval "$(CUDA_COMPUTE_CAP="$cap" tools/gpu/setup-cuda.sh)" || { log "error: setup-cuda.sh failed"; exit 1; }
    t0=$(date +%s)
    log "building flipsketch with --features cuda (compute capability $CUDA_COMPUTE_CAP)"
    cargo build --release --locked -p flipsketch-cli --features cuda >&2 || { log "error: the build failed"; exit 1; }
    bin="$root/target/release/flipsketch"
    tests="$(cargo test --release --locked -p flipsketch-pipeline --features cuda --test device --no-run \
        --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "device":
        print(m["executable"])')"
    [ -x "$tests" ] || { log "error: the device tests did not build"; exit 1; }
    summary+=("build_s=$(( $(date +%s) - t0 ))")
fi
[ -x "$bin" ] || { log "error: $bin is not an executable"; exit 1; }

# -- 2. parity on cuda:0 -----------------------------------------------------------------------
log "parity tests on $dev"
if with_memory env FLIPSKETCH_TEST_DEVICE="$dev" "$tests" --test-threads 1 --nocapture >"$work/parity.log" 2>&1 \
    && ! grep -q SKIPPED "$work/parity.log"; then
    summary+=("parity=pass" "parity_peak_gpu_mib=$peak_mib")
else
    fail=1
    summary+=("parity=FAIL")
fi
grep -E "tolerance|SKIPPED|panicked|test result" "$work/parity.log" >&2

# -- 3. UNet forward ---------------------------------------------------------------------------
model="${1:-}"
if [ -z "$model" ]; then
    model="$work/real-shape"
    log "writing a real-shape random-weight model into $model"
    "$bin" bench make-model "$model" >&2 || { log "error: make-model failed"; exit 1; }
fi
for dtype in f32 bf16; do
    log "bench unet --dtype $dtype"
    if with_memory "$bin" bench unet --model "$model" --device "$dev" --dtype "$dtype" >"$work/unet-$dtype.log" 2>&1; then
        s="$(awk '/^unet_forward_s/ {print $2}' "$work/unet-$dtype.log")"
        summary+=("unet_fwd_${dtype}_s=$s" "unet_${dtype}_peak_gpu_mib=$peak_mib")
    else
        fail=1
        summary+=("unet_${dtype}=FAIL")
    fi
    cat "$work/unet-$dtype.log" >&2
done

# -- 4. one default animate ----------------------------------------------------------------------
log "animate at the defaults"
if with_memory "$bin" animate --sketch examples/cat.png --prompt "the cat stretches and yawns" \
    --model "$model" --device "$dev" --out "$work/animate" --quiet >"$work/animate.log" 2>&1; then
    read -r total dtype < <(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
print("%.1f" % r["timings_s"]["total"], r["dtype"])' "$work/animate/result.json")
    [ -n "${total:-}" ] || { fail=1; log "error: no timings in result.json"; }
    summary+=("animate_default_s=$total" "animate_dtype=$dtype" "animate_peak_gpu_mib=$peak_mib")
else
    fail=1
    summary+=("animate=FAIL")
    cat "$work/animate.log" >&2
fi

echo "GPU CHECK: ${summary[*]}"
[ -z "${KEEP:-}" ] && rm -rf "$work"
exit $fail
