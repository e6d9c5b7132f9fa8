#!/usr/bin/env bash
# End-to-end check of the CUDA target without a GPU: `mulo-compile --target cuda --cubin` writes
# the source, the PTX (through NVRTC from the nvidia-cuda-nvrtc-cu12 wheel installed by
# scripts/setup), the manifest, and the CUBIN the runtime would load. The CUDA tests themselves ran in scripts/test: the NVRTC
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
target/debug/mulo-compile --shape 1024x512 --target cuda --arch sm_90 --cubin \
    --weights tests/fixtures/golden/weights -o "$dir"
for f in mulo_step.cu mulo_step.ptx mulo_step.json mulo_step.cubin; do
    test -s "$dir/$f" || { echo "missing $dir/$f" >&2; exit 1; }
done
grep -q ".target sm_90" "$dir/mulo_step.ptx"
# The CUBIN is a CUDA ELF image (EM_CUDA = 190) holding every kernel of the manifest.
python3 - "$dir/mulo_step.cubin" "$dir/mulo_step.json" <<'PY'
import json, struct, sys
b = open(sys.argv[1], "rb").read()
assert b[:4] == b"\x7fELF" and struct.unpack_from("<H", b, 18)[0] == 190, "not a CUDA ELF image"
for k in json.load(open(sys.argv[2]))["kernels"]:
    assert b"\0" + k["name"].encode() + b"\0" in b, f"kernel {k['name']} not in the CUBIN"
print("cubin ok:", len(b), "bytes")
PY
python3 - "$dir/mulo_step.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
assert m["format"] == "mulo-cuda-step" and m["shape"] == [1024, 512] and m["arch"] == "sm_90"
assert m["elem_passes"] == 3, m["elem_passes"]
print("manifest ok:", [k["name"] for k in m["kernels"]])
PY
echo "cuda: ok"
