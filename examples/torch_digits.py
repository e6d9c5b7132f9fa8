#!/usr/bin/env python3
"""The model card's usage with mulo as a drop-in PyTorch optimizer: an MLP on scikit-learn's
bundled 8x8 digits (nothing is downloaded), trained with ``mulo.torch.MuLO``.

    scripts/setup                       # builds and installs the `mulo` package into .venv
    .venv/bin/python examples/torch_digits.py [--epochs 5] [--require 0.9] [--dtype bfloat16]
    .venv/bin/python examples/torch_digits.py --plot docs/torch_digits_loss.png   # needs matplotlib

The only change from PyLO's example is the import (``from pylo.optim import MuLO_naive``
becomes ``from mulo.torch import MuLO``). Uses the trained ``btherien/mulo`` when it is in the
local Hugging Face cache, else mulo's bundled demo network (an Adam-like rule with μLO_M's
architecture, not the trained optimizer), and says which. Prints the loss per epoch and the
test accuracy; with ``--require A`` exits 1 if the accuracy is below A (CI: 0.9).

``--dtype bfloat16`` (or ``float16``) trains the model in that dtype, parameters, gradients
and activations (mulo keeps its state in float32). ``--plot FILE.png`` also trains the same
model from the same initialization on the same batches with ``torch.optim.AdamW`` and draws
both training-loss curves into FILE.png (matplotlib: ``pip install 'mulo[plot]'``).
"""

import argparse
import sys
import time

import mup
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from mulo import LearnedOptimizer
from mulo.torch import MuLO


def mlp(hidden):
    # μP: the readout is mup's MuReadout (its output is scaled by the base width over the width).
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), mup.MuReadout(hidden, 10))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1.0)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--hf-key", default="btherien/mulo", help="Hub key, directory or file of the weights")
    ap.add_argument("--require", type=float, default=None, help="fail unless the test accuracy reaches this")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    ap.add_argument("--plot", metavar="FILE.png", help="draw mulo's and AdamW's loss curves into this file")
    ap.add_argument("--adamw-lr", type=float, default=1e-2, help="AdamW's learning rate (with --plot)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.2, random_state=0, stratify=y)
    x_train, x_test = (torch.tensor(a, dtype=dtype) for a in (x_train, x_test))
    y_train, y_test = (torch.tensor(a) for a in (y_train, y_test))

    model = mlp(args.hidden).to(dtype)
    mup.set_base_shapes(model, mlp(32))  # μP: the base model is 4x narrower
    twin = None
    if args.plot:
        # AdamW's run starts from the same weights (after mup's rescaling, hence no second one).
        twin = mlp(args.hidden).to(dtype)
        twin.load_state_dict(model.state_dict())
        mup.set_base_shapes(twin, mlp(32), rescale_params=False)
    try:
        lopt = LearnedOptimizer.load(args.hf_key)
    except Exception as e:  # not in the local Hugging Face cache: mulo never downloads
        print(f"{args.hf_key} not found ({str(e).splitlines()[0]}); using mulo's demo weights")
        lopt = LearnedOptimizer.load("demo")
    print(f"weights: {lopt.origin}{' (demo: not the trained μLO_M)' if lopt.is_demo else ''}")
    opt = MuLO(model.parameters(), lr=args.lr, hf_key=lopt)

    started = time.perf_counter()
    losses, acc = train(model, opt, args, x_train, y_train, x_test, y_test, "mulo")
    print(f"test accuracy: {acc:.4f} ({args.epochs} epochs, {time.perf_counter() - started:.1f} s)")
    if args.plot:
        adamw = torch.optim.AdamW(twin.parameters(), lr=args.adamw_lr)
        adamw_losses, adamw_acc = train(twin, adamw, args, x_train, y_train, x_test, y_test, "AdamW")
        plot(args, [("mulo MuLO" + (" (demo weights)" if lopt.is_demo else ""), losses, acc),
                    (f"torch.optim.AdamW (lr {args.adamw_lr:g})", adamw_losses, adamw_acc)])
    if args.require is not None and acc < args.require:
        print(f"FAILED: test accuracy {acc:.4f} < {args.require}", file=sys.stderr)
        return 1
    return 0


def train(model, opt, args, x_train, y_train, x_test, y_test, label):
    """Trains `model` with `opt` (the same batches for every optimizer: the order is seeded per
    epoch); returns the loss of every batch and the final test accuracy."""
    loss_fn = torch.nn.CrossEntropyLoss()
    losses = []
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(epoch))
        first = len(losses)
        for i in range(0, len(order), args.batch):
            idx = order[i : i + args.batch]
            opt.zero_grad()
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            loss.backward()
            if isinstance(opt, MuLO):
                opt.step(loss)  # PyLO's loop: the loss is passed, and returned
            else:
                opt.step()  # torch's optimizers would call a tensor given here as a closure
            losses.append(loss.item())
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        mean = sum(losses[first:]) / (len(losses) - first)
        print(f"{label} epoch {epoch}: train loss {mean:.4f}, test accuracy {acc:.4f}")
    return losses, acc


def plot(args, runs):
    """Draws each run's per-batch training loss into args.plot."""
    import matplotlib

    matplotlib.use("Agg")  # a file, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for label, losses, acc in runs:
        ax.plot(range(1, len(losses) + 1), losses, label=f"{label}: test accuracy {acc:.3f}", linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel(f"step (batch {args.batch}, {args.epochs} epochs)")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(f"MLP 64-{args.hidden}-10 on scikit-learn digits, {args.dtype}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot)
    print(f"loss curves: {args.plot}")


if __name__ == "__main__":
    sys.exit(main())
