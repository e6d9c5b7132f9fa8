#!/usr/bin/env python3
"""Step a PyTorch model with mulo's packed PTX: no extension to build, no nvcc.

`mulo-compile --target cuda --shape A --shape B ...` writes one program for a whole model
(mulo_model.ptx) and its manifest (mulo_model.json). This script loads the PTX with CuPy,
makes the torch model's parameters views of mulo's parameter arena, and runs each training
step's optimizer update as a fixed number of kernel launches (5 for a model with matrices),
whatever the number of tensors; PyLO launches per tensor.

    python3 examples/pytorch_ptx.py                 # needs a GPU, torch and cupy-cuda12x
    python3 examples/pytorch_ptx.py --dry-run       # no GPU: compile, build the launch tables

The model is the 2→32→3 MLP of examples/train_mlp.rs, trained on three Gaussian blobs; the
loss per epoch is printed and must fall. Without --weights, mulo-compile uses btherien/mulo from the Hugging Face cache
if present, else its bundled demo network.

The host protocol (mulo_model.json's `protocol`): per step, write gradients into the grad
arena, write a table (one 104-byte entry per tensor: the device addresses of its buffers, here
arena base + offset, lr, weight decay, step counter, plan) and the block starts of every
launch, then launch each slot in order. `build_table` and `block_starts` below are that
protocol in numpy; `--dump-table` writes their output (with stand-in arena addresses, see
`dry_run_bases`) so that mulo's tests can compare it with the Rust host's, byte for byte.
(mulo.torch steps torch's own tensors with the same program: the table can point anywhere.)
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# The example model: (out, in) of each Linear layer; parameters are weight then bias.
LAYERS = [(32, 2), (3, 32)]
DTYPES = {"ptr": "<u8", "i64": "<i8", "f32": "<f4", "i32": "<i4", "f64": "<f8"}
VALUE_BYTES = {"f32": 4, "f64": 8}


def param_shapes():
    shapes = []
    for out_f, in_f in LAYERS:
        shapes += [[out_f, in_f], [out_f]]
    return shapes


def compile_model(mulo, out_dir, shapes, weights=None, arch=None):
    """Runs mulo-compile for the model's shapes; returns the manifest."""
    cmd = [mulo, "--target", "cuda", "--packed", "-o", str(out_dir)]
    for s in shapes:
        cmd += ["--shape", "x".join(str(d) for d in s) if s else "scalar"]
    if weights:
        cmd += ["--weights", weights]
    if arch:
        cmd += ["--arch", arch]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return load_manifest(out_dir)


def load_manifest(model_dir):
    path = Path(model_dir) / "mulo_model.json"
    manifest = json.loads(path.read_text())
    if manifest.get("format") != "mulo-cuda-model" or manifest.get("format_version") != 4:
        sys.exit(f"{path}: not a mulo-cuda-model manifest of format version 4 (recompile it)")
    if manifest.get("stages", 1) != 1:
        sys.exit(f"{path}: a staged (sharded) program; this example runs whole-tensor steps only")
    return manifest


def table_dtype(manifest):
    """The numpy structured dtype of one table entry, from the manifest's field list."""
    fields = manifest["table_fields"]
    return np.dtype({
        "names": [f["name"] for f in fields],
        "formats": [DTYPES[f["dtype"]] for f in fields],
        "offsets": [f["offset"] for f in fields],
        "itemsize": manifest["table_entry_bytes"],
    })


def dry_run_bases(manifest):
    """Stand-in arena addresses for --dry-run (no device): arena k (manifest order) at
    (k + 1) << 40."""
    return {a["name"]: (k + 1) << 40 for k, a in enumerate(manifest["arenas"])}


def build_table(manifest, bases, lrs, weight_decays, steps):
    """The table of one step: per tensor the addresses of its buffers in the arenas (`bases`:
    arena name → device address), lr, weight decay, step counter, plan."""
    tensors = manifest["tensors"]
    table = np.zeros(len(tensors), dtype=table_dtype(manifest))
    size = {a["name"]: VALUE_BYTES[a["dtype"]] for a in manifest["arenas"]}
    addr_fields = [f["name"] for f in manifest["table_fields"] if f["dtype"] == "ptr"]
    for i, t in enumerate(tensors):
        for name in addr_fields:
            offset = t["offsets"].get("param" if name == "grad" else name)
            if offset is not None:
                table[name][i] = bases[name] + size[name] * offset
        table["lr"][i] = lrs[i]
        table["weight_decay"][i] = weight_decays[i]
        table["step"][i] = float(steps[i])
        table["plan"][i] = t["plan"]
    return table


