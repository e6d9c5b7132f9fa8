#!/usr/bin/env bash
# Compile-time benchmark of the CUDA target (no GPU needed): NVRTC time and PTX size for one
# shape and for a 12-shape packed model (GPT-2-small's nine distinct shapes plus three
# others), each from a cold disk cache and then cached. Writes a markdown table to stdout.
#
#   bench/cuda_compile_time.sh [ARCH] > bench/results/cuda-compile-time.md
#
# Needs target/debug/mulo-compile (cargo build --bin mulo-compile) and libnvrtc
# (scripts/setup; scripts/env.sh puts it on LD_LIBRARY_PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
arch="${1:-sm_90}"
bin=target/debug/mulo-compile
weights=tests/fixtures/golden/weights
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

gpt2=(50257x768 1024x768 768 768x2304 2304 768x768 768x3072 3072 3072x768)
others=(16x8x3x3 scalar 1x300)
packed_args=()
for s in "${gpt2[@]}" "${others[@]}"; do packed_args+=(--shape "$s"); done

# run NAME CACHE ARGS...: prints "NAME | seconds | PTX bytes"
run() {
    local name="$1" cache="$2"; shift 2
    local out="$work/out-$RANDOM"
    local t0 t1
    t0=$(date +%s.%N)
    MULO_CACHE_DIR="$cache" "$bin" --target cuda --arch "$arch" --weights "$weights" -o "$out" "$@" >"$work/log" 2>&1
    t1=$(date +%s.%N)
    local ptx
    ptx=$(cat "$out"/*.ptx | wc -c)
    # mulo-compile's own figure: the time to the PTX (IR, rendering, NVRTC or the cache).
    local own
    own=$(grep -o 'in [0-9.]*[a-zµ]*s$' "$work/log" | tail -1 | cut -c4-)
    echo "| $name | $own | $(printf '%.2f' "$(echo "$t1 - $t0" | bc)") s | $ptx |"
}

echo "# CUDA compile time (NVRTC, no GPU)"
echo
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), load average $(cut -d' ' -f1-3 /proc/loadavg) at start (a shared machine: other builds were running)"
echo "- NVRTC: $(python3 -c 'import importlib.metadata as m; print(m.version("nvidia-cuda-nvrtc-cu12"))' 2>/dev/null || echo unknown) (wheel nvidia-cuda-nvrtc-cu12), arch $arch"
echo "- command: \`bench/cuda_compile_time.sh $arch\` (mulo-compile --target cuda, debug build, fixture weights)"
echo "- packed model: ${gpt2[*]} ${others[*]}"
echo
echo "| case | mulo-compile's time to PTX | process wall time | PTX bytes |"
echo "|---|---|---|---|"
c1="$work/cache1"; c2="$work/cache2"
run "1024x512, cold cache" "$c1" --shape 1024x512
run "1024x512, cached" "$c1" --shape 1024x512
run "768x3072, cold cache" "$c1" --shape 768x3072
run "768, cold cache" "$c1" --shape 768
run "12-shape packed model, cold cache" "$c2" "${packed_args[@]}"
run "12-shape packed model, cached" "$c2" "${packed_args[@]}"
