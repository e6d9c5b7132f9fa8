"""Train a small numpy model with μLO_M steps run by onnxruntime, from exported mulo_step.onnx.

    cargo build --release
    python3 examples/onnxruntime_step.py --mulo target/release/mulo-compile [--weights W]

One ONNX graph is exported per distinct parameter shape (`mulo-compile --target onnx`); each
parameter keeps its own optimizer state (the graph's `*_out` outputs fed back as inputs).
The model is softmax regression with one hidden layer on three Gaussian blobs; the loss per
epoch is printed and the script exits with status 1 unless it falls below half its start.
Without --weights it uses the bundled demo meta-network (not the trained μLO_M).
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnxruntime as ort


class OnnxMulo:
    """μLO_M for a list of numpy parameters, one onnxruntime session per distinct shape."""

    def __init__(self, params, mulo, weights, workdir):
        self.sessions = {}
        self.states = []
        for p in params:
            key = p.shape
            if key not in self.sessions:
                shape = "x".join(map(str, p.shape)) if p.shape else "scalar"
                path = os.path.join(workdir, f"step_{shape}.onnx")
                cmd = [mulo, "--shape", shape, "--target", "onnx", "-o", path]
                if weights:
                    cmd += ["--weights", weights]
                subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
                self.sessions[key] = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            sess = self.sessions[key]
            self.states.append({i.name: np.zeros(i.shape, np.float32) for i in sess.get_inputs()
                                if i.name not in ("param", "grad", "step", "lr", "weight_decay")})
        self.t = 0

    def step(self, params, grads, lr, weight_decay=0.0):
        for i, (p, g) in enumerate(zip(params, grads)):
            sess = self.sessions[p.shape]
            feed = {"param": p, "grad": g.astype(np.float32), **self.states[i],
                    "step": np.array(self.t, np.int64), "lr": np.array(lr, np.float32),
                    "weight_decay": np.array(weight_decay, np.float32)}
            out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
            p[...] = out["param_out"]
            self.states[i] = {k: out[k + "_out"] for k in self.states[i]}
        self.t += 1


def blobs(rng, n=600):
    centers = np.array([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]], np.float32)
    y = rng.integers(0, 3, n)
    x = centers[y] + rng.normal(0, 0.6, (n, 2)).astype(np.float32)
    return x.astype(np.float32), y


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mulo", default="target/release/mulo-compile")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--lr", type=float, default=0.5)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    x, y = blobs(rng)
    w1 = (rng.normal(0, 0.5, (2, 32))).astype(np.float32)
    b1 = np.zeros(32, np.float32)
    w2 = (rng.normal(0, 0.3, (32, 3))).astype(np.float32)
    b2 = np.zeros(3, np.float32)
    params = [w1, b1, w2, b2]

    def loss_and_grads(xb, yb):
        h = np.maximum(xb @ w1 + b1, 0)
        z = h @ w2 + b2
        z = z - z.max(1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        loss = -np.log(p[np.arange(len(yb)), yb] + 1e-12).mean()
        dz = p
        dz[np.arange(len(yb)), yb] -= 1
        dz /= len(yb)
        dh = (dz @ w2.T) * (h > 0)
        return loss, [xb.T @ dh, dh.sum(0), h.T @ dz, dz.sum(0)]

    with tempfile.TemporaryDirectory() as work:
        opt = OnnxMulo(params, args.mulo, args.weights, work)
        print(f"{len(opt.sessions)} ONNX graphs for {len(params)} parameters")
        first, _ = loss_and_grads(x, y)
        print(f"epoch  0  loss {first:.4f}")
        for epoch in range(1, args.epochs + 1):
            order = rng.permutation(len(x))
            for s in range(0, len(x), 50):
                idx = order[s:s + 50]
                _, grads = loss_and_grads(x[idx], y[idx])
                opt.step(params, grads, args.lr)
            loss, _ = loss_and_grads(x, y)
            acc = ((np.maximum(x @ w1 + b1, 0) @ w2 + b2).argmax(1) == y).mean()
            print(f"epoch {epoch:2d}  loss {loss:.4f}  accuracy {acc:.1%}")
    if not loss < 0.5 * first:
        print(f"loss did not halve: {first:.4f} -> {loss:.4f}", file=sys.stderr)
        sys.exit(1)
    print(f"loss {first:.4f} -> {loss:.4f}")


if __name__ == "__main__":
    main()
