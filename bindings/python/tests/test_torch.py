"""mulo.torch against PyLO's golden trajectories, and its torch.optim.Optimizer contract.

Run from the repository root: `.venv/bin/python -m pytest bindings/python/tests` (scripts/test
does). Correctness is measured against the trajectories recorded from PyLO (tolerance 1e-4 of
each tensor's displacement max|pT - p0|, tests/fixtures/golden/README.md).
"""

import copy
import io
import json
import math
from pathlib import Path

import mup
import numpy as np
import pytest
import torch
from safetensors import safe_open

from mulo.torch import AdafacLO, MuLO, pylo_factored_axes

ROOT = Path(__file__).resolve().parents[3]
FIXTURES = ROOT / "tests" / "fixtures"
WEIGHTS = str(FIXTURES / "golden" / "weights")
MODEL = FIXTURES / "models" / "digits_cnn_w32.safetensors"
TOL = 1e-4


def load_case(path):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return meta, tensors


def golden_cases():
    return sorted((FIXTURES / "golden").glob("*.safetensors"))


def rel_err(p, want, disp):
    return float((p - want).abs().max()) / disp


def state_of(opt):
    """Every tensor of the state_dict, as a flat dict of cloned tensors/values."""
    sd = opt.state_dict()
    flat = {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            flat[(i, k)] = v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
    for gi, g in enumerate(sd["param_groups"]):
        # torch's load_state_dict adds its own `differentiable` flag: not optimizer state.
        flat[("group", gi)] = {k: v for k, v in g.items() if k not in ("params", "differentiable")}
    return flat


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


# ----------------------------------------------------------------------------- golden


def load_model_case():
    """The whole-model case, every tensor in its recorded shape (the file stores 0-d as [1])."""
    meta, t = load_case(MODEL)
    params_meta = json.loads(meta["params"])
    shapes = {p["name"]: p["shape"] for p in params_meta}
    t = {k: v.reshape(shapes[k.rsplit(".", 1)[0]]) for k, v in t.items()}
    return meta, params_meta, t


def build_mup_model(params_meta, tensors):
    """torch parameters of the recorded shapes, μP set by mup from the recorded base shapes."""

    class Holder(torch.nn.Module):
        def __init__(self, shapes):
            super().__init__()
            self.ps = torch.nn.ParameterDict(
                {n.replace(".", "_"): torch.nn.Parameter(torch.zeros(s)) for n, s in shapes.items()}
            )

    shapes = {p["name"]: p["shape"] for p in params_meta}
    base = {
        p["name"]: [b if b is not None else d for b, d in zip(p["base_shape"], p["shape"])]
        for p in params_meta
    }
    model, base_model = Holder(shapes), Holder(base)
    mup.set_base_shapes(model, base_model)
    with torch.no_grad():
        for p in params_meta:
            model.ps[p["name"].replace(".", "_")].copy_(tensors[p["name"] + ".p0"])
    return model


def test_whole_model_golden_replay_through_mulo_with_mup():
    meta, params_meta, t = load_model_case()
    model = build_mup_model(params_meta, t)
    by_name = {p["name"]: model.ps[p["name"].replace(".", "_")] for p in params_meta}
    opt = MuLO(
        [(n, by_name[n]) for n in by_name],
        lr=float(meta["lr"]),
        weight_decay=float(meta["weight_decay"]),
        max_grad_norm=float(meta["max_grad_norm"]),
        hf_key=WEIGHTS,
        factored_axes={by_name[p["name"]]: tuple(p["factored_axes"]) for p in params_meta if p["factored_axes"]},
    )
    # μP exactly as MuLO_naive: the group lr of each tensor over the base lr is its recorded
    # multiplier.
    lr = float(meta["lr"])
    for group in opt.param_groups:
        for p in group["params"]:
            name = next(n for n, q in by_name.items() if q is p)
            want = next(m["lr_multiplier"] for m in params_meta if m["name"] == name)
            assert group["lr"] / lr == pytest.approx(want, rel=1e-12), name
    steps = int(meta["steps"])
    worst = {}
    for step in range(1, steps + 1):
        for name, p in by_name.items():
            p.grad = t[f"{name}.g{step}"].clone()
        opt.step()
        for name, p in by_name.items():
            disp = float((t[f"{name}.p{steps}"] - t[f"{name}.p0"]).abs().max())
            err = rel_err(p.detach(), t[f"{name}.p{step}"], disp)
            worst[name] = max(worst.get(name, 0.0), err)
            assert err <= TOL, f"{name} at step {step}: {err:.3g} of the displacement"
    print("worst error per tensor (units of the displacement):", {k: f"{v:.2g}" for k, v in worst.items()})
    assert all(g["step"] == steps for g in opt.param_groups)


def replay_case(path, opt_kwargs=None):
    meta, t = load_case(path)
    steps, start = int(meta["steps"]), int(meta.get("start_step", 0))
    p = torch.nn.Parameter(t["p0"].clone())
    axes = json.loads(meta["factored_axes"]) if meta.get("factored_axes") else None
    opt = AdafacLO(
        [p],
        lr=float(meta["lr"]),
        weight_decay=float(meta["weight_decay"]),
        hf_key=WEIGHTS,
        factored_axes={p: tuple(axes)} if axes else None,
        **(opt_kwargs or {}),
    )
    if start:
        # PyLO's state_dict of a fresh state at step `start`: zero accumulators (decay-last),
        # the counter in the parameter group.
        sd = pylo_state_dict(opt, p, start)
        opt.load_state_dict(sd)
    return meta, t, p, opt


def pylo_state_dict(opt, p, step, values=None):
    """A state_dict laid out as PyLO's AdafacLO_naive saves it (no mulo keys)."""
    shape = tuple(p.shape)
    axes = opt.factored_axes(p)
    st = {"mom": torch.zeros(shape + (3,)), "rms": torch.zeros(shape + (1,))}
    if axes is not None:
        d0, d1 = axes
        st["fac_vec_row"] = torch.zeros(tuple(s for i, s in enumerate(shape + (3,)) if i != d0))
        st["fac_vec_col"] = torch.zeros(tuple(s for i, s in enumerate(shape + (3,)) if i != d1))
        st["fac_vec_v"] = torch.tensor([])
    else:
        st["fac_vec_row"], st["fac_vec_col"] = torch.tensor([]), torch.tensor([])
        st["fac_vec_v"] = torch.zeros(shape + (3,))
    for k, v in (values or {}).items():
        st[k] = v.clone()
    group = {
        "lr": opt.param_groups[0]["lr"],
        "exp_mult": 0.001,
        "step_mult": 0.01,
        "initial_momentum_decays": torch.tensor([0.5420, 0.9584, 0.9980]),
        "max_grad_norm": None,
        "mup_lrs": None,
        "step": step,
        "params": [0],
    }
    return {"state": {0: st}, "param_groups": [group]}


@pytest.mark.parametrize("path", golden_cases(), ids=lambda p: p.stem)
def test_golden_cases_through_adafaclo(path):
    meta, t, p, opt = replay_case(path)
    steps, start = int(meta["steps"]), int(meta.get("start_step", 0))
    disp = float((t[f"p{steps}"] - t["p0"]).abs().max())
    for step in range(1, steps + 1):
        p.grad = t[f"g{step}"].clone()
        opt.step()
        if f"p{step}" in t:
            err = rel_err(p.detach(), t[f"p{step}"], disp)
            assert err <= TOL, f"step {step}: {err:.3g}"
    assert opt.param_groups[0]["step"] == start + steps
    # The state, read through state_dict in PyLO's layout, is PyLO's.
    st = opt.state_dict()["state"][0]
    for key in ("mom", "rms", "fac_vec_row", "fac_vec_col", "fac_vec_v"):
        if f"state.{key}" in t:
            want = t[f"state.{key}"]
            assert st[key].shape == want.shape, key
            scale = float(want.abs().max()) or 1.0
            assert float((st[key] - want).abs().max()) <= 1e-4 * scale, key


def test_pylo_state_dict_loads_and_continues_identically():
    # mat_80x30_late starts from PyLO's state at step 2999 (the counter in the param group).
    path = FIXTURES / "golden" / "mat_80x30_late.safetensors"
    meta, t, p, opt = replay_case(path)
    assert opt.param_groups[0]["step"] == 2999
    # Split the replay: 3 steps, save in PyLO's layout (our state_dict rewritten to PyLO's
    # keys only), load into a new optimizer, 3 more steps: bitwise those of the whole run.
    for step in (1, 2, 3):
        p.grad = t[f"g{step}"].clone()
        opt.step()
    ours = opt.state_dict()["state"][0]
    values = {k: v for k, v in ours.items() if k in ("mom", "rms", "fac_vec_row", "fac_vec_col")}
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = AdafacLO([q], lr=float(meta["lr"]), hf_key=WEIGHTS, factored_axes={q: (0, 1)})
    opt2.load_state_dict(pylo_state_dict(opt2, q, 2999 + 3, values))
    for step in (4, 5, 6):
        p.grad = t[f"g{step}"].clone()
        q.grad = t[f"g{step}"].clone()
        opt.step()
        opt2.step()
        assert torch.equal(p, q), f"step {step}"
    disp = float((t["p6"] - t["p0"]).abs().max())
    assert rel_err(q.detach(), t["p6"], disp) <= TOL
    # And from PyLO's own final state of a case: loading it reproduces PyLO's saved numbers.
    meta, t = load_case(FIXTURES / "golden" / "mat_96x40_wd.safetensors")
    r = torch.nn.Parameter(t["p8"].clone())
    opt3 = AdafacLO([r], lr=0.5, weight_decay=0.01, hf_key=WEIGHTS, factored_axes={r: (0, 1)})
    values = {k[len("state."):]: v for k, v in t.items() if k.startswith("state.")}
    opt3.load_state_dict(pylo_state_dict(opt3, r, 8, values))
    back = opt3.state_dict()["state"][0]
    for k, v in values.items():
        assert torch.equal(back[k], v), k
    assert opt3.param_groups[0]["step"] == 8


# ------------------------------------------------------------------ groups and schedules


def test_param_groups_each_with_their_own_lr_and_weight_decay():
    # Two golden cases with different lr and weight decay, as two groups of one optimizer.
    cases = [FIXTURES / "golden" / "mat_96x40_wd.safetensors", FIXTURES / "golden" / "mat_64x256.safetensors"]
    loaded = [load_case(c) for c in cases]
    params, groups = [], []
    for meta, t in loaded:
        p = torch.nn.Parameter(t["p0"].clone())
        params.append(p)
        groups.append({"params": [p], "lr": float(meta["lr"]), "weight_decay": float(meta["weight_decay"])})
    axes = {p: tuple(json.loads(m["factored_axes"])) for p, (m, _) in zip(params, loaded) if m.get("factored_axes")}
    opt = AdafacLO(groups, lr=123.0, weight_decay=0.5, hf_key=WEIGHTS, factored_axes=axes)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 1.0]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    for step in range(1, 9):
        for p, (meta, t) in zip(params, loaded):
            p.grad = t[f"g{step}"].clone()
        opt.step()
        for p, (meta, t) in zip(params, loaded):
            steps = int(meta["steps"])
            disp = float((t[f"p{steps}"] - t["p0"]).abs().max())
            assert rel_err(p.detach(), t[f"p{step}"], disp) <= TOL


