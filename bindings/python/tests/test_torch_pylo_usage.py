"""PyLO users' code unchanged with mulo.torch: ``step(loss)`` as PyLO's ``step(loss=None)``, and
bfloat16/float16 parameters and gradients on the CPU (issue 24).

The half-precision contract tested here: the state stays float32, and a half tensor's step is
bitwise the float32 step of its exactly upcast parameter and gradient, the parameter rounded
back to nearest-even once. The reference is a float32 optimizer stepping the upcast tensors.
"""

import copy
import inspect
import io
import pydoc
import re

import pytest
import torch

from mulo.torch import AdafacLO

SHAPES = [(12, 7), (5, 3, 4), (9,), ()]
HALF = [torch.bfloat16, torch.float16]


def _params(dtypes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(s, generator=g).to(dt)) for s, dt in zip(SHAPES, dtypes)
    ]


def _bits(t):
    """The tensor's raw bits, so that -0.0 and +0.0 (or NaN payloads) are told apart."""
    return t.detach().view({torch.float32: torch.int32}.get(t.dtype, torch.int16))


def _state(opt):
    return {
        (i, k): v.clone()
        for i, st in opt.state_dict()["state"].items()
        for k, v in st.items()
        if isinstance(v, torch.Tensor)
    }


# ------------------------------------------------------------------------ step(loss)


def _quadratic(seed=0):
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(6, 4))
    x = torch.randn(3, 4)
    return w, x


def test_step_returns_a_loss_tensor_or_number_as_given_and_steps_as_step():
    w, x = _quadratic()
    twin = torch.nn.Parameter(w.detach().clone())
    opt = AdafacLO([w], lr=0.1, hf_key="demo")
    ref = AdafacLO([twin], lr=0.1, hf_key="demo")
    for step in range(3):
        # PyLO's documented loop: loss.backward(), then optimizer.step(loss).
        opt.zero_grad()
        loss = (x @ w.t()).pow(2).sum()
        loss.backward()
        assert opt.step(loss) is loss
        assert loss.grad_fn is not None  # untouched: neither called nor detached
        ref.zero_grad()
        (x @ twin.t()).pow(2).sum().backward()
        assert ref.step() is None
        assert torch.equal(w, twin), step
    w.grad = torch.ones_like(w)
    assert opt.step(2.5) == 2.5
    assert opt.step(loss=7) == 7
    assert opt.param_groups[0]["step"] == 5


def test_step_calls_a_callable_as_torch_closure_with_grad_enabled():
    w, x = _quadratic()
    opt = AdafacLO([w], lr=0.1, hf_key="demo")
    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = (x @ w.t()).pow(2).sum()
        loss.backward()
        return loss

    w0 = w.detach().clone()
    with torch.no_grad():  # the closure gets gradients even so, as with torch's optimizers
        loss = opt.step(closure)
    assert seen == [True]
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert not torch.equal(w, w0)
    assert opt.step(closure=lambda: 1.5) == 1.5  # torch's keyword (Lightning calls it so)
    assert seen == [True]
    with pytest.raises(TypeError, match="not both"):
        opt.step(loss, closure=closure)
    assert seen == [True]


def test_pylo_resume_loop_with_step_loss_continues_bitwise():
    # The loop of PyLO's tests/test_optimizer_resume.py, written for this test: train with
    # step(loss), save, load into a fresh optimizer, continue; equal to an unbroken run.
    def run(resume_at=None, steps=4):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        opt = AdafacLO(model.parameters(), lr=0.01, hf_key="demo")
        data = [(torch.randn(5, 4), torch.randn(5, 2)) for _ in range(steps)]
        for i, (x, y) in enumerate(data):
            if i == resume_at:
                buf = io.BytesIO()
                torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
                buf.seek(0)
                saved = torch.load(buf)
                model = copy.deepcopy(model)
                model.load_state_dict(saved["model"])
                opt = AdafacLO(model.parameters(), lr=0.01, hf_key="demo")
                opt.load_state_dict(saved["opt"])
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step(loss)
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(), run(resume_at=2)):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------ half precision


