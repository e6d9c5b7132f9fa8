#!/usr/bin/env bash
# CUDA backend checks that need no GPU: install libnvrtc from the nvidia-cuda-nvrtc-cu12 wheel,
# compile every shape class for sm_80 and sm_90 and check the PTX against the manifest, and
# run `mulo-compile --target cuda`. The GPU tests run too; without a device they print why
# they skip.
set -euo pipefail
cd "$(dirname "$0")/../.."

python3 -m pip install --quiet nvidia-cuda-nvrtc-cu12
NVRTC_LIB="$(python3 -c 'import nvidia.cuda_nvrtc as m; print(m.__path__[0])')/lib"
if [ ! -e "$NVRTC_LIB/libnvrtc.so.12" ]; then
    echo "libnvrtc.so.12 not found in $NVRTC_LIB" >&2
    exit 1
fi
export LD_LIBRARY_PATH="$NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# A private cache, so the tests really run NVRTC.
export MULO_CACHE_DIR="$(mktemp -d)"
trap 'rm -rf "$MULO_CACHE_DIR"' EXIT

# With libnvrtc present these tests must not skip.
out="$(cargo test --test cuda_nvrtc -- --nocapture 2>&1)" || { echo "$out"; exit 1; }
echo "$out" | grep -E "sm_[0-9]+:|test result"
if echo "$out" | grep -q "SKIPPED"; then
    echo "cuda_nvrtc tests skipped although libnvrtc is installed" >&2
    exit 1
fi
cargo test --lib backend::cuda
# The generated kernels compiled for the CPU (g++, C++20) and checked against the golden
# trajectories and the interpreter: the kernels' semantics without a GPU.
cargo test --test cuda_emulated -- --nocapture --test-threads 1 2>&1 | grep -E "err|SKIPPED|test result|panicked"
cargo test --test cuda_gpu -- --nocapture 2>&1 | grep -E "SKIPPED|test result|error|panicked" | sort -u

dir="$(mktemp -d)"
cargo run --quiet --bin mulo-compile -- --shape 1024x512 --target cuda --arch sm_90 \
    --weights tests/fixtures/golden/weights -o "$dir"
for f in mulo_step.cu mulo_step.ptx mulo_step.json; do
    test -s "$dir/$f" || { echo "missing $dir/$f" >&2; exit 1; }
done
grep -q ".target sm_90" "$dir/mulo_step.ptx"
python3 - "$dir/mulo_step.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
assert m["format"] == "mulo-cuda-step" and m["shape"] == [1024, 512] and m["arch"] == "sm_90"
assert m["elem_passes"] == 3, m["elem_passes"]
print("manifest ok:", [k["name"] for k in m["kernels"]])
PY
rm -rf "$dir"
echo "cuda: ok"