def test_lr_scheduler_sets_the_lr_of_every_step():
    meta, t = load_case(FIXTURES / "golden" / "mat_48x48.safetensors")
    schedule = lambda step: 1.0 / (1 + step)  # noqa: E731

    def run(use_scheduler):
        p = torch.nn.Parameter(t["p0"].clone())
        opt = AdafacLO([p], lr=1.0, hf_key=WEIGHTS)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule) if use_scheduler else None
        for step in range(1, 6):
            p.grad = t[f"g{step}"].clone()
            opt.step()
            if sched:
                sched.step()
        return p.detach().clone()

    def run_manual():
        # The same lrs, set by hand on single-step optimizers chained through state_dict.
        p = torch.nn.Parameter(t["p0"].clone())
        opt = AdafacLO([p], lr=1.0, hf_key=WEIGHTS)
        for step in range(1, 6):
            opt.param_groups[0]["lr"] = schedule(step - 1)
            p.grad = t[f"g{step}"].clone()
            opt.step()
        return p.detach().clone()

    scheduled, manual, constant = run(True), run_manual(), run(False)
    assert torch.equal(scheduled, manual)
    assert not torch.equal(scheduled, constant)


# ------------------------------------------------------------------------- resume


def test_state_dict_round_trip_through_torch_save_resumes_bitwise():
    meta, params_meta, t = load_model_case()
    model = build_mup_model(params_meta, t)
    twin = build_mup_model(params_meta, t)
    kwargs = dict(lr=0.3, weight_decay=1e-3, max_grad_norm=5.0, hf_key=WEIGHTS)
    opt = MuLO(model.parameters(), **kwargs)

    def grads(m, step):
        for p_meta in params_meta:
            m.ps[p_meta["name"].replace(".", "_")].grad = t[f"{p_meta['name']}.g{step}"].clone()

    for step in range(1, 4):
        grads(model, step)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    with torch.no_grad():
        for a, b in zip(model.parameters(), twin.parameters()):
            b.copy_(a)
    opt2 = MuLO(twin.parameters(), **kwargs)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=False))
    assert_same_state(state_of(opt), state_of(opt2))
    for step in range(4, 8):
        grads(model, step)
        grads(twin, step)
        opt.step()
        opt2.step()
        for a, b in zip(model.parameters(), twin.parameters()):
            assert torch.equal(a, b), f"step {step}"
    assert_same_state(state_of(opt), state_of(opt2))


