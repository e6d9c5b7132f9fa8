#!/usr/bin/env python3
"""Side-by-side speed comparison: a naive PyTorch μLO_M step vs `mulo-compile bench` (cpu and onnx targets).

The PyTorch step is our own re-implementation of SPEC.md with the structure of PyLO's
`AdafacLO_naive` (the reference the issue quotes): every feature is materialized as a
`[*S, k]` tensor, the 28 features are concatenated into `[*S, 28]`, normalized with a mean over
the tensor's axes, the 11 time features are repeated to `[*S, 11]` and concatenated, and the
meta-network runs as `nn.Linear` layers on `[*S, 39]`, in f32 on the CPU. It is checked against
a golden trajectory before it is timed (`--check`).

    pip install torch numpy safetensors
    python3 bench/pytorch_reference.py --weights tests/fixtures/golden/weights \
        --mulo target/release/mulo-compile --shapes 1024x512 4096x1024 --steps 10

With `--compile`, the same step compiled by `torch.compile` (inductor, C++ on the CPU) is timed
too, as target `pytorch-compile`; its compilation happens in the warm-up steps, which are not
timed.

Prints one JSON line per (shape, target) and, per shape and mulo target (`cpu`: the native
chunk programs on every core; `onnx`: the exported graph in tract; `onnx-chunked`: statistics +
per-chunk graphs on 2 threads), the speed-up over the PyTorch step.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from safetensors.numpy import load_file

MOMENTUM = (0.542027295, 0.958441377, 0.99802357)
RMS = 0.998885989
ADAFACTOR = (0.356218159, 0.9966259, 0.999461293)
PERIODS = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)
EXP_MULT, STEP_MULT = 0.001, 0.01


def load_mlp(weights_dir):
    cfg = json.load(open(os.path.join(weights_dir, "config.json")))
    w = load_file(os.path.join(weights_dir, "model.safetensors"))
    names = ["network.input"] + [f"network.linear_{k}" for k in range(cfg["hidden_layers"])] + ["network.output"]
    layers = []
    for i, name in enumerate(names):
        weight = torch.from_numpy(w[f"{name}.weight"].copy())
        lin = torch.nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            lin.weight.copy_(weight)
            lin.bias.copy_(torch.from_numpy(w[f"{name}.bias"].copy()))
        layers.append(lin)
        if i + 1 < len(names):
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def factored(shape):
    if len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda a: shape[a])  # stable
    return order[-1], order[-2]  # d0, d1


class NaiveStep:
    """One tensor's state, decay-last like PyLO, and a step in the naive style."""

    def __init__(self, shape, mlp, start_step=0):
        self.shape = tuple(shape) if shape else (1,)
        self.user_shape = tuple(shape)
        self.mlp = mlp
        # The step counter as a tensor: a Python int would make torch.compile specialize on it
        # and compile the step again at every step.
        self.t = torch.tensor(float(start_step))
        s = self.shape
        self.mom = torch.zeros(s + (3,))
        self.rms = torch.zeros(s + (1,))
        self.f = factored(s)
        if self.f:
            d0, d1 = self.f
            self.row = torch.zeros(tuple(x for i, x in enumerate(s) if i != d0) + (3,))
            self.col = torch.zeros(tuple(x for i, x in enumerate(s) if i != d1) + (3,))
        else:
            self.v = torch.zeros(s + (3,))
        self.bm = torch.tensor(MOMENTUM)
        self.bv = torch.tensor([RMS])
        self.bf = torch.tensor(ADAFACTOR)

    @torch.no_grad()
    def step(self, p, g, lr, wd):
        p = p.reshape(self.shape)
        g = g.reshape(self.shape)
        bp, bg = p.unsqueeze(-1), g.unsqueeze(-1)
        axes = list(range(len(self.shape)))
        self.mom.mul_(self.bm).add_((1 - self.bm) * bg)
        self.rms.mul_(self.bv).add_((1 - self.bv) * bg**2)
        g3 = bg.repeat([1] * len(self.shape) + [3])
        q = g3 * g3 + 1e-30
        inv = torch.rsqrt(self.rms + 1e-6)
        feats = [bg, bp, self.mom, self.rms, self.mom * inv, inv]
        if self.f:
            d0, d1 = self.f
            self.row = self.bf * self.row + (1 - self.bf) * q.mean(dim=d0)
            self.col = self.bf * self.col + (1 - self.bf) * q.mean(dim=d1)
            rd1 = d1 - 1 if d1 > d0 else d1
            rmean = self.row.mean(dim=rd1, keepdim=True)
            rf = torch.rsqrt(torch.clamp(self.row / (rmean + 1e-9), min=1e-9))
            cf = torch.rsqrt(torch.clamp(self.col, min=1e-9))
            feats.append(g3 * rf.unsqueeze(d0) * cf.unsqueeze(d1))
            rep_r = [1] * (len(self.shape) + 1)
            rep_c = [1] * (len(self.shape) + 1)
            rep_r[d0] = self.shape[d0]
            rep_c[d1] = self.shape[d1]
            rfeat = self.row.unsqueeze(d0).repeat(rep_r)
            cfeat = self.col.unsqueeze(d1).repeat(rep_c)
            feats += [rfeat, cfeat, torch.rsqrt(rfeat + 1e-8), torch.rsqrt(cfeat + 1e-8)]
            feats.append(self.mom * rf.unsqueeze(d0) * cf.unsqueeze(d1))
        else:
            self.v = self.bf * self.v + (1 - self.bf) * q
            feats.append(g3 * torch.rsqrt(torch.clamp(self.v + 1e-9, min=1e-9)))
            feats += [self.v, self.v, torch.rsqrt(self.v + 1e-8), torch.rsqrt(self.v + 1e-8)]
            feats.append(self.mom * torch.pow(self.v + 1e-6, -0.5))
        x = torch.cat(feats, dim=-1)
        x = x * torch.rsqrt(1e-5 + torch.mean(x**2, dim=axes, keepdim=True))
        tau = torch.tanh(self.t / torch.tensor(PERIODS, dtype=torch.float32) - 1.0)
        tau = tau.reshape((1,) * len(self.shape) + (11,)).repeat(self.shape + (1,))
        out = self.mlp(torch.cat([x, tau], dim=-1))
        d, m = out[..., 0], out[..., 1]
        p.sub_(lr * (d * torch.exp(m * EXP_MULT) * STEP_MULT))
        if wd > 0:
            p.sub_(lr * wd * p)
        self.t.add_(1.0)
        return p.reshape(self.user_shape)


