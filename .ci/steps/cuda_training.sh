#!/usr/bin/env bash
# The whole-model CUDA examples without a GPU: `examples/cuda_jit.rs` compiles its training
# kernels and the packed μLO program with NVRTC and says why it cannot train;
# `examples/pytorch_ptx.py` (no torch, no CuPy here) compiles the same model's packed program
# through `mulo-compile --target cuda --packed`, checks the PTX entries against the manifest
# and builds one step's launch table. Both use one private NVRTC cache: the second finds the
# program the first compiled (same model, same weights).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
export MULO_CACHE_DIR="$(mktemp -d)"
dir="$(mktemp -d)"
trap 'rm -rf "$MULO_CACHE_DIR" "$dir"' EXIT

# Binaries `cargo test` built (a separate `cargo run` would rebuild the dependencies).
out="$(target/debug/examples/cuda_jit)"
echo "$out"
# The packed program's launch count comes from its schedule (3 element passes and the small
# kernels between them); both examples compile the same model, so they must agree on it.
launches="$(sed -n 's/.*compiled the training kernels and the packed μLO step (\([0-9]*\) launches per step.*/\1/p' <<<"$out")"
test -n "$launches"
grep -q "SKIPPED training on the GPU" <<<"$out"

out="$(python3 examples/pytorch_ptx.py --dry-run --mulo target/debug/mulo-compile --model-dir "$dir/model")"
echo "$out"
test -s "$dir/model/mulo_model.ptx"
grep -q "dry run: 4 tensors, $launches launches per step" <<<"$out"
echo "cuda training examples (no GPU): ok ($launches launches per step in both)"
