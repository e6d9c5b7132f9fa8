#!/usr/bin/env bash
# scripts/gpu-check --dry-run: builds everything the GPU check runs and stops before the first
# GPU call. Lean: it reuses the debug build of scripts/test (default features, profile dev, so
# cargo rebuilds nothing) and skips the Python wheel (the python step builds and tests it).
set -euo pipefail
cd "$(dirname "$0")/../.."
MULO_GPU_CHECK_PROFILE=dev MULO_GPU_CHECK_DEFAULT_FEATURES=1 MULO_GPU_CHECK_WHEEL=0 \
    scripts/gpu-check --dry-run