def _stepped_pair(dtypes, **kw):
    """An optimizer over parameters of `dtypes` and a float32 reference over their upcasts."""
    params = _params(dtypes)
    ref = [torch.nn.Parameter(p.detach().float()) for p in params]
    opt = AdafacLO(params, hf_key="demo", **kw)
    ropt = AdafacLO(ref, hf_key="demo", **kw)
    return params, ref, opt, ropt


def _step_both(params, ref, opt, ropt, seed):
    g = torch.Generator().manual_seed(100 + seed)
    for p, r in zip(params, ref):
        p.grad = (torch.randn(p.shape, generator=g) * 3).to(p.dtype)
        with torch.no_grad():
            r.copy_(p.float())  # the exact upcast of the parameter the step sees
        r.grad = p.grad.float()
    opt.step()
    ropt.step()


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize(
    "kw", [{"lr": 1.0}, {"lr": 0.5, "max_grad_norm": 1.0, "weight_decay": 0.1}], ids=["plain", "clip_wd"]
)
def test_half_step_is_the_float32_step_of_the_upcast_rounded_once(dtype, kw):
    params, ref, opt, ropt = _stepped_pair([dtype] * len(SHAPES), **kw)
    start = [p.detach().clone() for p in params]
    for step in range(4):
        _step_both(params, ref, opt, ropt, step)
        for i, (p, r) in enumerate(zip(params, ref)):
            assert p.dtype is dtype
            assert torch.equal(_bits(p), _bits(r.detach().to(dtype))), (step, SHAPES[i])
        got, want = _state(opt), _state(ropt)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype is torch.float32, k
            assert torch.equal(_bits(got[k]), _bits(want[k])), (step, k)
    # Every tensor with elements to update moved (the 0-d one of magnitude ~1 may not, in
    # bfloat16: its updates can all be below half an ulp).
    assert all(not torch.equal(p, s) for p, s in zip(params[:3], start[:3]))
    if "max_grad_norm" in kw:
        assert opt.last_report["clipped"]


def test_float32_and_half_tensors_mix_in_one_optimizer():
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32]
    params, ref, opt, ropt = _stepped_pair(dtypes, lr=1.0)
    # A second group of float32 tensors only keeps the plain (one call per group) path.
    extra = torch.nn.Parameter(torch.randn(4, 4))
    rextra = torch.nn.Parameter(extra.detach().clone())
    opt.add_param_group({"params": [extra], "lr": 0.3})
    ropt.add_param_group({"params": [rextra], "lr": 0.3})
    for step in range(3):
        extra.grad = torch.randn(4, 4)
        rextra.grad = extra.grad.clone()
        _step_both(params, ref, opt, ropt, step)
        for p, r in zip(params + [extra], ref + [rextra]):
            assert torch.equal(_bits(p), _bits(r.detach().to(p.dtype))), (step, p.dtype)
    sd = opt.state_dict()
    for st in sd["state"].values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                assert v.dtype is torch.float32, k
    assert [g["step"] for g in sd["param_groups"]] == [3, 3]


def test_half_state_dict_round_trip_resumes_bitwise():
    params, _, opt, _ = _stepped_pair([torch.bfloat16] * len(SHAPES), lr=1.0)
    for step in range(2):
        for p in params:
            p.grad = torch.randn(p.shape).to(p.dtype)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = AdafacLO(twins, lr=1.0, hf_key="demo")
    opt2.load_state_dict(torch.load(buf))
    for p, t in zip(params, twins):
        p.grad = torch.randn(p.shape).to(p.dtype)
        t.grad = p.grad.clone()
    opt.step()
    opt2.step()
    for p, t in zip(params, twins):
        assert torch.equal(_bits(p), _bits(t))


