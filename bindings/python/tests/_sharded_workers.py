"""Rank processes of test_distributed.py (spawned; gloo on 127.0.0.1). Each worker asserts what
it can see itself and writes what the parent compares to ``out/rank{r}.pt``."""

from __future__ import annotations

import faulthandler
import io
import json
import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[3]
FIXTURES = ROOT / "tests" / "fixtures"
WEIGHTS = str(FIXTURES / "golden" / "weights")
MODEL = FIXTURES / "models" / "digits_cnn_w32.safetensors"


def init(rank, world, port):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=30),
    )
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


def local_rows(full, rank, world):
    """torch.chunk's (and FSDP2's) rows of ``full`` for ``rank``: empty past the last chunk."""
    chunks = torch.chunk(full, world, dim=0)
    if rank < len(chunks):
        return chunks[rank].contiguous()
    return full.new_zeros((0, *full.shape[1:]))


def dtensor(full, mesh, rank, world):
    """``full`` as a DTensor sharded on dim 0 (uneven), or replicated when 0-d."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if full.dim() == 0:
        return DTensor.from_local(full.clone(), mesh, [Replicate()], run_check=False)
    return DTensor.from_local(
        local_rows(full, rank, world), mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride()
    )


def load_model_case():
    from safetensors import safe_open

    with safe_open(str(MODEL), "pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    params_meta = json.loads(meta["params"])
    shapes = {p["name"]: p["shape"] for p in params_meta}
    t = {k: v.reshape(shapes[k.rsplit(".", 1)[0]]) for k, v in t.items()}
    return meta, params_meta, t


def holder(shapes, make):
    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ps = torch.nn.ParameterDict({n.replace(".", "_"): torch.nn.Parameter(make(n, s)) for n, s in shapes.items()})

    return Holder()


def mulo_opt(params_meta, by_name, meta, **kw):
    from mulo.torch import MuLO

    return MuLO(
        [(n, by_name[n]) for n in by_name],
        lr=float(meta["lr"]),
        weight_decay=float(meta["weight_decay"]),
        max_grad_norm=float(meta["max_grad_norm"]),
        hf_key=WEIGHTS,
        factored_axes={by_name[p["name"]]: tuple(p["factored_axes"]) for p in params_meta if p["factored_axes"]},
        **kw,
    )


def golden(mesh, rank, world, out):
    """The whole-model golden case (μP CNN trained by PyLO's MuLO_naive) as DTensors sharded on
    dim 0 over ``world`` ranks (the 0-d gain replicated), through ``mulo.torch.MuLO`` with μP
    from mup: 20 steps against the single-process step and PyLO; a checkpoint at step 10
    resumed bitwise; a NaN in one rank's shard skipped by every rank."""
    import mup

    meta, params_meta, t = load_model_case()
    shapes = {p["name"]: p["shape"] for p in params_meta}
    base = {p["name"]: [b if b is not None else d for b, d in zip(p["base_shape"], p["shape"])] for p in params_meta}
    steps = int(meta["steps"])

    def sharded_model():
        m = holder(shapes, lambda n, s: dtensor(t[n + ".p0"].clone(), mesh, rank, world))
        mup.set_base_shapes(m, holder(base, lambda n, s: torch.zeros(s)))
        return m, {n: m.ps[n.replace(".", "_")] for n in shapes}

    def set_grads(by_name, step, poison=None):
        for n, p in by_name.items():
            g = t[f"{n}.g{step}"].clone()
            p.grad = dtensor(g, mesh, rank, world)
            if poison == n:
                p.grad.to_local().view(-1)[0] = float("nan")

    # Single-process reference on the full tensors (every rank computes it alike).
    ref = holder(shapes, lambda n, s: t[n + ".p0"].clone())
    mup.set_base_shapes(ref, holder(base, lambda n, s: torch.zeros(s)))
    ref_by = {n: ref.ps[n.replace(".", "_")] for n in shapes}
    ref_opt = mulo_opt(params_meta, ref_by, meta, backend="interp")

    model, by_name = sharded_model()
    opt = mulo_opt(params_meta, by_name, meta)
    disp = {n: float((t[f"{n}.p{steps}"] - t[f"{n}.p0"]).abs().max()) for n in shapes}
    vs_ref = {n: 0.0 for n in shapes}
    vs_pylo = {n: 0.0 for n in shapes}
    bitwise = True
    collectives = []
    bytes_ = []
    saved = None
    step_times = []
    comm_times = []
    for step in range(1, steps + 1):
        for n, p in ref_by.items():
            p.grad = t[f"{n}.g{step}"].clone()
        ref_opt.step()
        set_grads(by_name, step)
        dist.barrier()
        t0 = time.perf_counter()
        opt.step()
        step_times.append(time.perf_counter() - t0)
        collectives.append(opt._sharded.last_collectives)
        comm_times.append(opt._sharded.last_comm_seconds)
        bytes_.append(opt._sharded.last_bytes)
        assert not opt.last_report.get("skipped"), opt.last_report
        for n, p in by_name.items():
            full = p.full_tensor().detach()
            want = ref_by[n].detach()
            vs_ref[n] = max(vs_ref[n], float((full - want).abs().max()) / disp[n])
            vs_pylo[n] = max(vs_pylo[n], float((full - t[f"{n}.p{step}"]).abs().max()) / disp[n])
            bitwise &= bool(torch.equal(full, want))
        if step == 10:
            buf = io.BytesIO()
            torch.save({"opt": opt.state_dict(), "params": {n: p.to_local().clone() for n, p in by_name.items()}}, buf)
            saved = buf.getvalue()
    # The same step's all-reduces alone, the ranks in step (a barrier first): gloo's latency
    # for these buffer sizes, without the waiting for the slowest rank that the step includes.
    sizes = [b // 8 for b in opt._sharded.last_round_bytes]
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(10):
        for n in sizes:
            dist.all_reduce(torch.zeros(n, dtype=torch.float64))
    gloo_step = (time.perf_counter() - t0) / 10
    final = {n: p.to_local().clone() for n, p in by_name.items()}
    final_state = opt.state_dict()
    assert all(g["step"] == steps for g in opt.param_groups)

    # Resume from the step-10 checkpoint into a fresh model and optimizer: bitwise the same.
    ck = torch.load(io.BytesIO(saved), weights_only=False)
    model2, by2 = sharded_model()
    with torch.no_grad():
        for n, p in by2.items():
            p.to_local().copy_(ck["params"][n])
    opt2 = mulo_opt(params_meta, by2, meta)
    opt2.load_state_dict(ck["opt"])
    for step in range(11, steps + 1):
        set_grads(by2, step)
        opt2.step()
    resumed_bitwise = all(torch.equal(by2[n].to_local(), final[n]) for n in shapes)
    s2 = opt2.state_dict()
    for i, st in final_state["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, s2["state"][i][k]), (i, k)
            else:
                assert v == s2["state"][i][k], (i, k)

    # A NaN in the last rank's shard of one tensor: every rank skips it; nothing diverges.
    victim = "conv2.weight" if "conv2.weight" in shapes else next(n for n in shapes if len(shapes[n]) == 4)
    model3, by3 = sharded_model()
    opt3 = mulo_opt(params_meta, by3, meta)
    set_grads(by3, 1, poison=victim if rank == world - 1 else None)
    opt3.step()
    skipped = list(opt3.last_report.get("skipped", []))
    unchanged = torch.equal(by3[victim].full_tensor(), t[f"{victim}.p0"])
    set_grads(by3, 2)
    opt3.step()  # the next step steps every tensor again, on every rank
    after = {n: by3[n].full_tensor() for n in shapes}
    finite = all(bool(torch.isfinite(v).all()) for v in after.values())
    victim_state = opt3.state_dict()

    torch.save(
        dict(
            vs_ref=vs_ref,
            vs_pylo=vs_pylo,
            bitwise=bitwise,
            collectives=collectives,
            bytes=bytes_,
            step_times=step_times,
            comm_times=comm_times,
            gloo_step=gloo_step,
            round_values=sizes,
            resumed_bitwise=resumed_bitwise,
            skipped=skipped,
            victim=victim,
            victim_unchanged=unchanged,
            second_step_report=dict(opt3.last_report),
            finite=finite,
            steps=[g["step"] for g in victim_state["param_groups"]],
        ),
        os.path.join(out, f"golden{rank}.pt"),
    )


def staged_copies(mesh, rank, world, out):
    """The golden model with local shards that are not contiguous CPU tensors (column-major
    strided views; CUDA shards under FSDP2 with NCCL take the same path): the sharded step
    stages them through host copies and writes them back. 5 steps, then one with a NaN: every
    parameter and state tensor bitwise equal to the same model with contiguous shards, and
    the poisoned step leaves the strided shards as they were."""
    from torch.distributed.tensor import DTensor

    import mup

    meta, params_meta, t = load_model_case()
    shapes = {p["name"]: p["shape"] for p in params_meta}
    base = {p["name"]: [b if b is not None else d for b, d in zip(p["base_shape"], p["shape"])] for p in params_meta}

    def sharded(full, strided):
        d = dtensor(full, mesh, rank, world)
        if not strided or d.dim() < 2:
            return d
        local = d.to_local()
        # The same values in column-major order: a non-contiguous local shard.
        flipped = local.reshape(local.shape[0], -1).t().contiguous().t().reshape(local.shape)
        return DTensor.from_local(flipped, mesh, d.placements, run_check=False, shape=d.shape, stride=d.stride())

    def model(strided):
        m = holder(shapes, lambda n, s: sharded(t[n + ".p0"].clone(), strided))
        mup.set_base_shapes(m, holder(base, lambda n, s: torch.zeros(s)))
        return m, {n: m.ps[n.replace(".", "_")] for n in shapes}

    def set_grads(by_name, step, strided, poison=None):
        for n, p in by_name.items():
            g = sharded(t[f"{n}.g{step}"].clone(), strided)
            local = g.to_local()
            if poison == n and local.numel() > 0:
                local[(0,) * local.dim()] = float("nan")
            p.grad = g

    ref_model, ref_by = model(False)
    ref_opt = mulo_opt(params_meta, ref_by, meta)
    st_model, st_by = model(True)
    st_opt = mulo_opt(params_meta, st_by, meta)
    noncontiguous = sorted(n for n, p in st_by.items() if not p.to_local().is_contiguous())
    for step in range(1, 6):
        set_grads(ref_by, step, False)
        ref_opt.step()
        set_grads(st_by, step, True)
        st_opt.step()
    same_params = all(torch.equal(st_by[n].to_local(), ref_by[n].to_local()) for n in shapes)
    still_strided = sorted(n for n, p in st_by.items() if not p.to_local().is_contiguous())
    a, b = ref_opt.state_dict()["state"], st_opt.state_dict()["state"]
    same_state = all(
        torch.equal(v, b[i][k]) if isinstance(v, torch.Tensor) else v == b[i][k]
        for i, st in a.items()
        for k, v in st.items()
    )
    # A NaN in one strided shard on the last rank: skipped everywhere, the shard unchanged.
    victim = noncontiguous[0] if noncontiguous else next(iter(shapes))
    before = {n: p.to_local().clone() for n, p in st_by.items()}
    set_grads(st_by, 6, True, poison=victim if rank == world - 1 else None)
    st_opt.step()
    torch.save(
        dict(
            noncontiguous=noncontiguous,
            still_strided=still_strided,
            same_params=same_params,
            same_state=same_state,
            skipped=list(st_opt.last_report.get("skipped", [])),
            victim=victim,
            victim_unchanged=torch.equal(st_by[victim].to_local(), before[victim]),
            others_stepped=all(
                not torch.equal(p.to_local(), before[n]) for n, p in st_by.items() if n != victim and p.to_local().numel()
            ),
        ),
        os.path.join(out, f"staged{rank}.pt"),
    )


def mismatch(mesh, rank, world, out):
    """Rank 1 declares another whole shape for one tensor: every rank gets the same clear error
    (no hang, nothing stepped)."""
    from torch.distributed.tensor import DTensor, Shard

    from mulo.torch import AdafacLO

    cols = 5 if rank == 0 else 6
    full = torch.ones(7, cols)
    p = torch.nn.Parameter(dtensor(full, mesh, rank, world))
    q = torch.nn.Parameter(dtensor(torch.ones(4), mesh, rank, world))
    opt = AdafacLO([p, q], lr=0.1, hf_key=WEIGHTS)
    p.grad = dtensor(torch.full((7, cols), 0.01), mesh, rank, world)
    q.grad = dtensor(torch.full((4,), 0.01), mesh, rank, world)
    before = p.to_local().clone()
    err = None
    try:
        opt.step()
    except ValueError as e:
        err = str(e)
    torch.save(dict(error=err, unchanged=torch.equal(p.to_local(), before)), os.path.join(out, f"mismatch{rank}.pt"))


def fsdp2(mesh, rank, world, out):
    """End to end: an MLP wrapped by FSDP2's ``fully_shard`` (uneven shards) trained with
    ``mulo.torch.AdafacLO`` on the same batches as a single-process copy."""
    from torch.distributed.fsdp import fully_shard

    from mulo.torch import AdafacLO

    torch.manual_seed(0)

    def make():
        torch.manual_seed(0)
        # 23, 5 and 2 rows over 3 ranks: 8/8/7, 2/2/1 and 1/1/0 (an empty shard).
        return torch.nn.Sequential(
            torch.nn.Linear(16, 23), torch.nn.Tanh(), torch.nn.Linear(23, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)
        )

    ref = make()
    model = make()
    fully_shard(model)
    opt = AdafacLO(model.parameters(), lr=1.0, weight_decay=1e-3, hf_key="demo")
    ref_opt = AdafacLO(ref.parameters(), lr=1.0, weight_decay=1e-3, hf_key="demo", backend="interp")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=gen)
    y = torch.randint(0, 2, (64,), generator=gen)
    p0 = [p.detach().clone() for p in ref.parameters()]
    losses, ref_losses = [], []
    # A second single-process copy stepped with FSDP2's own gradients (gathered): the optimizer
    # alone, without the rounding of FSDP2's gradient average.
    same = make()
    same_opt = AdafacLO(same.parameters(), lr=1.0, weight_decay=1e-3, hf_key="demo", backend="interp")
    same_errs = [0.0] * len(p0)
    same_bitwise = True
    for _ in range(10):
        for m, o, log in ((model, opt, losses), (ref, ref_opt, ref_losses)):
            o.zero_grad()
            loss = torch.nn.functional.cross_entropy(m(x), y)
            loss.backward()
            if m is model:
                for q, p in zip(same.parameters(), model.parameters()):
                    q.grad = p.grad.full_tensor().detach().clone()
            o.step()
            log.append(float(loss.detach()))
        same_opt.step()
        for i, (p, q, a) in enumerate(zip(model.parameters(), same.parameters(), p0)):
            full = p.full_tensor().detach()
            disp = max(float((q.detach() - a).abs().max()), 1e-30)
            same_errs[i] = max(same_errs[i], float((full - q.detach()).abs().max()) / disp)
            same_bitwise &= bool(torch.equal(full, q.detach()))
    errs = []
    for p, q, a in zip(model.parameters(), ref.parameters(), p0):
        full = p.full_tensor().detach()
        disp = float((q.detach() - a).abs().max())
        errs.append(float((full - q.detach()).abs().max()) / disp)
    torch.save(
        dict(losses=losses, ref_losses=ref_losses, errs=errs, same_errs=same_errs, same_bitwise=same_bitwise, local_shapes=[tuple(p.to_local().shape) for p in model.parameters()]),
        os.path.join(out, f"fsdp2{rank}.pt"),
    )


def refusals(mesh, rank, world, out):
    """Every refusal cause of the sharded step, applied alike on every rank to the first, the
    middle and the last of 3 parameter groups (a NaN gradient only in rank 0's shard, with
    nonfinite='error'), and a load of bf16 state in the last group: each must raise, and leave
    every local parameter, gradient, state tensor and group ``step`` bitwise as they were."""
    from mulo.torch import AdafacLO

    torch.manual_seed(7)
    fulls = [(torch.randn(6 + gi, 5), torch.randn(4 + gi)) for gi in range(3)]
    groups = []
    for gi, (w, b) in enumerate(fulls):
        named = [(f"w{gi}", torch.nn.Parameter(dtensor(w, mesh, rank, world))), (f"b{gi}", torch.nn.Parameter(dtensor(b, mesh, rank, world)))]
        groups.append({"params": named, "lr": 0.1 * (gi + 1), "weight_decay": 0.01 * gi})
    opt = AdafacLO(groups, hf_key=WEIGHTS, nonfinite="error")
    params = [p for g in opt.param_groups for p in g["params"]]
    gen = torch.Generator().manual_seed(8)  # the same gradients on every rank

    def new_grads():
        for p in params:
            p.grad = dtensor(torch.randn(tuple(p.shape), generator=gen), mesh, rank, world)

    for _ in range(2):
        new_grads()
        opt.step()
    new_grads()

    def snapshot():
        sd = opt.state_dict()
        state = {(i, k): (v.clone() if isinstance(v, torch.Tensor) else v) for i, st in sd["state"].items() for k, v in st.items()}
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
        tensors = [(p.to_local().clone(), p.grad.to_local().clone()) for p in params]
        return state, hyper, tensors

    def same(a, b):
        if a[0].keys() != b[0].keys() or a[1] != b[1]:
            return False
        for k in a[0]:
            x, y = a[0][k], b[0][k]
            if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
                return False
            if isinstance(x, torch.Tensor) and not (x.dtype == y.dtype and torch.equal(x, y)):
                return False
            if not isinstance(x, torch.Tensor) and x != y:
                return False
        return all(torch.equal(p, q) and torch.equal(g, h) for (p, g), (q, h) in zip(a[2], b[2]))

    def hyper(key, value):
        def cause(gi):
            group = opt.param_groups[gi]
            old = group[key]
            group[key] = value
            return lambda: group.__setitem__(key, old)

        return cause

    def grad_is_param(gi):
        p = opt.param_groups[gi]["params"][0]
        old = p.grad
        p.grad = p.detach()
        return lambda: setattr(p, "grad", old)

    def nan_on_rank0(gi):
        p = opt.param_groups[gi]["params"][0]
        old = p.grad
        p.grad = dtensor(old.full_tensor().clone(), mesh, rank, world)
        if rank == 0:
            p.grad.to_local().view(-1)[0] = float("nan")
        return lambda: setattr(p, "grad", old)

    causes = {
        "lr=1e39": hyper("lr", 1e39),
        "lr=True": hyper("lr", True),
        "weight_decay=nan": hyper("weight_decay", float("nan")),
        "max_grad_norm=1e39": hyper("max_grad_norm", 1e39),
        "grad is the param": grad_is_param,
        "nan gradient on rank 0 (nonfinite='error')": nan_on_rank0,
    }
    results = []
    for name, cause in causes.items():
        for gi in (0, 1, 2):
            before = snapshot()
            undo = cause(gi)
            err = None
            try:
                opt.step()
            except ValueError as e:
                err = str(e)
            undo()
            results.append((name, gi, err, same(before, snapshot())))
    # A refused load (bf16 state in the last group) changes nothing either.
    saved = opt.state_dict()
    bad = {"state": {i: dict(st) for i, st in saved["state"].items()}, "param_groups": saved["param_groups"]}
    index = bad["param_groups"][-1]["params"][0]
    bad["state"][index]["mom"] = bad["state"][index]["mom"].bfloat16()
    before = snapshot()
    err = None
    try:
        opt.load_state_dict(bad)
    except ValueError as e:
        err = str(e)
    results.append(("load bf16 mom", 2, err, same(before, snapshot())))
    # A deep copy is refused at copy time (not a broken copy).
    import copy

    try:
        copy.deepcopy(opt)
        copy_error = None
    except TypeError as e:
        copy_error = str(e)
    # Still steps.
    opt.step()
    torch.save(
        dict(results=results, step=[g["step"] for g in opt.param_groups], copy_error=copy_error),
        os.path.join(out, f"refusals{rank}.pt"),
    )


def finish():
    """Leaves a rank whose checks all passed and whose results are written.

    Every rank waits for the others, destroys the process group and then leaves with
    ``os._exit(0)``, skipping the interpreter's and C++'s static teardown. A normal exit runs
    torch's and gloo's static destructors, and whether one of their threads is still joinable then
    is a race: CI once saw a rank end in ``terminate called without an active exception``
    (SIGABRT) with its results already written. Failures inside the checks still raise (torch
    records them for the parent), and ``faulthandler`` prints the Python stack of any rank that
    dies by a signal before this point."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def two_ranks(rank, world, port, out):
    """One process group for the 2-process checks (one spawn: process start-up is most of the
    time): the mismatched layouts, refused steps and loads, strided shards staged through host
    copies, then the golden model."""
    faulthandler.enable()
    mesh = init(rank, world, port)
    mismatch(mesh, rank, world, out)
    refusals(mesh, rank, world, out)
    staged_copies(mesh, rank, world, out)
    golden(mesh, rank, world, out)
    finish()


def three_ranks(rank, world, port, out):
    """The 3-process checks: FSDP2 end to end, then the golden model."""
    faulthandler.enable()
    mesh = init(rank, world, port)
    fsdp2(mesh, rank, world, out)
    golden(mesh, rank, world, out)
    finish()
