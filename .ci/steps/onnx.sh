#!/usr/bin/env bash
# ONNX export checks (issue #3): the tract tests, then the exported graphs through onnxruntime.
# Run from the repository root; installs its own Python dependencies; fails on any error.
set -euo pipefail
cd "$(dirname "$0")/../.."

WEIGHTS=tests/fixtures/golden/weights
BIN=target/release/mulo-compile
[ -x "$BIN" ] || BIN=target/debug/mulo-compile

echo "== onnx: tract tests"
cargo test --test onnx_golden --test onnx_props

echo "== onnx: build mulo-compile and the reference-trajectory example"
cargo build --release --bin mulo-compile --example reference_trajectory
BIN=target/release/mulo-compile

echo "== onnx: python dependencies"
python3 -m pip install --quiet --disable-pip-version-check onnx onnxruntime numpy safetensors

echo "== onnx: golden replay through onnxruntime (full onnx.checker check)"
python3 scripts/onnxruntime_replay.py --mulo "$BIN" --weights "$WEIGHTS" tests/fixtures/golden/*.safetensors

echo "== onnx: large shapes and split means (f64 interpreter reference) through onnxruntime and tract"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
target/release/examples/reference_trajectory 1024x512 3 "$WEIGHTS" "$WORK/big_1024x512.safetensors"
target/release/examples/reference_trajectory 300007 2 "$WEIGHTS" "$WORK/vec_300007.safetensors"   # prime: padded mean
target/release/examples/reference_trajectory 131072 2 "$WEIGHTS" "$WORK/vec_131072.safetensors"   # long axis split 256x512
target/release/examples/reference_trajectory 2048x64 2 "$WEIGHTS" "$WORK/mat_2048x64.safetensors" # axis 0 > 1024 split
python3 scripts/onnxruntime_replay.py --mulo "$BIN" --weights "$WEIGHTS" "$WORK"/*.safetensors
"$BIN" replay --target onnx --weights "$WEIGHTS" "$WORK"/*.safetensors
"$BIN" replay --target onnx-chunked --weights "$WEIGHTS" "$WORK"/*.safetensors tests/fixtures/golden/*.safetensors

echo "== onnx: export 1024x512 with the default name"
(cd "$WORK" && "$OLDPWD/$BIN" --shape 1024x512 --target onnx --weights "$OLDPWD/$WEIGHTS" && test -s mulo_step.onnx)
