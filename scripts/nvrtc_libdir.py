"""Prints the lib folder of the nvidia-cuda-nvrtc-cu12 wheel (empty if not installed).

Run it with the project's virtual environment's Python (scripts/env.sh does), where
scripts/setup installed the wheel.
"""
import glob
import os
import sys

for base in sys.path:
    hits = glob.glob(os.path.join(base, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*"))
    if hits:
        print(os.path.dirname(hits[0]))
        break
