"""mulo.torch on CUDA tensors: the packed CUDA program stepping torch's tensors in place.

What runs everywhere: the program and its manifest built for a group's layouts (no GPU, no
NVRTC), the state conversion the CUDA path's state_dict uses, the argument checks, and the
Python side of the CUDA path (policies, addresses, state tensors, counters) on CPU tensors with
the loaded program replaced by a host stepper, against the CPU optimizer. The
program itself is verified without a GPU by the CPU emulation of the generated source
(`cargo test --test cuda_packed_emulated pointer_mode`: tensors in separate allocations, the
table pointing at them, the whole-model golden replay). What needs a GPU is skipped here with
the reason printed (`pytest -rs`).
"""

import ctypes
import io
import json
import math
import types

import pytest
import torch

from mulo._native import CudaModel, Group, LearnedOptimizer, state_from_pylo, state_to_pylo
from mulo.torch import AdafacLO, MuLO, _CudaGroup, _CudaProgram, pylo_factored_axes
from test_torch import (
    TOL,
    WEIGHTS,
    assert_same_state,
    build_mup_model,
    load_model_case,
    rel_err,
    state_of,
)

NO_GPU = "no CUDA device (torch.cuda.is_available() is false): the packed CUDA program is verified in emulation only (cargo test --test cuda_packed_emulated)"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)


# ------------------------------------------------------------------ without a GPU


def test_one_program_per_group_for_the_groups_layouts():
    lopt = LearnedOptimizer.load("demo")
    shapes = [[64, 32], [32], [64, 32], [16, 8, 3, 3], [], [32, 64]]
    axes = [pylo_factored_axes(s) for s in shapes]
    model = CudaModel(lopt, shapes, axes)
    assert model.n_tensors == 6
    # Distinct layouts: 64x32, 32, 16x8x3x3, scalar, 32x64 (the repeated 64x32 shares its plan).
    assert model.n_plans == 5
    # A step is a fixed number of launches, whatever the number of tensors.
    many = CudaModel(lopt, shapes * 20, axes * 20)
    # (3 element passes, and between them the small kernels of 2 stages.)
    assert many.slots == model.slots
    assert sum("_elem_" in s for s in model.slots) == 3 and len(model.slots) >= 5
    # The state torch allocates for each tensor, decay-major.
    assert model.state_buffers(0) == [("mom", [3, 64, 32]), ("rms", [64, 32]), ("fac_row", [3, 32]), ("fac_col", [3, 64])]
    assert model.state_buffers(1) == [("mom", [3, 32]), ("rms", [32]), ("fac_v", [3, 32])]
    # A 0-d tensor is stepped as one element.
    assert model.state_buffers(4) == [("mom", [3, 1]), ("rms", [1]), ("fac_v", [3, 1])]
    with pytest.raises(ValueError, match="no tensor 6"):
        model.state_buffers(6)
    manifest = json.loads(model.manifest_json("sm_90"))
    assert manifest["format_version"] == 4
    # Whole tensors (not a rank's shards): one stage, no round buffer.
    assert manifest["stages"] == 1 and not any("round" in a["name"] for a in manifest["arenas"])
    # The weights the PTX declares without values, one array per distinct matrix.
    assert manifest["constants"] and all(len(c["hex"]) == 8 * c["len"] for c in manifest["constants"])
    assert len({c["name"] for c in manifest["constants"]}) == len(manifest["constants"])
    assert [t["shape"] for t in manifest["tensors"]] == shapes
    for t, a in zip(manifest["tensors"], axes):
        assert (t["factored"] and (t["factored"]["d0"], t["factored"]["d1"])) == (a or None)
    fields = {f["name"]: f for f in manifest["table_fields"]}
    for name in ("param", "grad", "mom", "rms", "fac_row", "fac_col", "fac_v"):
        assert fields[name]["dtype"] == "ptr"
    src = model.source()
    for slot in model.slots:
        assert f"{slot}(const MuloTensor* __restrict__ tensors" in src
    # Axes as given (a tied kernel's override), refused when invalid.
    assert CudaModel(lopt, [[8, 8, 3, 3]], [(1, 0)]).state_buffers(0)[2] == ("fac_row", [3, 8, 3, 3])
    with pytest.raises(ValueError, match="tensor 0"):
        CudaModel(lopt, [[8, 4]], [(0, 0)])