# ------------------------------------------------------------------- torch behaviour


def test_step_closure_zero_grad_and_params_without_grad():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(6, 4))
    b = torch.nn.Parameter(torch.randn(5))
    opt = AdafacLO([a, b], lr=0.1, hf_key="demo")
    x = torch.randn(3, 4)

    def closure():
        opt.zero_grad()
        loss = (x @ a.t()).pow(2).sum()  # b gets no gradient
        loss.backward()
        return loss

    b0 = b.detach().clone()
    a0 = a.detach().clone()
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert b.grad is None and torch.equal(b, b0)
    assert not torch.equal(a, a0)
    assert opt.last_report["without_grad"] == ["param_groups[0]['params'][1] (shape [5])"]
    opt.zero_grad()
    assert a.grad is None
    a1 = a.detach().clone()
    opt.step()  # nothing has a gradient: nothing changes, the group's counter moves on
    assert torch.equal(a, a1) and torch.equal(b, b0)
    assert opt.param_groups[0]["step"] == 2


def test_adafaclo_default_axes_are_numpy_argsort_on_this_host():
    ps = [torch.nn.Parameter(torch.zeros(s)) for s in [(32, 32, 3, 3), (64, 256), (48, 48), (7,), ()]]
    opt = AdafacLO(ps, hf_key="demo")
    for p in ps:
        order = np.argsort(tuple(p.shape))
        want = (int(order[-1]), int(order[-2])) if p.dim() >= 2 else None
        assert opt.factored_axes(p) == want == pylo_factored_axes(tuple(p.shape))
    opt.set_factored_axes(ps[0], (1, 0))
    for p in ps:
        p.grad = torch.full(p.shape, 0.01)
    opt.step()
    assert opt.factored_axes(ps[0]) == (1, 0)
    assert opt.state_dict()["state"][0]["factored_axes"] == [1, 0]
    with pytest.raises(ValueError, match="already been stepped"):
        opt.set_factored_axes(ps[0], (0, 1))