def test_updates_below_half_an_ulp_are_lost_while_the_state_moves():
    p = torch.nn.Parameter(torch.full((8, 8), 1.0, dtype=torch.bfloat16))
    opt = AdafacLO([p], lr=1e-6, hf_key="demo")  # the demo rule's steps are ~lr: far below 2^-9
    p.grad = torch.ones(8, 8, dtype=torch.bfloat16)
    opt.step()
    assert torch.equal(p, torch.ones(8, 8, dtype=torch.bfloat16))
    assert opt.state_dict()["state"][0]["mom"].abs().max() > 0


def _refused(opt, params, match):
    before = [p.detach().clone() for p in params]
    state = _state(opt)
    with pytest.raises(ValueError, match=match):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(_bits(p), _bits(b))
    after = _state(opt)
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state)


def test_half_bad_inputs_are_refused_naming_the_parameter_and_nothing_changes():
    a = torch.nn.Parameter(torch.randn(6, 5).to(torch.bfloat16))
    b = torch.nn.Parameter(torch.randn(7).to(torch.bfloat16))
    opt = AdafacLO([("a", a), ("b", b)], lr=0.5, hf_key="demo", nonfinite="error")
    for p in (a, b):
        p.grad = torch.randn(p.shape).to(p.dtype)
    opt.step()
    a.grad = torch.randn(6, 5).to(torch.bfloat16)
    # The second tensor's gradient is refused: the first, stepped one tensor at a time before
    # it, must not have been changed either.
    b.grad = torch.tensor([float("nan")] * 7, dtype=torch.bfloat16)
    _refused(opt, [a, b], "non-finite gradient in `b`")
    b.grad = torch.randn(7).to(torch.bfloat16)
    b.grad.data = b.grad.data.float()  # torch refuses assigning one of another dtype
    _refused(opt, [a, b], "gradient of parameter `b` has dtype torch.float32, the parameter torch.bfloat16")
    b.grad = b.detach()  # a gradient sharing the parameter's memory
    _refused(opt, [a, b], "memory of `b` and `b.grad` overlaps")
    b.grad = torch.randn(7).to(torch.bfloat16)
    opt.step()  # and it still works


def test_half_after_a_float32_first_step_is_refused_and_float64_everywhere():
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = AdafacLO([("w", w)], lr=0.5, hf_key="demo")
    w.grad = torch.randn(4, 3)
    opt.step()
    w.data = w.data.to(torch.bfloat16)
    w.grad = torch.randn(4, 3).to(torch.bfloat16)
    _refused(opt, [w], "`w` has dtype torch.bfloat16, but its group's first step had float32 tensors only")
    d = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    d.grad = torch.randn(3, dtype=torch.float64)
    h = torch.nn.Parameter(torch.randn(3).to(torch.float16))
    h.grad = torch.randn(3).to(torch.float16)
    opt2 = AdafacLO([("h", h), ("d", d)], hf_key="demo")
    with pytest.raises(ValueError, match="`d` has dtype torch.float64; mulo steps float32, bfloat16 and float16"):
        opt2.step()


# ------------------------------------------------------------------------ help()


def _public_callables():
    import mulo.distributed
    import mulo.torch

    for mod in (mulo.torch, mulo.distributed):
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.isclass(obj):
                if obj.__module__ != mod.__name__:
                    continue  # re-exported (mulo.LearnedOptimizer: the native stub documents it)
                for attr, member in vars(obj).items():
                    if callable(member) and (not attr.startswith("_") or attr == "__init__"):
                        yield f"{mod.__name__}.{name}.{attr}", member
                # MuLO's arguments are AdafacLO's: help(MuLO) shows the inherited __init__.
                if "__init__" not in vars(obj):
                    yield f"{mod.__name__}.{name}.__init__", obj.__init__
            elif callable(obj):
                yield f"{mod.__name__}.{name}", obj


