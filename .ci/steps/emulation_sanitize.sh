#!/usr/bin/env bash
# The emulated CUDA programs of each kernel kind (one tensor's `mulo_step.cu`, a packed whole
# model's and a rank's staged `mulo_model.cu`) built with AddressSanitizer and
# UndefinedBehaviorSanitizer, then with ThreadSanitizer, and run on small cases: the first
# report of either fails the step (an out-of-bounds index, undefined behaviour, or a data race:
# a missing __syncthreads). docs/cuda.md, "The emulation". One small test per kind and
# sanitizer, since the sanitized programs run several times slower than the plain ones that
# scripts/test ran already.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
export CI=true
run() {
    # `cargo test` built these binaries in scripts/test; --exact: that test alone.
    timeout 900 cargo test -q --test "$1" -- --exact "$2"
}
for sanitize in address,undefined thread; do
    echo "--- MULO_EMU_SANITIZE=$sanitize"
    export MULO_EMU_SANITIZE="$sanitize"
    run cuda_emulated emulated_chunked_means_match_the_interpreter
    run cuda_packed_emulated pointer_mode_is_bitwise_the_arena_mode
    run cuda_staged_emulated staged_program_on_two_ranks_is_the_unsharded_step
done
echo "emulation_sanitize: ok"
