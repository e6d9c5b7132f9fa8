#!/usr/bin/env python3
"""Draws a committed CPU benchmark (ns per element of one optimizer step, by tensor shape) as
a PNG: one bar per shape and step implementation, on a log scale.

    python3 bench/plot.py [bench/results/cpu-torch-compile.md] [--out bench/results/cpu-torch-compile.png]

It reads the JSON lines that `bench/pytorch_reference.py` printed into the results file (the
side-by-side section of `bench/cpu.sh`'s output): per shape, mulo's step (`"target": "cpu"`,
the native CPU backend on every core), the PyTorch reference step (`"pytorch-naive"`) and any
other target found there (a torch.compile'd reference step, onnx, ...), labelled by its name.
When a file holds several runs, the first line of each (shape, target) is drawn, and the
speed-up lines (no `ns_per_element`) are skipped. Nothing is measured here: the numbers are
the file's. Needs matplotlib (`pip install matplotlib`).
"""

import argparse
import json
import sys
from pathlib import Path

# How the targets of bench/pytorch_reference.py's lines are labelled in the picture.
LABELS = {
    "cpu": "mulo (native CPU backend)",
    "pytorch-naive": "PyTorch reference step",
    "pytorch-compile": "PyTorch reference step, torch.compile",
    "onnx": "mulo ONNX graph in tract",
    "onnx-chunked": "mulo ONNX, chunked",
}


def read(path):
    """{(shape, target): ns_per_element} from the file's JSON lines (the first of each)."""
    rows = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "shape" in row and "target" in row and "ns_per_element" in row:
            rows.setdefault((row["shape"], row["target"]), float(row["ns_per_element"]))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="?", default="bench/results/cpu-torch-compile.md")
    ap.add_argument("--out", help="the PNG (default: the results file with .png)")
    args = ap.parse_args()
    rows = read(args.results)
    if not rows:
        print(f"{args.results}: no benchmark lines (JSON with shape, target, ns_per_element)", file=sys.stderr)
        return 1
    out = args.out or str(Path(args.results).with_suffix(".png"))

    import matplotlib

    matplotlib.use("Agg")  # a file, no display
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(s for s, _ in rows))
    # mulo first, then the references, then anything else in file order.
    order = [t for t in LABELS if any(t == tt for _, tt in rows)]
    order += [t for t in dict.fromkeys(t for _, t in rows) if t not in order]
    width = 0.8 / len(order)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for k, target in enumerate(order):
        xs = [i + (k - (len(order) - 1) / 2) * width for i in range(len(shapes))]
        ys = [rows.get((s, target), float("nan")) for s in shapes]
        ax.bar(xs, ys, width, label=LABELS.get(target, target))
        for x, y in zip(xs, ys):
            if y == y:  # not NaN: this shape has this target
                ax.annotate(f"{y:.1f}", (x, y), ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    # From 1 ns: a log axis starting just under the smallest bar would hide how small it is.
    ax.set_ylim(1, max(rows.values()) * 5)
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels(shapes)
    ax.set_xlabel("parameter tensor shape")
    ax.set_ylabel("ns per element and step (lower is better)")
    machine = next(
        (line.split(",")[0:2] for line in Path(args.results).read_text().splitlines() if line.startswith("CPU `")),
        None,
    )
    where = f"{machine[0].replace('`', '')},{machine[1]}; " if machine else ""
    ax.set_title(f"One μLO_M step on the CPU ({where}{Path(args.results).name})", fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out)
    for (shape, target), ns in rows.items():
        print(f"{shape} {target}: {ns:.1f} ns/element")
    print(f"plot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
