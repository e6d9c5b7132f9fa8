#!/usr/bin/env bash
# Native CPU backend (issue #16): golden, property and whole-model tests on every instruction
# set path of the chunk loop, forced with MULO_CPU_ISA (`cargo test` ran them on the best one).
# A path this CPU cannot run is skipped with a message (the backend would fall back silently).
set -euo pipefail
cd "$(dirname "$0")/../.."
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
has() { for f in "$@"; do [[ " $flags " == *" $f "* ]] || return 1; done; }
for isa in avx512 avx2 portable; do
    case $isa in
        avx512) has avx512f avx2 fma || { echo "== cpu_isa: no AVX-512F here, $isa skipped"; continue; } ;;
        avx2) has avx2 fma || { echo "== cpu_isa: no AVX2+FMA here, $isa skipped"; continue; } ;;
    esac
    echo "== cpu_isa: MULO_CPU_ISA=$isa"
    MULO_CPU_ISA=$isa cargo test --quiet --test cpu_golden --test cpu_props
    MULO_CPU_ISA=$isa cargo test --quiet --test model_golden cpu
done
