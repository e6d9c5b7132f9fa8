#!/usr/bin/env bash
# The PyTorch package beyond its tests (which scripts/test ran): the model card's example,
# examples/torch_digits.py, trains an MLP on scikit-learn's bundled digits with mulo.torch.MuLO
# (the demo weights here: btherien/mulo is not cached on CI) and must reach 90% test accuracy,
# in float32 and with the model, its gradients and activations in bfloat16 (mulo's state f32).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
python3 examples/torch_digits.py --require 0.9
python3 examples/torch_digits.py --require 0.9 --dtype bfloat16
