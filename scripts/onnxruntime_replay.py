#!/usr/bin/env python3
"""Replay golden trajectories through `mulo_step.onnx` in onnxruntime.

For every trajectory file (the golden format: p0, g1..gT, p1..pT, PyLO state, metadata shape /
steps / lr / weight_decay / start_step) this script

1. exports `mulo_step.onnx` for the case's shape with `mulo-compile --target onnx`,
2. runs `onnx.checker.check_model(model, full_check=True)` and checks the opset and domains,
3. replays the trajectory through onnxruntime (CPU) from zero state, and
4. compares every recorded parameter (max |p - p_ref| / max |pT - p0|) and the final state
   (converted from PyLO's decay-last layout to the canonical decay-major one) against the
   tolerance (default 1e-4, golden/README.md).

It exits with status 1 if any case is over the tolerance.

    pip install onnx onnxruntime numpy safetensors
    python3 scripts/onnxruntime_replay.py --mulo target/release/mulo-compile \
        --weights tests/fixtures/golden/weights tests/fixtures/golden/*.safetensors
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from safetensors import safe_open

MIN_OPSET = 17


def load_case(path):
    tensors = {}
    with safe_open(path, "np") as f:
        meta = f.metadata() or {}
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    shape = json.loads(meta["shape"])
    steps = int(meta["steps"])
    return {
        "name": os.path.splitext(os.path.basename(path))[0],
        "shape": shape,
        "steps": steps,
        "lr": np.float32(meta["lr"]),
        "weight_decay": np.float32(meta["weight_decay"]),
        "start_step": int(meta.get("start_step", "0")),
        "factored_axes": json.loads(meta.get("factored_axes", "null")),
        "tensors": tensors,
    }


def export(mulo, weights, shape, axes, out_dir):
    """Exports the step for `shape` with the factored axes PyLO recorded (None: the default)."""
    text = "x".join(str(d) for d in shape) if shape else "scalar"
    tag = text if axes is None else f"{text}_axes{axes[0]}{axes[1]}"
    path = os.path.join(out_dir, f"mulo_step_{tag}.onnx")
    if not os.path.exists(path):
        cmd = [mulo, "--shape", text, "--target", "onnx", "-o", path]
        if axes is not None:
            cmd += ["--factored-axes", f"{axes[0]},{axes[1]}"]
        if weights:
            cmd += ["--weights", weights]
        subprocess.run(cmd, check=True)
    return path


def check_model(path):
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    opsets = {o.domain: o.version for o in model.opset_import}
    if set(opsets) - {"", "ai.onnx"}:
        raise SystemExit(f"{path}: non-standard opset domains {sorted(opsets)}")
    version = opsets.get("", opsets.get("ai.onnx", 0))
    if version < MIN_OPSET:
        raise SystemExit(f"{path}: opset {version} < {MIN_OPSET}")
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise SystemExit(f"{path}: node {node.name} uses domain {node.domain!r}")
    return len(model.graph.node)


def replay(session, case):
    shape = case["shape"]
    t = case["tensors"]
    names = {i.name for i in session.get_inputs()}
    zeros = {}
    for inp in session.get_inputs():
        if inp.name in ("param", "grad", "step", "lr", "weight_decay"):
            continue
        zeros[inp.name] = np.zeros(inp.shape, dtype=np.float32)
    state = dict(zeros)
    step = case["start_step"]
    # The graph's I/O shape of the parameter (the tensor's own, 0-d included).
    io_shape = [int(d) for d in next(i for i in session.get_inputs() if i.name == "param").shape]
    param = t["p0"].astype(np.float32).reshape(io_shape)
    scale = max(float(np.max(np.abs(t[f"p{case['steps']}"] - t["p0"]))), np.finfo(np.float64).tiny)
    param_err = 0.0
    for k in range(1, case["steps"] + 1):
        feeds = dict(state)
        feeds["param"] = param
        feeds["grad"] = t[f"g{k}"].astype(np.float32).reshape(io_shape)
        feeds["step"] = np.array(step, dtype=np.int64)
        feeds["lr"] = np.array(case["lr"], dtype=np.float32)
        feeds["weight_decay"] = np.array(case["weight_decay"], dtype=np.float32)
        assert set(feeds) == names, (sorted(feeds), sorted(names))
        outs = session.run(None, feeds)
        out = {o.name: v for o, v in zip(session.get_outputs(), outs)}
        param = out["param_out"]
        assert param.shape == tuple(io_shape), (param.shape, io_shape)
        state = {n: out[f"{n}_out"] for n in zeros}
        if int(out["step_out"]) != step + 1:
            raise SystemExit(f"{case['name']}: step_out {int(out['step_out'])} != {step + 1}")
        step += 1
        want = t.get(f"p{k}")
        if want is not None:
            got = param.astype(np.float64).reshape(want.shape)
            param_err = max(param_err, float(np.max(np.abs(got - want))) / scale)
    # Final state: PyLO decay-last -> canonical decay-major.
    state_errs = {}
    pylo = {"mom": "mom", "rms": "rms", "fac_row": "fac_vec_row", "fac_col": "fac_vec_col", "fac_v": "fac_vec_v"}
    for name, got in state.items():
        key = f"state.{pylo[name]}"
        if key not in t:
            continue
        ref = np.moveaxis(t[key], -1, 0)
        if name == "rms":
            ref = ref[0]
        ref = ref.reshape(got.shape)
        s = max(float(np.max(np.abs(ref))), np.finfo(np.float64).tiny)
        state_errs[name] = float(np.max(np.abs(got.astype(np.float64) - ref))) / s
    return param_err, state_errs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mulo", default="target/release/mulo-compile", help="the mulo-compile binary")
    ap.add_argument("--weights", default=None, help="--weights for mulo-compile")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--keep", default=None, help="directory to keep the exported models in")
    ap.add_argument("cases", nargs="+")
    args = ap.parse_args()

    out_dir = args.keep or tempfile.mkdtemp(prefix="mulo_onnx_")
    os.makedirs(out_dir, exist_ok=True)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    failed = 0
    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}")
    print(f"{'case':<24} {'shape':<14} {'nodes':>5} {'param err':>10} {'state err':>10}  result")
    for path in args.cases:
        case = load_case(path)
        model = export(args.mulo, args.weights, case["shape"], case["factored_axes"], out_dir)
        nodes = check_model(model)
        session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        started = time.time()
        param_err, state_errs = replay(session, case)
        worst = max([param_err] + list(state_errs.values()))
        ok = worst <= args.tol and np.isfinite(worst)
        failed += not ok
        shape = "x".join(map(str, case["shape"])) or "scalar"
        print(
            f"{case['name']:<24} {shape:<14} {nodes:>5} {param_err:>10.3e} "
            f"{max(state_errs.values(), default=0.0):>10.3e}  "
            f"{'ok' if ok else 'OVER TOLERANCE'} ({time.time() - started:.2f}s)"
        )
    print(f"{len(args.cases) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
