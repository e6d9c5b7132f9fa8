#!/usr/bin/env bash
# The Python package's types (issue 24): mypy over bindings/python/python (the package and the
# `_native.pyi` stubs of its compiled layer) must be clean; then mypy's stubtest checks those
# stubs against the compiled module scripts/test installed (the current build), so that a
# changed Rust signature cannot leave the stubs behind.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
python3 -m mypy bindings/python/python
python3 -m mypy.stubtest mulo._native
echo "python types: mypy and stubtest clean"
