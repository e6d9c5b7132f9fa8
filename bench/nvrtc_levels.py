#!/usr/bin/env python3
"""NVRTC's optimization levels on one generated program, no GPU: for each option set, NVRTC's
wall time to a CUBIN and ptxas's resources (the largest register counts, the functions with a
stack frame or spills). This is the measurement behind `nvrtc::Level` (one tensor's CUBIN at
--Ofast-compile=min, a packed model's at full optimization with --split-compile=0).

    bench/nvrtc_levels.py [ARCH] > table.md      (default sm_90)

Builds the 12-shape packed model of bench/cuda_compile_time.sh and 16x8x3x3 with
target/debug/mulo-compile (MULO_COMPILE=path picks another) and compiles each source with
libnvrtc (scripts/env.sh's wheel) through ctypes, one call per option set."""

import collections
import ctypes
import glob
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = sys.argv[1] if len(sys.argv) > 1 else "sm_90"
BIN = os.environ.get("MULO_COMPILE", os.path.join(ROOT, "target/debug/mulo-compile"))
WEIGHTS = os.path.join(ROOT, "tests/fixtures/golden/weights")
PACKED = "50257x768 1024x768 768 768x2304 2304 768x768 768x3072 3072 3072x768 16x8x3x3 scalar 1x300".split()
LEVELS = [
    ("--Ofast-compile=min", ["--Ofast-compile=min"]),
    ("full optimization", []),
    ("full, --split-compile=0", ["--split-compile=0"]),
]


def libnvrtc():
    import nvidia.cuda_nvrtc as m

    return ctypes.CDLL(sorted(glob.glob(os.path.join(m.__path__[0], "lib", "libnvrtc.so*")))[0])


def compile_log(lib, source, options):
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source, b"mulo.cu", 0, None, None) == 0
    opts = [o.encode() for o in options]
    t0 = time.perf_counter()
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    wall = time.perf_counter() - t0
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    buf = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, buf)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    if rc != 0:
        sys.exit(f"NVRTC failed ({rc}) with {options}: {buf.value.decode()[:2000]}")
    return wall, buf.value.decode()


def resources(log):
    frames = collections.Counter()
    spilling = []
    func = None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            func = m.group(1)
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", line)
        if m and (int(m.group(1)) or int(m.group(2))):
            frames[(int(m.group(1)), int(m.group(2)))] += 1
            spilling.append(func)
    regs = sorted(int(r) for r in re.findall(r"Used (\d+) registers", log))
    return regs[-3:], frames, spilling


def main():
    lib = libnvrtc()
    work = tempfile.mkdtemp()
    cases = [("12-shape packed model", PACKED, "mulo_model.cu"), ("16x8x3x3", ["16x8x3x3"], "mulo_step.cu")]
    print(f"# NVRTC optimization levels ({ARCH}, no GPU)\n")
    print(f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"- machine: {os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at start")
    print(f"- command: `bench/nvrtc_levels.py {ARCH}`\n")
    print("| program | options | NVRTC wall (s) | most registers | functions with a frame or spills (frame B, spill B: count) |")
    print("|---|---|---|---|---|")
    for name, shapes, file in cases:
        out = os.path.join(work, name.replace(" ", "_"))
        args = [BIN, "--target", "cuda", "--weights", WEIGHTS, "-o", out]
        for s in shapes:
            args += ["--shape", s]
        subprocess.run(args, check=True, capture_output=True, env=dict(os.environ, MULO_CACHE_DIR=os.path.join(work, "cache")))
        source = open(os.path.join(out, file), "rb").read()
        base = [f"--gpu-architecture={ARCH}", "--std=c++17", "-DMULO_UPLOAD_CONSTANTS", "--ptxas-options=-v"]
        for label, extra in LEVELS:
            wall, log = compile_log(lib, source, base + extra)
            regs, frames, spilling = resources(log)
            where = ", ".join(f"{f} B, {s} B: {c}" for (f, s), c in sorted(frames.items())) or "none"
            if spilling and len(spilling) <= 2:
                where += f" ({', '.join(spilling)})"
            print(f"| {name} | {label} | {wall:.2f} | {regs} | {where} |")


main()
