#!/usr/bin/env bash
# One UNet3D forward and one VAE frame decode, flipsketch vs PyTorch/diffusers, on the same
# machine in one run.
#
#   tools/bench/compare_unet.sh MODEL_DIR [PYTHON] [REPS]
#
# MODEL_DIR: a diffusers folder with unet/ (the real checkpoint, or the random full-size model
# from `python tools/reference/make_fixtures.py --full-size DIR`). PYTHON: an interpreter with
# tools/reference/requirements.txt installed (default: python3). Batch 1, 10 frames, 32x32
# latents (256 px); best of REPS after a warm-up, f32 then bf16; prints both times and the ratio.
# Then the VAE decode of one 256 px frame (`animate` decodes frame by frame), both precisions.
set -euo pipefail
model=${1:?usage: compare_unet.sh MODEL_DIR [PYTHON] [REPS]}
py=${2:-python3}
reps=${3:-2}
here=$(cd "$(dirname "$0")/../.." && pwd)
cargo build --release -q -p flipsketch-cli --manifest-path "$here/Cargo.toml"
bin="$here/target/release/flipsketch"
value() { awk -v k="$1" '$1 == k { print $2 }'; }
# PyTorch's bf16 on a CPU without AVX512-BF16 is emulated (1349 s per UNet forward measured on
# an AVX2-only EPYC): compare f32 only there, unless BENCH_BF16=1.
pairs="f32:float32 bf16:bfloat16"
if ! grep -qw avx512_bf16 /proc/cpuinfo 2>/dev/null && [ "${BENCH_BF16:-0}" != 1 ]; then
    pairs="f32:float32"
    echo "no AVX512-BF16 on this CPU: f32 only (BENCH_BF16=1 runs bf16 too)" >&2
fi
printf '%-11s %12s %12s %8s %14s %14s\n' part flipsketch_s pytorch_s ratio ours_peak_MiB torch_peak_GB
for pair in $pairs; do
    ours=$("$bin" bench unet --model "$model" --frames 10 --batch 1 --dtype "${pair%%:*}" --reps "$reps")
    theirs=$("$py" "$here/tools/reference/bench_unet.py" --model "$model" --dtype "${pair##*:}" --reps "$reps")
    a=$(value unet_forward_s <<<"$ours")
    b=$(value unet_forward_s <<<"$theirs")
    printf '%-11s %12s %12s %8.2f %14s %14s\n' "unet ${pair%%:*}" "$a" "$b" "$(awk -v a="$a" -v b="$b" 'BEGIN { print a / b }')" \
        "$(value peak_memory_mib <<<"$ours")" "$(value peak_rss_gb <<<"$theirs")"
done
for pair in $pairs; do
    ours=$("$bin" bench vae --model "$model" --dtype "${pair%%:*}" --reps "$reps")
    theirs=$("$py" "$here/tools/reference/bench_vae.py" --model "$model" --dtype "${pair##*:}" --reps "$reps")
    a=$(value vae_decode_s <<<"$ours")
    b=$(value vae_decode_s <<<"$theirs")
    printf '%-11s %12s %12s %8.2f %14s %14s\n' "vae ${pair%%:*}" "$a" "$b" "$(awk -v a="$a" -v b="$b" 'BEGIN { print a / b }')" \
        "$(value peak_memory_mib <<<"$ours")" "$(value peak_rss_gb <<<"$theirs")"
done
