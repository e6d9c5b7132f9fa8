#!/usr/bin/env python3
"""32-byte sectors per warp f32 load in mulo's CUDA element kernels, before and after #13.4.

Static: no GPU. For every block, row j of the tile and warp, the elements its 32 lanes load
(the map of templates/elem_kernel.cu.j2), counted in 32-byte sectors.
- "before" (main at 07b222a): threads along X (the factored axis of smaller stride) only, one
  point of every rest axis per block.
- "after" (rank4): threads along X' = (X, the rest axes after X), one point of the rest
  axes before X per block (`schedule::Tiling::element`; the Rust test
  `warp_loads_of_conv_weights_touch_few_sectors` prints the same "after" figures).
Usage: python3 bench/warp_sectors.py
"""
import math


def stable_axes(dims):
    order = sorted(range(len(dims)), key=lambda a: dims[a])
    return order[-1], order[-2]


def tiling(dims, axes, inner):
    d0, d1 = axes
    x, y = max(d0, d1), min(d0, d1)
    rest = [a for a in range(len(dims)) if a not in (x, y)]
    inn = [a for a in rest if a > x] if inner else []
    out = [a for a in rest if a not in inn]
    nx = dims[x] * math.prod(dims[a] for a in inn)
    bx = min(32, 1 << (nx - 1).bit_length())
    by = 256 // bx
    ny = dims[y]
    rows = min(max(-(-ny // by), 1), 4)
    return dict(x=x, y=y, inn=inn, out=out, nx=nx, ny=ny, bx=bx, by=by, rows=rows,
                tx=-(-nx // bx), ty=-(-ny // (by * rows)))


def strides(dims):
    return [math.prod(dims[a + 1:]) for a in range(len(dims))]


def element(dims, t, blk, tid, j):
    st = strides(dims)
    tx, ty = tid % t["bx"], tid // t["bx"]
    txt = blk % t["tx"]
    tyt = (blk // t["tx"]) % t["ty"]
    rest = blk // (t["tx"] * t["ty"])
    ix = txt * t["bx"] + tx
    iy = (tyt * t["rows"] + j) * t["by"] + ty
    if ix >= t["nx"] or iy >= t["ny"]:
        return None
    # X' index: X then the inner axes, row-major; X' is contiguous when inner axes are all
    # the axes after X, else (before: no inner axes) X alone with its own stride.
    e = iy * st[t["y"]]
    if t["inn"]:
        e += ix
    else:
        e += ix * st[t["x"]]
    for a in reversed(t["out"]):
        e += (rest % dims[a]) * st[a]
        rest //= dims[a]
    return e


def sectors(dims, axes, inner):
    t = tiling(dims, axes, inner)
    blocks = math.prod(dims[a] for a in t["out"]) * t["tx"] * t["ty"]
    loads = secs = 0
    for blk in range(blocks):
        for j in range(t["rows"]):
            for w in range(8):
                e = {element(dims, t, blk, tid, j) for tid in range(32 * w, 32 * w + 32)}
                e.discard(None)
                if e:
                    loads += 1
                    secs += len({v * 4 // 32 for v in e})
    return t, loads, secs


print("| shape | factored axes | before: threads along | sectors per warp load | after: threads along (floats) | sectors per warp load |")
print("|---|---|---|---|---|---|")
for shape, axes in [("64x64x3x3", None), ("16x8x3x3", None), ("512x512x3x3", None),
                    ("128x64x5x5", None), ("64x3x7x7", None), ("64x3x7x7", (0, 2)),
                    ("1024x512", None)]:
    dims = [int(d) for d in shape.split("x")]
    ax = axes or stable_axes(dims)
    tb, lb, sb = sectors(dims, ax, False)
    ta, la, sa = sectors(dims, ax, True)
    along = f"axis {ta['x']}" + (f" + axes {ta['inn']}" if ta["inn"] else "")
    print(f"| {shape} | {ax} | axis {tb['x']} (stride {strides(dims)[tb['x']]}) | {sb / lb:.2f} "
          f"| {along} ({ta['nx']}) | {sa / la:.2f} |")