def block_starts(manifest, active):
    """starts[s][i]: first block of tensor i in slot s (inactive tensors have none); the last
    column is the slot's grid."""
    tensors = manifest["tensors"]
    n, n_slots = len(tensors), len(manifest["slots"])
    starts = np.zeros((n_slots, n + 1), dtype=np.int64)
    for s in range(n_slots):
        blocks = np.array([t["blocks"][s] if on else 0 for t, on in zip(tensors, active)], dtype=np.int64)
        starts[s, 1:] = np.cumsum(blocks)
    return starts


def check_manifest(manifest, shapes, model_dir):
    """What the launches below rely on, checked without a GPU."""
    tensors = manifest["tensors"]
    assert [t["shape"] for t in tensors] == shapes, "the manifest is for other shapes"
    offset = 0
    for t in tensors:  # parameters are packed in order, so one torch.cat fills the grad arena
        assert t["offsets"]["param"] == offset, "parameters are not packed in order"
        offset += t["numel"]
    arenas = {a["name"]: a for a in manifest["arenas"]}
    assert arenas["param"]["len"] >= offset and arenas["grad"]["len"] >= offset
    assert table_dtype(manifest).itemsize == manifest["table_entry_bytes"]
    ptx = Path(model_dir) / manifest["ptx"]
    if ptx.exists():
        text = ptx.read_text()
        for slot in manifest["slots"]:
            assert f".entry {slot['name']}(" in text, f"{ptx}: no entry {slot['name']}"
        for c in manifest["constants"]:
            assert f" {c['name']}[{4 * c['len']}];" in text, f"{ptx}: no empty array {c['name']}"
    for c in manifest["constants"]:
        assert constant_values(c).size == c["len"], f"constant {c['name']}: bad values"


def constant_values(c):
    """The f32 values of one of the manifest's `constants` (little-endian bytes in hex)."""
    return np.frombuffer(bytes.fromhex(c["hex"]), dtype="<f4")


class MuloModelStep:
    """μLO steps for a list of torch parameters through mulo_model.ptx (CuPy launches)."""

    def __init__(self, model_dir, params, device):
        import cupy
        import torch

        self.cupy, self.torch = cupy, torch
        self.manifest = load_manifest(model_dir)
        self.params = list(params)
        check_manifest(self.manifest, [list(p.shape) for p in self.params], model_dir)
        self.module = cupy.RawModule(path=str(Path(model_dir) / self.manifest["ptx"]))
        self.kernels = [self.module.get_function(s["name"]) for s in self.manifest["slots"]]
        # The weights: the PTX declares their __constant__ arrays without values.
        for c in self.manifest["constants"]:
            values = np.ascontiguousarray(constant_values(c))
            self.module.get_global(c["name"]).copy_from_host(values.ctypes.data, values.nbytes)
        torch_dtype = {"f32": torch.float32, "f64": torch.float64}
        self.arenas = {a["name"]: torch.zeros(a["len"], dtype=torch_dtype[a["dtype"]], device=device)
                       for a in self.manifest["arenas"]}
        self.numel = sum(t["numel"] for t in self.manifest["tensors"])
        # The parameters become views of the param arena: mulo updates them in place.
        for p, t in zip(self.params, self.manifest["tensors"]):
            o = t["offsets"]["param"]
            view = self.arenas["param"][o:o + t["numel"]]
            view.copy_(p.detach().reshape(-1))
            p.data = view.view(p.shape)
        self.steps = np.zeros(len(self.params), dtype=np.int64)
        self.device = device

    def step(self, lr, weight_decay=0.0):
        """One step of every parameter with a finite gradient; returns the skipped indices."""
        torch, cupy = self.torch, self.cupy
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        torch.cat([g.reshape(-1) for g in grads], out=self.arenas["grad"][:self.numel])
        # NaN/Inf policy `skip`: such a tensor keeps its parameter and state (one sync).
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).cpu().numpy()
        n = len(self.params)
        bases = {name: arena.data_ptr() for name, arena in self.arenas.items()}
        table = build_table(self.manifest, bases, [lr] * n, [weight_decay] * n, self.steps)
        starts = block_starts(self.manifest, finite)
        table_dev = torch.from_numpy(table.view(np.uint8)).to(self.device)
        starts_dev = torch.from_numpy(starts.reshape(-1)).to(self.device)
        args = (cupy.asarray(table_dev), cupy.asarray(starts_dev), np.int32(n))
        threads = self.manifest["block_threads"]
        for s, kernel in enumerate(self.kernels):
            grid = int(starts[s, -1])
            if grid:
                kernel((grid,), (threads,), args)
        self.steps += finite.astype(np.int64)
        return [i for i, ok in enumerate(finite) if not ok]