def test_state_conversion_of_the_cuda_path_is_pylos_layout():
    """The CUDA path keeps state decay-major on the device and converts it for state_dict with
    state_to_pylo / state_from_pylo: they must give exactly the CPU path's PyLO tensors."""
    torch.manual_seed(3)
    a = torch.nn.Parameter(torch.randn(6, 4))
    b = torch.nn.Parameter(torch.randn(5))
    c = torch.nn.Parameter(torch.randn(()))
    opt = AdafacLO([a, b, c], lr=0.1, hf_key="demo")
    for _ in range(3):
        for p in (a, b, c):
            p.grad = torch.randn(p.shape)
        opt.step()
    sd = opt.state_dict()["state"]
    for i, p in enumerate((a, b, c)):
        st = sd[i]
        axes = pylo_factored_axes(tuple(p.shape))
        given = [
            (k, list(v.shape), v.contiguous().numpy().tobytes())
            for k, v in st.items()
            if k != "factored_axes" and v.numel()
        ]
        canonical = state_from_pylo(list(p.shape), axes, given)
        names = [n for n, _ in canonical]
        assert names == [n for n, _ in CudaModel(opt.lopt, [list(p.shape)], [axes]).state_buffers(0)]
        mom = torch.frombuffer(bytearray(dict(canonical)["mom"]), dtype=torch.float32)
        assert torch.equal(mom.reshape((3,) + tuple(p.shape)), st["mom"].movedim(-1, 0))
        back = state_to_pylo(list(p.shape), axes, canonical)
        for name, shape, data in back:
            got = torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(shape)
            assert torch.equal(got, st[name]), (i, name)
    with pytest.raises(ValueError, match="`rms`: missing from the PyLO state of a 6x4 tensor"):
        state_from_pylo([6, 4], (0, 1), [("mom", [6, 4, 3], bytes(4 * 72))])
    with pytest.raises(ValueError, match="`mom`: shape \\[6, 4\\] does not hold 288 bytes"):
        state_from_pylo([6, 4], (0, 1), [("mom", [6, 4], bytes(4 * 72))])


def test_backend_choice_is_checked():
    p = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match="backend='gpu'"):
        AdafacLO([p], hf_key="demo", backend="gpu")
    # backend="cuda" with CPU tensors: refused at the step, nothing changes.
    opt = AdafacLO([("p", p)], hf_key="demo", backend="cuda")
    p.grad = torch.randn(4, 3)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="`p` is on cpu: backend='cuda' steps CUDA tensors"):
        opt.step()
    assert torch.equal(p, before) and opt.state_dict()["state"] == {}
    # A device mulo does not step.
    q = torch.nn.Parameter(torch.empty(4, 3, device="meta"))
    opt = AdafacLO([("q", q)], hf_key="demo")
    q.grad = torch.empty(4, 3, device="meta")
    with pytest.raises(ValueError, match="`q` is on meta: mulo steps CPU and CUDA tensors"):
        opt.step()


class HostPointerStepper:
    """Stands in for the loaded program (``CudaStepper.step``) on host memory: reads each
    stepped tensor's parameter, gradient and state at the addresses the CUDA path passes, steps
    it with mulo's native CPU backend and writes parameter and state back there. Records the
    addresses, so a test can check they are the torch tensors' own (no copies)."""

    def __init__(self, lopt, shapes, axes, model):
        self.lopt, self.shapes, self.axes, self.model = lopt, shapes, axes, model
        self.calls = []

    def step(self, stream, addrs, hypers, steps):
        self.calls.append((stream, list(addrs), list(hypers), list(steps)))
        assert len(addrs) == 7 * len(self.shapes)
        for i, h in enumerate(hypers):
            if h is None:
                assert addrs[7 * i:7 * i + 7] == [0] * 7
                continue
            a = addrs[7 * i:7 * i + 7]
            shape, axes = list(self.shapes[i]), self.axes[i]
            n = math.prod(shape)
            bufs = self.model.state_buffers(i)
            assert a[2 + len(bufs):] == [0] * (5 - len(bufs))
            state = [(name, ctypes.string_at(a[2 + k], 4 * math.prod(shp))) for k, (name, shp) in enumerate(bufs)]
            g = Group(self.lopt, ["t"], [shape], [axes], None, "error", False, "cpu")
            g.set_step_count(steps[i])
            pylo = state_to_pylo(shape, axes, state)
            keep = [torch.frombuffer(bytearray(d), dtype=torch.float32) for _, _, d in pylo]
            g.import_state(0, [(nm, shp, (t.data_ptr(), t.numel())) for (nm, shp, _), t in zip(pylo, keep)])
            g.step([a[0], n], [a[1], n], h[0], h[1])
            back = [(nm, shp, bytes(d)) for nm, shp, d in g.export_state(0)]
            for k, (name, data) in enumerate(state_from_pylo(shape, axes, back)):
                assert name == bufs[k][0]
                ctypes.memmove(a[2 + k], bytes(data), len(data))


