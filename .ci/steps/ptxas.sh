#!/usr/bin/env bash
# Register and spill guard of the generated CUDA, without a GPU, for sm_80 and sm_90. Fails on
# any spill or stack frame in an element kernel (or a device function of one), or an update
# kernel above 128 registers, and on any kernel that could not be launched with the block size
# of its manifest: registers (allocated in units of 8 per thread, over whole warps) × threads
# above the 65,536 of a block, or static shared memory above 48 KiB (the same rule as
# `mulo::backend::cuda::loader::check_launch_resources`, which `examples/cuda_jit.rs` applies to
# its own kernels in `.ci/steps/cuda_training.sh`). Prints the resource table
# (bench/results/ptxas-resources.md is this table as committed).
# - Every shape class, a packed model and a rank's staged program of it: ptxas's report (`-v`) of the CUBIN the runtime
#   loads (NVRTC with the runtime's options, its own ptxas: `mulo-compile --cubin
#   --ptxas-report`).
# - The packed model's portable PTX too: `ptxas -v` (from the PyPI wheel nvidia-cuda-nvcc-cu12,
#   pinned) on it (`packed_ptx` rows; the runtime's CUBIN is the `packed` rows).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
python3 -m pip install --quiet --disable-pip-version-check "nvidia-cuda-nvcc-cu12==12.9.86"
ptxas="$(python3 -c 'import nvidia.cuda_nvcc as m, os; print(os.path.join(m.__path__[0], "bin", "ptxas"))')"
export MULO_CACHE_DIR="${MULO_CACHE_DIR:-$(mktemp -d)}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
bin=target/debug/mulo-compile
weights=tests/fixtures/golden/weights

# Shape classes (as tests/cuda_nvrtc.rs): 1-d, one element, 0-d, tall, wide, square, a
# dimension of 1, rank 4; and a packed model of several of them.
shapes=(37 1 scalar 4096x64 64x4096 48x48 1x300 16x8x3x3)
for arch in sm_80 sm_90; do
    for s in "${shapes[@]}"; do
        "$bin" --shape "$s" --target cuda --arch "$arch" --weights "$weights" -o "$work/$s-$arch" \
            --cubin --ptxas-report >"$work/$s-$arch.log" 2>/dev/null
    done
    "$bin" --target cuda --arch "$arch" --weights "$weights" -o "$work/packed-$arch" \
        --shape 64x32 --shape 37 --shape 16x8x3x3 --shape scalar --shape 1x300 \
        --cubin --ptxas-report >"$work/packed-$arch.log" 2>/dev/null
    # One rank's staged program of the same model (rows of axis 0 split: docs/cuda.md).
    "$bin" --target cuda --arch "$arch" --weights "$weights" -o "$work/staged-$arch" \
        --shape 64x32 --shape 37 --shape 16x8x3x3 --shape scalar --shape 1x300 \
        --shard-rows 32,19,8,whole,0 --cubin --ptxas-report >"$work/staged-$arch.log" 2>/dev/null
    "$ptxas" -v --gpu-name "$arch" -o /dev/null "$work/packed-$arch/mulo_model.ptx" 2>"$work/packed_ptx-$arch.log"
done

echo "| program | arch | function | registers | spill stores (B) | spill loads (B) | stack frame (B) |"
echo "|---|---|---|---|---|---|---|"
fail=0
for report in "$work"/*.log; do
    name="$(basename "$report" .log)"
    arch="${name##*-}"
    prog="${name%-*}"
    if ! grep -q "Used [0-9]* registers" "$report"; then
        echo "FAIL: $prog/$arch: no ptxas report" >&2
        fail=1
        continue
    fi
    case "$prog" in
        packed | packed_ptx) manifest="$work/packed-$arch/mulo_model.json" ;;
        staged) manifest="$work/staged-$arch/mulo_model.json" ;;
        *) manifest="$work/$prog-$arch/mulo_step.json" ;;
    esac
    python3 - "$report" "$prog" "$arch" "$manifest" <<'PY' || fail=1
import json, math, re, sys
log, prog, arch, manifest = sys.argv[1:]
func = None
frames = {}
bad = []
# Threads per block of every launch: the packed program's block_threads, or each kernel's
# block of a single-tensor manifest.
m = json.load(open(manifest))
if "block_threads" in m:
    threads = {None: m["block_threads"]}
else:
    threads = {k["name"]: math.prod(k["block"]) for k in m["kernels"]}
    threads[None] = max(threads.values())
for line in open(log):
    m = re.search(r"Compiling entry function '(\w+)'|Function properties for (\w+)", line)
    if m:
        func = m.group(1) or m.group(2)
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and func:
        frames[func] = tuple(map(int, m.groups()))
    m = re.search(r"Used (\d+) registers", line)
    if m and func:
        regs = int(m.group(1))
        block = threads.get(func, threads[None])
        allocated = math.ceil(regs / 8) * 8 * 32 * math.ceil(block / 32)
        if allocated > 65536:
            bad.append(f"{prog}/{arch}: {func} uses {regs} registers: {allocated} for a block of {block} threads (> 65536)")
        smem = re.search(r"(\d+) bytes smem", line)
        if smem and int(smem.group(1)) > 48 * 1024:
            bad.append(f"{prog}/{arch}: {func} declares {smem.group(1)} bytes of shared memory (> 49152)")
        frame, stores, loads = frames.get(func, (0, 0, 0))
        print(f"| {prog} | {arch} | {func} | {regs} | {stores} | {loads} | {frame} |")
        if "elem_" in func and (stores or loads or frame):
            bad.append(f"{prog}/{arch}: {func} spills or has a stack frame ({stores} B stores, {loads} B loads, {frame} B frame)")
        if func.endswith("_update") and regs > 128:
            bad.append(f"{prog}/{arch}: {func} uses {regs} registers (> 128)")
# Device functions (the packed program's per-plan kernels, helpers) report no registers of
# their own, but their spills and frames count for the element kernels that call them.
for f, (frame, stores, loads) in frames.items():
    if "elem_" in f and (stores or loads or frame):
        bad.append(f"{prog}/{arch}: device function {f} spills or has a stack frame")
for b in bad:
    print("FAIL:", b, file=sys.stderr)
sys.exit(1 if bad else 0)
PY
done
if [ "$fail" != 0 ]; then
    echo "ptxas: resource limits exceeded (see FAIL lines above)" >&2
    exit 1
fi
echo "ptxas: ok"
