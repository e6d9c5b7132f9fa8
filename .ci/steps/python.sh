#!/usr/bin/env bash
# The Python package's Rust layer (bindings/python, its own cargo workspace, so the root's
# `cargo fmt`/`clippy` do not see it): formatting and lints. Its tests ran in scripts/test.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo fmt --check --manifest-path bindings/python/Cargo.toml
CARGO_TARGET_DIR="$PWD/target" cargo clippy --release --manifest-path bindings/python/Cargo.toml -- -D warnings
echo "python bindings: fmt and clippy clean"