def test_cuda_path_on_host_memory_is_the_cpu_optimizer(monkeypatch):
    """The Python side of the CUDA path (_CudaProgram shared by two groups, _CudaGroup:
    policies, addresses, state tensors, step counters, state export), run on CPU tensors with
    the program replaced by HostPointerStepper: bitwise the CPU optimizer, parameters and
    state, step after step, with a NaN gradient skipped and a tensor without gradient; the
    addresses passed are the parameters' and state tensors' own."""
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=1234))
    torch.manual_seed(7)
    shapes = [(6, 4), (5,), (), (4, 3, 3, 2)]
    axes = [pylo_factored_axes(s) for s in shapes]
    names = [f"t{i}" for i in range(len(shapes))]
    lopt = LearnedOptimizer.load(WEIGHTS)
    init = [torch.randn(s) for s in shapes]
    # Two groups, tensors 0-1 and 2-3, one program.
    cpu = torch.device("cpu")
    program = _CudaProgram(lopt, {0: (shapes[:2], axes[:2]), 1: (shapes[2:], axes[2:])}, cpu)
    stepper = program._stepper = HostPointerStepper(lopt, shapes, axes, program.model)
    hyper = [(0.2, 0.01), (0.5, 0.0)]
    groups = [
        _CudaGroup(lopt, names[2 * k:2 * k + 2], shapes[2 * k:2 * k + 2], axes[2 * k:2 * k + 2], None, "skip", True, cpu, program, k)
        for k in range(2)
    ]
    params = [x.clone() for x in init]
    ref = [torch.nn.Parameter(x.clone()) for x in init]
    opt = AdafacLO(
        [
            {"params": list(zip(names[:2], ref[:2]))},
            {"params": list(zip(names[2:], ref[2:])), "lr": 0.5, "weight_decay": 0.0},
        ],
        lr=0.2, weight_decay=0.01, hf_key=lopt, backend="cpu",
    )
    for step in range(4):
        grads = [torch.randn(s) for s in shapes]
        if step == 2:
            grads[1][3] = float("nan")
        if step == 1:
            grads[3] = None
        reports = []
        for k, g in enumerate(groups):
            mine = grads[2 * k:2 * k + 2]
            reports.append(g.step(params[2 * k:2 * k + 2], [None if x is None else x.clone() for x in mine], *hyper[k]))
            _, addrs, hypers, steps = stepper.calls[-1]
            assert len(hypers) == 4 and steps == [step] * 4
            for i in range(4):
                if i // 2 != k:
                    assert hypers[i] is None  # the other group's tensors are not stepped
                elif hypers[i] is not None:
                    j = i - 2 * k
                    assert hypers[i] == hyper[k]
                    assert addrs[7 * i] == params[i].data_ptr()
                    own = [t.data_ptr() for t in g.state[j].values()]
                    assert addrs[7 * i + 2:7 * i + 2 + len(own)] == own
        for p, g in zip(ref, grads):
            p.grad = None if g is None else g.clone()
        opt.step()
        for key in ("skipped", "without_grad", "sanitized", "reverted"):
            assert reports[0][key] + reports[1][key] == opt.last_report.get(key, []), (step, key)
        assert [g.step_count for g in groups] == [g["step"] for g in opt.param_groups] == [step + 1] * 2
        for i, (a, b) in enumerate(zip(params, ref)):
            assert torch.equal(a, b.detach()), (step, i)
    assert stepper.calls[4][2][1] is None and stepper.calls[3][2][3] is None
    sd = opt.state_dict()["state"]
    for i in range(len(shapes)):
        for name, shape, data in groups[i // 2].export_state(i % 2):
            got = torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(shape)
            assert torch.equal(got, sd[i][name]), (i, name)
    # nonfinite="error": refused before the program is called, nothing changes.
    group = groups[0]
    group.nonfinite = "error"
    calls, before = len(stepper.calls), [p.clone() for p in params]
    bad = [torch.randn(s) for s in shapes[:2]]
    bad[0][0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite gradient in `t0` \\(0 NaN, 1 \\+Inf, 0 -Inf\\)"):
        group.step(params[:2], bad, 0.2, 0.01)
    assert len(stepper.calls) == calls and group.step_count == 4
    assert all(torch.equal(a, b) for a, b in zip(params, before))


def test_cuda_path_clipping_and_zero_policy_on_host_memory(monkeypatch):
    """Clipping (the norm in f64 by torch) and nonfinite="zero" on the CUDA path's Python side
    agree with the CPU optimizer's (Rust) within rounding of the norm."""
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    torch.manual_seed(8)
    shapes = [(6, 4), (5,), ()]
    axes = [pylo_factored_axes(s) for s in shapes]
    names = [f"t{i}" for i in range(len(shapes))]
    lopt = LearnedOptimizer.load(WEIGHTS)
    init = [torch.randn(s) for s in shapes]
    group = _CudaGroup(lopt, names, shapes, axes, 0.5, "zero", True, torch.device("cpu"))
    group.program._stepper = HostPointerStepper(lopt, shapes, axes, group.program.model)
    params = [x.clone() for x in init]
    ref = [torch.nn.Parameter(x.clone()) for x in init]
    opt = AdafacLO(list(zip(names, ref)), lr=0.2, max_grad_norm=0.5, nonfinite="zero", hf_key=lopt, backend="cpu")
    for step in range(3):
        grads = [3 * torch.randn(s) for s in shapes]
        if step == 1:
            grads[0][2, 1] = float("nan")
            grads[1][0] = float("-inf")
        kept = [g.clone() for g in grads]
        report = group.step(params, grads, 0.2, 0.0)
        bits = lambda t: t.reshape(-1).view(torch.int32)  # noqa: E731 (NaN-safe equality)
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(grads, kept)), "the gradients are not modified"
        for p, g in zip(ref, kept):
            p.grad = g
        opt.step()
        assert report["sanitized"] == opt.last_report.get("sanitized", [])
        assert [n for n, _ in report["clipped"]] == [n for n, _ in opt.last_report["clipped"]]
        for (_, a), (_, b) in zip(report["clipped"], opt.last_report["clipped"]):
            assert a == pytest.approx(b, rel=1e-12)
    for i, (a, b, x) in enumerate(zip(params, ref, init)):
        disp = float((b.detach() - x).abs().max())
        assert rel_err(a, b.detach(), disp) <= 1e-6, i


# ---------------------------------------------------------------------- on a GPU


@gpu
def test_cuda_whole_model_golden_replay_through_mulo_with_mup():
    meta, params_meta, t = load_model_case()
    model = build_mup_model(params_meta, t).cuda()
    by_name = {p["name"]: model.ps[p["name"].replace(".", "_")] for p in params_meta}
    opt = MuLO(
        [(n, by_name[n]) for n in by_name],
        lr=float(meta["lr"]),
        weight_decay=float(meta["weight_decay"]),
        max_grad_norm=float(meta["max_grad_norm"]),
        hf_key=WEIGHTS,
        factored_axes={by_name[p["name"]]: tuple(p["factored_axes"]) for p in params_meta if p["factored_axes"]},
    )
    steps = int(meta["steps"])
    for step in range(1, steps + 1):
        for name, p in by_name.items():
            p.grad = t[f"{name}.g{step}"].cuda()
        opt.step()
        for name, p in by_name.items():
            disp = float((t[f"{name}.p{steps}"] - t[f"{name}.p0"]).abs().max())
            err = rel_err(p.detach().cpu(), t[f"{name}.p{step}"], disp)
            assert err <= TOL, f"{name} at step {step}: {err:.3g} of the displacement"
    assert all(rt.native.target == "cuda" for rt in opt._rt)


@gpu
def test_cuda_state_dict_round_trip_resumes_bitwise_and_matches_the_cpu_state():
    torch.manual_seed(5)
    shapes = [(32, 16), (16,), (), (8, 4, 3, 3)]
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(6)]
    params = [torch.nn.Parameter(x.cuda()) for x in init]
    kwargs = dict(lr=0.2, weight_decay=1e-3, max_grad_norm=3.0, hf_key="demo")
    opt = AdafacLO(params, **kwargs)
    for k in range(3):
        for p, g in zip(params, grads[k]):
            p.grad = g.cuda()
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = AdafacLO(twin, **kwargs)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=False))
    assert_same_state(state_of(opt), state_of(opt2))
    for k in range(3, 6):
        for ps in (params, twin):
            for p, g in zip(ps, grads[k]):
                p.grad = g.cuda()
        opt.step()
        opt2.step()
        for a, b in zip(params, twin):
            assert torch.equal(a, b), f"step {k}"
    # The same run on the CPU: within tolerance of the displacement.
    cpu = [torch.nn.Parameter(x.clone()) for x in init]
    opt3 = AdafacLO(cpu, **kwargs)
    for k in range(6):
        for p, g in zip(cpu, grads[k]):
            p.grad = g.clone()
        opt3.step()
    for a, b, x in zip(params, cpu, init):
        disp = float((b.detach() - x).abs().max())
        assert rel_err(a.detach().cpu(), b.detach(), disp) <= TOL