def blobs(rng, n):
    centers = np.array([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]], dtype=np.float32)
    y = rng.integers(0, 3, n)
    x = centers[y] + rng.normal(0, 0.9, (n, 2)).astype(np.float32)
    return x, y


def train(args, model_dir):
    import torch

    device = torch.device("cuda")
    torch.manual_seed(0)
    layers = []
    for i, (out_f, in_f) in enumerate(LAYERS):
        layers.append(torch.nn.Linear(in_f, out_f))
        if i + 1 < len(LAYERS):
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers).to(device)
    opt = MuloModelStep(model_dir, model.parameters(), device)
    rng = np.random.default_rng(0)
    x_all, y_all = blobs(rng, 600)
    x_all, y_all = torch.from_numpy(x_all).to(device), torch.from_numpy(y_all).to(device)
    loss_fn = torch.nn.CrossEntropyLoss()
    batch, losses = 50, []
    print(f"MLP {'→'.join([str(LAYERS[0][1])] + [str(o) for o, _ in LAYERS])} on 600 blob samples, "
          f"{len(opt.kernels)} launches per optimizer step for {len(opt.params)} tensors")
    print("epoch   loss    accuracy  step time")
    for epoch in range(args.epochs):
        with torch.no_grad():
            logits = model(x_all)
            loss = loss_fn(logits, y_all).item()
            acc = (logits.argmax(1) == y_all).float().mean().item()
        losses.append(loss)
        perm = torch.randperm(600, device=device)
        times = []
        for b in range(0, 600, batch):
            idx = perm[b:b + batch]
            model.zero_grad(set_to_none=False)
            loss_fn(model(x_all[idx]), y_all[idx]).backward()
            torch.cuda.synchronize()
            t = time.perf_counter()
            opt.step(args.lr, args.weight_decay)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        print(f"{epoch:5d}  {loss:.4f}   {acc * 100:5.1f}%   {np.median(times) * 1e3:.3f} ms")
    print(f"loss {losses[0]:.4f} → {losses[-1]:.4f}")
    if not losses[-1] < 0.5 * losses[0]:
        sys.exit("the loss did not fall to half its initial value")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mulo", default=os.environ.get("MULO_COMPILE", "target/release/mulo-compile"),
                    help="the mulo-compile binary (default: $MULO_COMPILE, else target/release/mulo-compile)")
    ap.add_argument("--model-dir", default="mulo-model-example",
                    help="where mulo_model.{cu,ptx,json} are (compiled there when missing)")
    ap.add_argument("--weights", help="passed to mulo-compile --weights")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: compile and check the model program, build one step's table")
    ap.add_argument("--dump-table", help="with --dry-run: write the table bytes then the int64 starts here")
    ap.add_argument("--step", type=int, default=0, help="with --dry-run: the step counter in the table")
    args = ap.parse_args()

    shapes = param_shapes()
    gpu = False
    if not args.dry_run:
        try:
            import cupy  # noqa: F401
            import torch
            gpu = torch.cuda.is_available()
            why = "torch sees no CUDA device"
        except ImportError as e:
            why = f"{e.name} is not installed (pip install torch cupy-cuda12x)"
        if not gpu:
            print(f"SKIPPED training: {why}; running --dry-run instead")
    model_dir = Path(args.model_dir)
    if (model_dir / "mulo_model.json").exists():
        manifest = load_manifest(model_dir)
    else:
        arch = None
        if gpu:
            import torch
            major, minor = torch.cuda.get_device_capability()
            arch = f"sm_{major}{minor}"
        manifest = compile_model(args.mulo, model_dir, shapes, args.weights, arch)
    check_manifest(manifest, shapes, model_dir)
    if gpu:
        train(args, model_dir)
        return
    n = len(manifest["tensors"])
    table = build_table(manifest, dry_run_bases(manifest), [args.lr] * n, [args.weight_decay] * n,
                        [args.step] * n)
    starts = block_starts(manifest, [True] * n)
    if args.dump_table:
        Path(args.dump_table).write_bytes(table.tobytes() + starts.tobytes())
    print(f"dry run: {n} tensors, {len(manifest['slots'])} launches per step with grids "
          f"{starts[:, -1].tolist()}, table {table.nbytes} bytes; the launches need a GPU")


if __name__ == "__main__":
    main()