def test_mulo_requires_mup_infshape():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="mup.set_base_shapes"):
        MuLO([p], hf_key="demo")


# ------------------------------------------------------------------------ bad inputs


def _two_param_opt(**kw):
    torch.manual_seed(1)
    good = torch.nn.Parameter(torch.randn(8, 4))
    other = torch.nn.Parameter(torch.randn(3, 5))
    opt = AdafacLO([("good", good), ("other", other)], lr=0.1, hf_key="demo", **kw)
    good.grad = torch.randn(8, 4)
    other.grad = torch.randn(3, 5)
    opt.step()  # state exists
    good.grad = torch.randn(8, 4)
    other.grad = torch.randn(3, 5)
    return opt, good, other


def _refused(opt, params, match):
    before = [p.detach().clone() for p in params]
    state = state_of(opt)
    with pytest.raises(ValueError, match=match):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    assert_same_state(state, state_of(opt))


def test_bad_inputs_are_refused_naming_the_parameter_and_nothing_changes():
    opt, good, other = _two_param_opt()
    other.grad = torch.randn(3, 5, dtype=torch.float64).float()  # fine
    other.grad = None
    other.grad = torch.randn(3, 5)
    # wrong dtype of the gradient (torch refuses assigning one; change it in place)
    other.grad.data = other.grad.data.double()
    _refused(opt, [good, other], "`other`.*float64")
    other.grad = torch.randn(3, 5)
    # non-contiguous gradient
    other.grad = torch.randn(5, 3).t()
    _refused(opt, [good, other], "`other`.*not contiguous")
    other.grad = torch.randn(3, 5)
    # sparse gradient
    other.grad = torch.randn(3, 5).to_sparse()
    _refused(opt, [good, other], "`other`.*sparse")
    other.grad = torch.randn(3, 5)
    # changed shape
    keep = other.data
    other.data = torch.randn(5, 3)
    other.grad = torch.randn(5, 3)
    _refused(opt, [good, other], "`other` has shape \\[5, 3\\].*stepped with shape \\[3, 5\\]")
    other.data = keep
    other.grad = torch.randn(3, 5)
    # a parameter of the wrong dtype
    other.data = keep.double()
    other.grad = torch.randn(3, 5, dtype=torch.float64)
    _refused(opt, [good, other], "`other` has dtype torch.float64")
    other.data = keep
    other.grad = torch.randn(3, 5)
    # a non-contiguous parameter
    other.data = keep.t().contiguous().t()
    _refused(opt, [good, other], "`other` is not contiguous")
    other.data = keep
    # a gradient sharing the parameter's memory (the step would write what it reads)
    other.grad = other.detach()
    _refused(opt, [good, other], "memory of `other` and `other.grad` overlaps")
    other.grad = torch.randn(3, 5)
    # non-finite learning rate of a group
    opt.param_groups[0]["lr"] = float("nan")
    _refused(opt, [good, other], "lr=nan")
    opt.param_groups[0]["lr"] = 0.1
    opt.step()  # and it still works