@gpu
def test_cuda_bad_inputs_are_refused_and_nothing_changes():
    torch.manual_seed(1)
    good = torch.nn.Parameter(torch.randn(8, 4, device="cuda"))
    other = torch.nn.Parameter(torch.randn(3, 5, device="cuda"))
    opt = AdafacLO([("good", good), ("other", other)], lr=0.1, hf_key="demo")
    good.grad, other.grad = torch.randn(8, 4, device="cuda"), torch.randn(3, 5, device="cuda")
    opt.step()

    def refused(match):
        before = [p.detach().clone() for p in (good, other)]
        state = state_of(opt)
        with pytest.raises(ValueError, match=match):
            opt.step()
        for p, b in zip((good, other), before):
            assert torch.equal(p.detach(), b)
        assert_same_state(state, state_of(opt))

    other.grad = torch.randn(5, 3, device="cuda").t()
    refused("`other`.*not contiguous")
    other.grad = torch.randn(3, 5, device="cuda")
    other.grad.data = other.grad.data.double()  # torch refuses assigning one; change it in place
    refused("`other`.*float64")
    other.grad = other.detach()  # the step would write what it reads
    refused("`other`.*overlaps `other.grad`|`other.grad`.*overlaps `other`")
    other.grad = torch.randn(3, 5, device="cuda")
    keep = other.data
    other.data = torch.randn(3, 5)  # moved to the CPU: mixed devices
    refused("`other` is on cpu, others on cuda:0 \\(mixed devices\\)")
    other.data = keep
    opt.step()