@pytest.mark.parametrize("where,fn", list(_public_callables()), ids=lambda x: x if isinstance(x, str) else "")
def test_help_documents_every_argument(where, fn):
    doc = inspect.getdoc(fn) or ""
    args = [
        n for n, p in inspect.signature(fn).parameters.items()
        if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    # Every argument in the docstring's "Args:" section, as `name: what it is`.
    section = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    missing = [n for n in args if not re.search(rf"^\s+{n}: \S", section, re.M)]
    assert not missing, f"{where}: help() does not document {missing}"
    assert pydoc.render_doc(fn)  # and help() renders it


# ------------------------------------------------------------------ half on the CUDA path


@pytest.mark.parametrize("nonfinite", ["skip", "zero"])
def test_cuda_path_steps_half_tensors_as_the_cpu_path_on_host_memory(monkeypatch, nonfinite):
    """The CUDA path's Python side (_CudaGroup) with bfloat16/float16 tensors, run on CPU
    tensors with the program replaced by test_torch_cuda's HostPointerStepper (no GPU here):
    one launch for the float32 tensors and one per half tensor, on float32 temporaries, never
    at the half tensors' own addresses; parameters and state bitwise those of the CPU path
    (itself bitwise the float32 step of the upcasts, rounded), with a NaN gradient skipped or
    sanitized and a tensor without gradient. (HostPointerStepper steps without a guard, so
    no gradient here may make a parameter non-finite.)"""
    from test_torch_cuda import WEIGHTS, HostPointerStepper

    from mulo._native import LearnedOptimizer
    from mulo.torch import _CudaGroup, _CudaProgram, pylo_factored_axes

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: type("S", (), {"cuda_stream": 1})())
    shapes = [(6, 4), (5,), (3, 3), ()]
    dtypes = [torch.bfloat16, torch.float16, torch.float32, torch.bfloat16]
    axes = [pylo_factored_axes(s) for s in shapes]
    names = [f"t{i}" for i in range(len(shapes))]
    lopt = LearnedOptimizer.load(WEIGHTS)
    cpu = torch.device("cpu")
    program = _CudaProgram(lopt, {0: (shapes, axes)}, cpu)
    stepper = program._stepper = HostPointerStepper(lopt, shapes, axes, program.model)
    group = _CudaGroup(lopt, names, shapes, axes, None, nonfinite, True, cpu, program, 0)
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=g).to(dt) for s, dt in zip(shapes, dtypes)]
    ref = [torch.nn.Parameter(p.clone()) for p in params]
    opt = AdafacLO(list(zip(names, ref)), lr=0.3, weight_decay=0.01, hf_key=lopt, backend="cpu", nonfinite=nonfinite)
    for step in range(3):
        grads = [torch.randn(s, generator=g).to(dt) for s, dt in zip(shapes, dtypes)]
        if step == 1:
            grads[0][2, 1] = float("nan")
            grads[3] = None
        calls = len(stepper.calls)
        report = group.step(params, [None if x is None else x.clone() for x in grads], 0.3, 0.01)
        launched = stepper.calls[calls:]
        skipped = step == 1 and nonfinite == "skip"
        half = [j for j in (0, 1, 3) if grads[j] is not None and not (skipped and j == 0)]
        assert len(launched) == 1 + len(half), step
        for _, addrs, hypers, _ in launched:
            for j in range(len(shapes)):
                if hypers[j] is not None and dtypes[j] is not torch.float32:
                    assert addrs[7 * j] != params[j].data_ptr()  # a float32 temporary
        for p, x in zip(ref, grads):
            p.grad = None if x is None else x.clone()
        opt.step()
        assert group.step_count == opt.param_groups[0]["step"] == step + 1
        for key in ("skipped", "without_grad", "sanitized"):
            assert report[key] == opt.last_report.get(key, []), (step, key)
        for i, (a, b) in enumerate(zip(params, ref)):
            assert a.dtype is dtypes[i]
            assert torch.equal(_bits(a), _bits(b)), (step, i)
    sd = opt.state_dict()["state"]
    for i in range(len(shapes)):
        for name, shape, data in group.export_state(i):
            got = torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(shape)
            assert torch.equal(got, sd[i][name]), (i, name)
