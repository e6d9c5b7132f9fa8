#!/usr/bin/env python3
"""Cost of the Python layer of ``mulo.torch``: a whole model's ``opt.step()`` against the same
step made through the Rust API (``MuloOptimizer::step_partial`` on the same buffers, timed
inside Rust by the same compiled library), and against the project's PyTorch reference step
(``bench/pytorch_reference.py``: PyLO ``AdafacLO_naive``'s structure, one tensor after another).

    .venv/bin/python bench/torch_overhead.py --layers 60 --width 128 --steps 20

The model is ``--layers`` Linear layers (weight ``width x width`` and bias): 2·layers tensors.
Prints one JSON object per measurement and the overhead of the Python layer: the median of the
paired differences (python - rust) of steps taken alternately, over the Rust median.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_reference import NaiveStep, load_mlp  # noqa: E402

from mulo.torch import AdafacLO  # noqa: E402


def model(layers, width):
    torch.manual_seed(0)
    params = []
    for _ in range(layers):
        params.append(torch.nn.Parameter(torch.randn(width, width) * 0.05))
        params.append(torch.nn.Parameter(torch.randn(width) * 0.05))
    for p in params:
        p.grad = torch.randn(p.shape) * 1e-2
    return params


def measure(params, args):
    """Medians of the Python step, the Rust step, and of their paired differences (seconds).

    The two alternate step by step, so that the load of a shared machine hits both alike.
    """
    opt = AdafacLO(params, lr=1e-3, hf_key=args.weights)
    for _ in range(args.warmup):
        opt.step()
    rt = opt._rt[0]
    group = opt.param_groups[0]
    ptrs, grads = opt._check(0, group, rt.names)  # the flat [address, length, ...] lists
    rt.native.bench_steps(ptrs, grads, 1e-3, 0.0, args.warmup)
    py_times, rust_times, diffs = [], [], []
    for _ in range(args.rounds * args.steps):
        t0 = time.perf_counter()
        opt.step()
        py_times.append(time.perf_counter() - t0)
        rust_times += rt.native.bench_steps(ptrs, grads, float(group["lr"]), 0.0, 1)
        diffs.append(py_times[-1] - rust_times[-1])
    measure.minima = (min(py_times), min(rust_times))
    return statistics.median(py_times), statistics.median(rust_times), statistics.median(diffs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per path and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--weights", default="tests/fixtures/golden/weights")
    ap.add_argument("--reference-steps", type=int, default=2, help="steps of the PyTorch reference (slow)")
    args = ap.parse_args()

    params = model(args.layers, args.width)
    numel = sum(p.numel() for p in params)
    py, rust, diff = measure(params, args)
    py_min, rust_min = measure.minima
    common = {"tensors": len(params), "elements": numel, "threads": torch.get_num_threads()}
    print(json.dumps({"path": "mulo.torch AdafacLO.step", "median_s": py, "min_s": py_min, "ns_per_element": py / numel * 1e9, **common}))
    print(json.dumps({"path": "Rust MuloOptimizer::step_partial", "median_s": rust, "min_s": rust_min, "ns_per_element": rust / numel * 1e9, **common}))
    # The Python layer's cost does not depend on the tensors' sizes (checks and addresses per
    # tensor): measured again on the same number of 4x4 tensors, where the step itself is short
    # and a loaded machine adds little noise to the difference.
    tiny = model(args.layers, 4)
    tpy, trust, tdiff = measure(tiny, args)
    print(json.dumps({"path": "python layer alone (same tensor count, 4x4)", "median_diff_s": tdiff, "median_py_s": tpy, "median_rust_s": trust, "tensors": len(tiny)}))

    mlp = load_mlp(args.weights)
    states = [NaiveStep(tuple(p.shape), mlp) for p in params]
    ref_times = []
    with torch.no_grad():
        data = [p.detach().clone() for p in params]
        for _ in range(args.reference_steps):
            t0 = time.perf_counter()
            for s, d, p in zip(states, data, params):
                s.step(d, p.grad, 1e-3, 0.0)
            ref_times.append(time.perf_counter() - t0)
    ref = statistics.median(ref_times)
    print(json.dumps({"path": "PyTorch reference (bench/pytorch_reference.py)", "median_s": ref, "ns_per_element": ref / numel * 1e9, "torch": torch.__version__, **common}))
    print(
        f"model: {len(params)} tensors, {numel} elements; python layer overhead {diff / rust * 100:+.2f}% "
        f"(median paired difference {diff * 1e6:.0f} us per step; medians {py * 1e3:.2f} ms vs "
        f"{rust * 1e3:.2f} ms; fastest steps {py_min * 1e3:.2f} vs {rust_min * 1e3:.2f} ms, "
        f"{(py_min - rust_min) / rust_min * 100:+.2f}%); python layer alone {tdiff * 1e6:.0f} us per step = "
        f"{tdiff / rust * 100:.2f}% of the Rust step; speed-up over the PyTorch reference {ref / py:.1f}x; "
        f"machine {platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}"
    )


if __name__ == "__main__":
    main()