def test_mixed_devices_are_refused():
    good = torch.nn.Parameter(torch.randn(8, 4))
    elsewhere = torch.nn.Parameter(torch.empty(3, 5, device="meta"))
    opt = AdafacLO([("good", good), ("elsewhere", elsewhere)], lr=0.1, hf_key="demo")
    good.grad = torch.randn(8, 4)
    elsewhere.grad = torch.empty(3, 5, device="meta")
    before = good.detach().clone()
    with pytest.raises(ValueError, match="mixed devices"):
        opt.step()
    assert torch.equal(good, before)
    assert opt.state_dict()["state"] == {}


# CUDA tensors: test_torch_cuda.py.


# ---------------------------------------------------------------- non-finite gradients


def test_nonfinite_gradients_follow_the_policy():
    # skip (default): the tensor is left unchanged, the others are stepped.
    opt, good, other = _two_param_opt()
    g0, o0 = good.detach().clone(), other.detach().clone()
    st = opt.state_dict()["state"][1]
    other.grad[1, 2] = float("nan")
    opt.step()
    assert opt.last_report["skipped"] == ["other"]
    assert torch.equal(other, o0) and not torch.equal(good, g0)
    st2 = opt.state_dict()["state"][1]
    for k in ("mom", "rms", "fac_vec_row", "fac_vec_col"):
        assert torch.equal(st[k], st2[k])
    # error: refused across groups, nothing changes.
    torch.manual_seed(2)
    a = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(6))
    opt = AdafacLO([{"params": [a]}, {"params": [b], "lr": 0.5}], hf_key="demo", nonfinite="error")
    a.grad, b.grad = torch.randn(4, 3), torch.randn(6)
    b.grad[0] = float("inf")
    a0, b0 = a.detach().clone(), b.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        opt.step()
    assert torch.equal(a, a0) and torch.equal(b, b0)
    assert all("step" not in g or g["step"] == 0 for g in opt.param_groups)
    # zero: NaN replaced, the tensor is stepped with finite values.
    opt, good, other = _two_param_opt(nonfinite="zero")
    other.grad[0, 0] = float("nan")
    o0 = other.detach().clone()
    opt.step()
    assert opt.last_report["sanitized"] == ["other"]
    assert torch.isfinite(other).all() and not torch.equal(other, o0)


