#!/usr/bin/env bash
# ONNX export checks (issue #3) beyond `cargo test` (which ran the tract tests): the exported
# graphs through onnxruntime, and large shapes through both runtimes. Uses the binaries
# `cargo test` built (target/debug, optimized); installs its own Python dependencies.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh  # the virtual environment of scripts/setup: python3 is its interpreter

WEIGHTS=tests/fixtures/golden/weights
BIN=target/debug/mulo-compile
REF=target/debug/examples/reference_trajectory
if [ ! -x "$BIN" ] || [ ! -x "$REF" ]; then
    # Not run after `cargo test`: build them the way `cargo test` does.
    cargo test --no-run --examples --bins
fi

echo "== onnx: python dependencies"
python3 -m pip install --quiet --disable-pip-version-check onnx onnxruntime numpy safetensors

echo "== onnx: golden replay through onnxruntime (full onnx.checker check)"
python3 scripts/onnxruntime_replay.py --mulo "$BIN" --weights "$WEIGHTS" tests/fixtures/golden/*.safetensors

echo "== onnx: large shapes and split means (f64 interpreter reference) through onnxruntime and tract"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$REF" 1024x512 3 "$WEIGHTS" "$WORK/big_1024x512.safetensors"
"$REF" 300007 2 "$WEIGHTS" "$WORK/vec_300007.safetensors"   # prime: padded mean
"$REF" 131072 2 "$WEIGHTS" "$WORK/vec_131072.safetensors"   # long axis split 256x512
"$REF" 2048x64 2 "$WEIGHTS" "$WORK/mat_2048x64.safetensors" # axis 0 > 1024 split
python3 scripts/onnxruntime_replay.py --mulo "$BIN" --weights "$WEIGHTS" "$WORK"/*.safetensors
"$BIN" replay --target onnx --weights "$WEIGHTS" "$WORK"/*.safetensors
"$BIN" replay --target onnx-chunked --weights "$WEIGHTS" "$WORK"/*.safetensors tests/fixtures/golden/*.safetensors

echo "== onnx: export 1024x512 with the default name"
(cd "$WORK" && "$OLDPWD/$BIN" --shape 1024x512 --target onnx --weights "$OLDPWD/$WEIGHTS" && test -s mulo_step.onnx)

echo "== onnx: examples/onnxruntime_step.py trains a numpy model through onnxruntime (loss must halve)"
python3 examples/onnxruntime_step.py --mulo "$BIN"