@gpu
def test_cuda_nonfinite_policies_and_streams():
    torch.manual_seed(2)
    a = torch.nn.Parameter(torch.randn(6, 4, device="cuda"))
    b = torch.nn.Parameter(torch.randn(7, device="cuda"))
    opt = AdafacLO([("a", a), ("b", b)], lr=0.1, hf_key="demo")
    a.grad, b.grad = torch.randn(6, 4, device="cuda"), torch.randn(7, device="cuda")
    b.grad[3] = float("nan")
    b0 = b.detach().clone()
    # On a side stream: the step is queued there, as torch's own optimizers are.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    assert opt.last_report["skipped"] == ["b"]
    assert torch.equal(b, b0) and torch.isfinite(a).all()
    opt = AdafacLO([("a", a), ("b", b)], lr=0.1, hf_key="demo", nonfinite="error")
    a0 = a.detach().clone()
    with pytest.raises(ValueError, match="non-finite gradient in `b`"):
        opt.step()
    assert torch.equal(a, a0)
    opt = AdafacLO([("a", a), ("b", b)], lr=0.1, hf_key="demo", nonfinite="zero")
    opt.step()
    assert opt.last_report["sanitized"] == ["b"] and torch.isfinite(b).all()


def test_one_program_for_all_groups():
    """MuLO splits a model into groups (one per width multiplier): the CUDA path compiles one
    program for all of them, built when the first group is; a group whose tensors changed gets
    a new one. (The program is only built here: compiling it needs a device.)"""
    a, b, c = (torch.nn.Parameter(torch.randn(s)) for s in [(8, 4), (4,), (3, 3)])
    opt = AdafacLO([{"params": [a, b]}, {"params": [c], "lr": 0.5}], hf_key="demo")
    cpu = torch.device("cpu")
    first = opt._cuda_program(0, [(8, 4), (4,)], [pylo_factored_axes((8, 4)), None], cpu)
    assert first.first == {0: 0, 1: 2} and first.model.n_tensors == 3 and first.model.n_plans == 3
    second = opt._cuda_program(1, [(3, 3)], [pylo_factored_axes((3, 3))], cpu)
    assert second is first
    other = opt._cuda_program(1, [(3, 3)], [(0, 1) if pylo_factored_axes((3, 3)) == (1, 0) else (1, 0)], cpu)
    assert other is not first and other.first == {0: 0, 1: 2}