def test_backend_interp_matches_golden_too():
    path = FIXTURES / "golden" / "mat_1x300.safetensors"
    meta, t, p, opt = replay_case(path, {"backend": "interp"})
    steps = int(meta["steps"])
    disp = float((t[f"p{steps}"] - t["p0"]).abs().max())
    for step in range(1, steps + 1):
        p.grad = t[f"g{step}"].clone()
        opt.step()
        assert rel_err(p.detach(), t[f"p{step}"], disp) <= TOL


def test_weights_and_meta_parameters(monkeypatch):
    # An uncached Hub key would be downloaded; offline, the test never leaves the machine (the
    # downloads are test_hub.py's, against a loopback server).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = torch.nn.Parameter(torch.zeros(3))
    by_dir = AdafacLO([p], hf_key=WEIGHTS).lopt
    by_file = AdafacLO([p], hf_key=WEIGHTS + "/model.safetensors").lopt
    assert by_dir.fingerprint == by_file.fingerprint and not by_dir.is_demo
    assert AdafacLO([p], hf_key="demo").lopt.is_demo
    with pytest.raises(Exception, match="nobody/nothing"):
        AdafacLO([p], hf_key="nobody/nothing")
    # PyLO's default meta-parameters give mulo's normative f32 decays (SPEC.md §1) ...
    meta = by_dir.meta()
    assert meta["exp_mult"] == pytest.approx(0.001) and meta["step_mult"] == pytest.approx(0.01)
    assert [np.float32(x) for x in meta["momentum_decays"]] == [
        np.float32(0.542027295), np.float32(0.958441377), np.float32(0.99802357)]
    # ... and other values are computed as PyLO computes them and change the step.
    other = AdafacLO([p], hf_key=WEIGHTS, exp_mult=0.002, momentum_decays=(0.1, 0.1, 0.1)).lopt
    m2 = other.meta()
    assert m2["exp_mult"] == pytest.approx(0.002)
    init = torch.tensor([0.9, 0.99, 0.999])
    want = torch.clip(1 - torch.exp((torch.log(1 - init) / 10.0 + 0.1) * 10.0), 0.0, 1.0)
    assert m2["momentum_decays"] == [float(x) for x in want]
    assert other.fingerprint != by_dir.fingerprint
