#!/usr/bin/env python3
"""The model card's usage with mulo as a drop-in PyTorch optimizer: an MLP on scikit-learn's
bundled 8x8 digits (nothing is downloaded), trained with ``mulo.torch.MuLO``.

    scripts/setup                       # builds and installs the `mulo` package into .venv
    .venv/bin/python examples/torch_digits.py [--epochs 5] [--require 0.9]

The only change from PyLO's example is the import (``from pylo.optim import MuLO_naive``
becomes ``from mulo.torch import MuLO``). Uses the trained ``btherien/mulo`` when it is in the
local Hugging Face cache, else mulo's bundled demo network (an Adam-like rule with μLO_M's
architecture, not the trained optimizer), and says which. Prints the loss per epoch and the
test accuracy; with ``--require A`` exits 1 if the accuracy is below A (CI: 0.9).
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
    args = ap.parse_args()

    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.2, random_state=0, stratify=y)
    x_train, x_test = (torch.tensor(a, dtype=torch.float32) for a in (x_train, x_test))
    y_train, y_test = (torch.tensor(a) for a in (y_train, y_test))

    model = mlp(args.hidden)
    mup.set_base_shapes(model, mlp(32))  # μP: the base model is 4x narrower
    try:
        lopt = LearnedOptimizer.load(args.hf_key)
    except Exception as e:  # not in the local Hugging Face cache: mulo never downloads
        print(f"{args.hf_key} not found ({str(e).splitlines()[0]}); using mulo's demo weights")
        lopt = LearnedOptimizer.load("demo")
    print(f"weights: {lopt.origin}{' (demo: not the trained μLO_M)' if lopt.is_demo else ''}")
    opt = MuLO(model.parameters(), lr=args.lr, hf_key=lopt)

    loss_fn = torch.nn.CrossEntropyLoss()
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(x_train))
        total, batches = 0.0, 0
        for i in range(0, len(order), args.batch):
            idx = order[i : i + args.batch]
            opt.zero_grad()
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
            total += loss.item()
            batches += 1
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        print(f"epoch {epoch}: train loss {total / batches:.4f}, test accuracy {acc:.4f}")
    print(f"test accuracy: {acc:.4f} ({args.epochs} epochs, {time.perf_counter() - started:.1f} s)")
    if args.require is not None and acc < args.require:
        print(f"FAILED: test accuracy {acc:.4f} < {args.require}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
