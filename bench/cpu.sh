#!/usr/bin/env bash
# The native CPU backend's benchmark (issue #16), one command, Markdown on stdout:
#   bench/cpu.sh | tee bench/results/cpu-run.md
# `cargo bench --bench cpu` (FMA peak, the dense layers alone, whole steps on every instruction
# set, 1- vs all-thread scaling, GPT-2 small through MuloOptimizer), then the PyTorch reference
# step side by side with `mulo-compile bench --target cpu` in the same run. Needs torch, numpy
# and safetensors in the virtual environment (scripts/setup). The load average is printed with
# every figure: on a shared machine compare only numbers of one run.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
WEIGHTS=${MULO_BENCH_WEIGHTS:-tests/fixtures/golden/weights}
cargo build --quiet --release --bin mulo-compile
cargo bench --quiet --bench cpu
echo
echo "## Side by side with the PyTorch reference step (bench/pytorch_reference.py)"
echo
echo "date $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD), load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo '```'
python3 bench/pytorch_reference.py --weights "$WEIGHTS" --mulo target/release/mulo-compile \
    --shapes 1024x512 4096x1024 --steps 10 --warmup 3 --targets cpu --compile 2>&1
echo '```'
echo
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
