#!/usr/bin/env bash
# Compile-time benchmark of the CUDA target (no GPU needed), for one shape and for a 12-shape
# packed model (GPT-2-small's nine distinct shapes plus three others), each from a cold disk
# cache and then cached, and for one rank's staged program of that model (--shard-rows). For each case, `mulo-compile --target cuda --cubin`:
#   - compiles the portable PTX (`--target cuda`'s output; NVRTC for compute_XY, no ptxas; at
#     full optimization with --split-compile=0);
#   - compiles the CUBIN the runtime loads (NVRTC for sm_XY, which runs ptxas itself; at
#     --Ofast-compile=min for one tensor, full optimization with --split-compile=0 for a
#     packed model: nvrtc::Level), with
#     NVRTC's own `--time` report splitting its time into the C++ front end, NVVM (to PTX) and
#     ptxas ("PTX Translation").
# Then the portable PTX's size per shape (the #12.1 target: at most 100 KB each).
# Writes a markdown report to stdout (bench/results/cuda-compile-time.md is one).
#
#   bench/cuda_compile_time.sh [ARCH] > bench/results/cuda-compile-time.md
#
# Needs target/debug/mulo-compile or target/release/mulo-compile (MULO_COMPILE=path picks
# one) and libnvrtc (scripts/setup; scripts/env.sh puts it on LD_LIBRARY_PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
arch="${1:-sm_90}"
bin="${MULO_COMPILE:-target/debug/mulo-compile}"
[ -x "$bin" ] || { echo "$bin is missing: cargo build --bin mulo-compile" >&2; exit 1; }
weights=tests/fixtures/golden/weights
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

gpt2=(50257x768 1024x768 768 768x2304 2304 768x768 768x3072 3072 3072x768)
others=(16x8x3x3 scalar 1x300)
packed_args=()
for s in "${gpt2[@]}" "${others[@]}"; do packed_args+=(--shape "$s"); done
# Rank 0's staged program of the same model over 8 ranks (torch.chunk's rows of axis 0: 50257
# rows give 6283 per rank; the 0-d tensor whole).
staged_args=("${packed_args[@]}" --shard-rows 6283,128,96,96,288,96,96,384,384,2,whole,1)

# run NAME CACHE ARGS...: one table row.
run() {
    local name="$1" cache="$2"; shift 2
    local out="$work/out-$RANDOM"
    local t0 t1
    t0=$(date +%s.%N)
    MULO_CACHE_DIR="$cache" "$bin" --target cuda --cubin --arch "$arch" --weights "$weights" \
        -o "$out" "$@" >"$work/log" 2>&1 || { cat "$work/log" >&2; exit 1; }
    t1=$(date +%s.%N)
    local ptx cubin own line
    ptx=$(cat "$out"/*.ptx | wc -c)
    cubin=$(cat "$out"/*.cubin | wc -c)
    # mulo-compile's time to the PTX (IR, rendering, NVRTC or the cache): "... in 2.8s".
    own=$(grep -v '^cubin:' "$work/log" | grep -o 'in [0-9.]*[a-zµ]*s$' | tail -1 | cut -c4-)
    # "cubin: N bytes for sm_90; compiled in T ms; NVRTC front end F ms, NVVM V ms, ptxas P ms"
    line=$(grep '^cubin:' "$work/log")
    local how total front nvvm ptxas
    how=$(echo "$line" | grep -o 'from the cache\|compiled')
    total=$(echo "$line" | sed -E 's/.*; (compiled|from the cache) in ([0-9.]+) ms.*/\2/')
    front=$(echo "$line" | sed -E 's/.*front end ([0-9-]+) ms.*/\1/')
    nvvm=$(echo "$line" | sed -E 's/.*NVVM ([0-9-]+) ms.*/\1/')
    ptxas=$(echo "$line" | sed -E 's/.*ptxas ([0-9-]+) ms.*/\1/')
    echo "| $name | $own | $how | $front | $nvvm | $ptxas | $total ms | $(printf '%.2f' "$(echo "$t1 - $t0" | bc)") s | $ptx | $cubin |"
}

nvrtc_version=$(python3 -c 'import importlib.metadata as m; print(m.version("nvidia-cuda-nvrtc-cu12"))' 2>/dev/null || echo unknown)
echo "# CUDA compile time: NVRTC and ptxas (no GPU)"
echo
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), load average $(cut -d' ' -f1-3 /proc/loadavg) at start"
echo "- NVRTC: $nvrtc_version (wheel nvidia-cuda-nvrtc-cu12), arch $arch"
echo "- command: \`${MULO_COMPILE:+MULO_COMPILE=$bin }bench/cuda_compile_time.sh $arch\` (\`mulo-compile --target cuda --cubin\`, $(basename "$(dirname "$bin")") build, fixture weights)"
echo "- packed model: ${gpt2[*]} ${others[*]}; staged program: ${staged_args[*]: -1}"
echo
echo "Columns: the time to the portable PTX (mulo-compile's own figure: IR, rendering, NVRTC for"
echo "compute_XY or the cache); then the CUBIN for $arch the runtime loads, compiled (or read"
echo "from the cache) by a second NVRTC call whose own \`--time\` report gives its C++ front end,"
echo "NVVM (optimizer and PTX generation) and ptxas (\"PTX Translation\") in ms, and the whole"
echo "call's time to the CUBIN (rendering excluded); the process's wall time (both compiles,"
echo "weights, IR); the sizes."
echo
echo "| case | time to PTX | CUBIN | NVRTC front end (ms) | NVVM (ms) | ptxas (ms) | time to CUBIN | process wall | PTX bytes | CUBIN bytes |"
echo "|---|---|---|---|---|---|---|---|---|---|"
c1="$work/cache1"; c2="$work/cache2"
run "1024x512, cold cache" "$c1" --shape 1024x512
run "1024x512, cached" "$c1" --shape 1024x512
run "768x3072, cold cache" "$c1" --shape 768x3072
run "768, cold cache" "$c1" --shape 768
run "12-shape packed model, cold cache" "$c2" "${packed_args[@]}"
run "12-shape packed model, cached" "$c2" "${packed_args[@]}"
c3="$work/cache3"
run "12-shape staged program (rank 0 of 8), cold cache" "$c3" "${staged_args[@]}"
echo
echo "Portable PTX per shape for $arch (bytes; \`mulo-compile --target cuda\`):"
echo
echo "| shape | PTX bytes | kernels |"
echo "|---|---|---|"
for s in 50257x768 4096x1024 768x3072 3072x768 1024x512 768x768 16x8x3x3 1x300 3072 768 37 scalar; do
    out="$work/ptx-$s"
    MULO_CACHE_DIR="$c1" "$bin" --target cuda --arch "$arch" --weights "$weights" -o "$out" \
        --shape "$s" >"$work/log" 2>&1 || { cat "$work/log" >&2; exit 1; }
    kernels=$(grep -c '^\.visible \.entry' "$out/mulo_step.ptx")
    echo "| $s | $(wc -c <"$out/mulo_step.ptx") | $kernels |"
done
echo
echo "Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