def check(mlp, case, compiled=False):
    """Replays a golden case (through torch.compile when `compiled`); returns
    max |p - p_ref| / max |pT - p0|."""
    from safetensors import safe_open

    with safe_open(case, "np") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    shape = json.loads(meta["shape"])
    steps = int(meta["steps"])
    s = NaiveStep(shape, mlp, int(meta.get("start_step", "0")))
    step = torch.compile(s.step) if compiled else s.step
    p = torch.from_numpy(t["p0"].copy())
    scale = float(np.max(np.abs(t[f"p{steps}"] - t["p0"])))
    err = 0.0
    for k in range(1, steps + 1):
        p = step(p, torch.from_numpy(t[f"g{k}"].copy()), float(meta["lr"]), float(meta["weight_decay"]))
        if f"p{k}" in t:
            err = max(err, float(np.max(np.abs(p.numpy() - t[f"p{k}"]))) / scale)
    return err


def time_torch(mlp, shape, steps, warmup, compiled=False):
    """The reference step's median time; `compiled`: the step through `torch.compile`."""
    n = int(np.prod(shape))
    i = np.arange(n)
    p = torch.from_numpy((((i * 7919) % 1000) - 500.0).astype(np.float32) * 1e-3).reshape(shape)
    g = torch.from_numpy((((i * 104729) % 997) - 498.0).astype(np.float32) * 1e-4).reshape(shape)
    s = NaiveStep(shape, mlp)
    step = torch.compile(s.step) if compiled else s.step
    for _ in range(warmup):
        p = step(p, g, 1e-3, 0.0)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter_ns()
        p = step(p, g, 1e-3, 0.0)
        times.append(time.perf_counter_ns() - t0)
    times.sort()
    median = times[len(times) // 2]
    return {"shape": "x".join(map(str, shape)), "target": "pytorch-compile" if compiled else "pytorch-naive", "steps": steps,
            "median_ns": median, "ns_per_element": median / n, "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def time_mulo(mulo, weights, shape, steps, warmup, target):
    text = "x".join(map(str, shape))
    out = subprocess.run(
        [mulo, "bench", "--shape", text, "--target", target, "--weights", weights,
         "--steps", str(steps), "--warmup", str(warmup)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="tests/fixtures/golden/weights")
    ap.add_argument("--mulo", default="target/release/mulo-compile")
    ap.add_argument("--shapes", nargs="+", default=["1024x512", "4096x1024"])
    ap.add_argument("--targets", nargs="*", default=["cpu", "onnx", "onnx-chunked"],
                    help="mulo-compile bench targets to compare")
    ap.add_argument("--compile", action="store_true",
                    help="also time the reference step compiled by torch.compile (target pytorch-compile)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--check", default="tests/fixtures/golden/mat_64x256.safetensors",
                    help="golden case the PyTorch step must reproduce first ('' to skip)")
    args = ap.parse_args()
    mlp = load_mlp(args.weights)
    for compiled in ([False, True] if args.compile else [False]) if args.check else []:
        err = check(mlp, args.check, compiled)
        what = "torch.compile'd pytorch reference" if compiled else "pytorch reference"
        print(f"{what} vs {os.path.basename(args.check)}: error {err:.3e} of the displacement",
              file=sys.stderr)
        if not err <= 1e-4:
            print(f"the {what} does not reproduce the golden case", file=sys.stderr)
            return 1
    for text in args.shapes:
        shape = tuple(int(d) for d in text.split("x"))
        ref = time_torch(mlp, shape, args.steps, args.warmup)
        print(json.dumps(ref))
        if args.compile:
            print(json.dumps(time_torch(mlp, shape, args.steps, args.warmup, compiled=True)), flush=True)
        for target in args.targets:
            ours = time_mulo(args.mulo, args.weights, shape, args.steps, args.warmup, target)
            print(json.dumps(ours))
            print(json.dumps({"shape": text, "target": target,
                              "pytorch_ns_per_element": round(ref["ns_per_element"], 1),
                              "mulo_ns_per_element": round(ours["ns_per_element"], 1),
                              "speedup": round(ref["ns_per_element"] / ours["ns_per_element"], 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
