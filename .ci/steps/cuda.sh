#!/usr/bin/env bash
# End-to-end check of the CUDA target without a GPU: `mulo-compile --target cuda` writes the
# source, the PTX (through NVRTC from the nvidia-cuda-nvrtc-cu12 wheel installed by
# scripts/setup) and the manifest. The CUDA tests themselves ran in scripts/test: the NVRTC
# and emulated-kernel tests fail instead of skipping under CI=true, and the GPU tests print
# why they skip.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
# A private cache, so NVRTC really runs.
export MULO_CACHE_DIR="$(mktemp -d)"
dir="$(mktemp -d)"
trap 'rm -rf "$MULO_CACHE_DIR" "$dir"' EXIT

# The binary `cargo test` built (a separate `cargo run` would rebuild the dependencies).
target/debug/mulo-compile --shape 1024x512 --target cuda --arch sm_90 \
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
echo "cuda: ok"
