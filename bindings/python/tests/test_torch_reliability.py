"""mulo.torch's guarantees beyond the golden trajectories (issue 23, Python side): a refused
step changes nothing in any group, a refused load changes nothing and nothing is cast, the
optimizers work from any thread (one call at a time), and ``copy.deepcopy`` gives an
independent optimizer that continues bitwise as the original would.

Run from the repository root: `.venv/bin/python -m pytest bindings/python/tests`.
"""

import copy
import pickle
import threading

import mup
import pytest
import torch

from mulo.torch import AdafacLO, MuLO

WIDTHS = (8, 12, 16)  # MuLO's groups: width multipliers 2 and 3 (hidden weights), then the rest


# ------------------------------------------------------------------------------ helpers


def adafaclo_three_groups(**kw):
    """An AdafacLO of 3 groups (a matrix and a vector each, their own lr), stepped twice."""
    torch.manual_seed(3)
    groups = []
    for gi in range(3):
        named = [(f"w{gi}", torch.nn.Parameter(torch.randn(6 + gi, 5))), (f"b{gi}", torch.nn.Parameter(torch.randn(4)))]
        groups.append({"params": named, "lr": 0.1 * (gi + 1), "weight_decay": 0.01 * gi})
    opt = AdafacLO(groups, hf_key="demo", **kw)
    params = [p for g in opt.param_groups for p in g["params"]]
    warm_up(opt, params)
    return opt, params


class Mlp(torch.nn.Module):
    def __init__(self, widths):
        super().__init__()
        sizes = (3,) + tuple(widths)  # no readout: mup would want a MuReadout
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))


def mulo_groups(**kw):
    """A MuLO of an MLP with μP: 3 groups (width multipliers 2 and 3, then the rest), stepped
    twice."""
    torch.manual_seed(4)
    model = Mlp(WIDTHS)
    mup.set_base_shapes(model, Mlp((4, 4, 4)))
    opt = MuLO(model.named_parameters(), lr=0.2, weight_decay=0.01, hf_key="demo", **kw)
    assert len(opt.param_groups) == 3
    params = [p for g in opt.param_groups for p in g["params"]]
    warm_up(opt, params)
    return opt, params


def warm_up(opt, params, steps=2):
    for _ in range(steps):
        new_grads(params)
        opt.step()
    new_grads(params)


def new_grads(params):
    for p in params:
        p.grad = torch.randn_like(p)


def snapshot(opt, params):
    """Bitwise copies of every parameter, gradient and state tensor, and every group's step
    and hyper-parameters."""
    sd = opt.state_dict()
    state = {
        (i, k): (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
        for i, st in sd["state"].items()
        for k, v in st.items()
    }
    groups = [
        {k: v for k, v in g.items() if k not in ("params", "differentiable")} for g in sd["param_groups"]
    ]
    tensors = [(p.detach().clone(), None if p.grad is None else p.grad.clone()) for p in params]
    return state, groups, tensors


def assert_unchanged(before, after):
    state0, groups0, tensors0 = before
    state1, groups1, tensors1 = after
    assert state0.keys() == state1.keys()
    for k in state0:
        a, b = state0[k], state1[k]
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), k
        else:
            assert a == b, k
    assert groups0 == groups1
    for (p0, g0), (p1, g1) in zip(tensors0, tensors1):
        assert torch.equal(p0, p1)
        assert (g0 is None) == (g1 is None) and (g0 is None or torch.equal(g0, g1))


# ------------------------------------------------------------- refusal causes, any group


def _hyper(key, value):
    def cause(opt, gi):
        group = opt.param_groups[gi]
        old = group[key]
        group[key] = value

        def undo():
            group[key] = old

        return undo

    return cause


def _on_param(change):
    """A cause changing the group's first parameter (a matrix) through ``change(p)``, which
    returns its own undo."""

    def cause(opt, gi):
        return change(opt.param_groups[gi]["params"][0])

    return cause


def _swap_data(make):
    def change(p):
        old_data, old_grad = p.data, p.grad
        p.data = make(p.data)
        if old_grad is not None and p.grad is not None and p.grad.shape != p.shape:
            p.grad = torch.zeros_like(p)

        def undo():
            p.data = old_data
            p.grad = old_grad

        return undo

    return change


def _swap_grad(make):
    def change(p):
        old = p.grad
        new = make(p)
        try:
            p.grad = new
        except RuntimeError:  # torch refuses assigning some: change the data in place
            p.grad = torch.zeros_like(p)
            p.grad.data = new

        def undo():
            p.grad = old

        return undo

    return change


def _replace_param(make):
    """A cause putting another tensor (``make(p)``) in place of the group's first parameter
    (torch cannot move a parameter's data to another device type in place)."""

    def cause(opt, gi):
        params = opt.param_groups[gi]["params"]
        old = params[0]
        params[0] = make(old)
        params[0].grad = torch.empty_like(params[0])

        def undo():
            params[0] = old

        return undo

    return cause


def _nonfinite_grad(p):
    g = p.grad.clone()
    g[0, 0] = float("nan")
    return g


CAUSES = {
    "lr=1e39": (_hyper("lr", 1e39), "lr=1e\\+39"),
    "lr=nan": (_hyper("lr", float("nan")), "lr=nan"),
    "lr=inf": (_hyper("lr", float("inf")), "lr=inf"),
    "lr<0": (_hyper("lr", -0.1), "lr=-0.1"),
    "lr=True": (_hyper("lr", True), "lr=True"),
    "lr=str": (_hyper("lr", "0.1"), "lr='0.1'"),
    "weight_decay=1e39": (_hyper("weight_decay", 1e39), "weight_decay=1e\\+39"),
    "weight_decay=nan": (_hyper("weight_decay", float("nan")), "weight_decay=nan"),
    "weight_decay<0": (_hyper("weight_decay", -1.0), "weight_decay=-1.0"),
    "weight_decay=True": (_hyper("weight_decay", True), "weight_decay=True"),
    "max_grad_norm=0": (_hyper("max_grad_norm", 0.0), "max_grad_norm=0.0"),
    "max_grad_norm<0": (_hyper("max_grad_norm", -1.0), "max_grad_norm=-1.0"),
    "max_grad_norm=nan": (_hyper("max_grad_norm", float("nan")), "max_grad_norm=nan"),
    "max_grad_norm=1e39": (_hyper("max_grad_norm", 1e39), "max_grad_norm=1e\\+39"),
    "max_grad_norm=1e-46 (0 in f32)": (_hyper("max_grad_norm", 1e-46), "max_grad_norm=1e-46"),
    "max_grad_norm=True": (_hyper("max_grad_norm", True), "max_grad_norm=True"),
    "param float64": (_on_param(_swap_data(lambda d: d.double())), "dtype torch.float64"),
    "param non-contiguous": (_on_param(_swap_data(lambda d: d.t().contiguous().t())), "not contiguous"),
    "param new shape": (_on_param(_swap_data(lambda d: torch.zeros(d.shape[1], d.shape[0]))), "stepped with shape"),
    "param on meta": (_replace_param(lambda p: torch.nn.Parameter(torch.empty(p.shape, device="meta"))), "mixed devices"),
    "grad float64": (_on_param(_swap_grad(lambda p: p.grad.double())), "float64"),
    "grad non-contiguous": (_on_param(_swap_grad(lambda p: p.grad.t().contiguous().t())), "not contiguous"),
    "grad wrong shape": (_on_param(_swap_grad(lambda p: torch.zeros(p.numel()))), "shape"),
    "grad sparse": (_on_param(_swap_grad(lambda p: p.grad.to_sparse())), "sparse"),
    # (A gradient on another device than its parameter: torch refuses assigning one.)
    "grad is the param": (_on_param(_swap_grad(lambda p: p.detach())), "overlaps"),
    "grad non-finite (nonfinite='error')": (_on_param(_swap_grad(_nonfinite_grad)), "non-finite gradient"),
}


def _overlap_across_groups(opt, gi):
    # A gradient viewing another group's parameter's memory (each group's native step checks
    # only its own buffers): this group's matrix and the next group's, the smaller one's
    # gradient a view of the larger one.
    p = opt.param_groups[gi]["params"][0]
    other = opt.param_groups[(gi + 1) % len(opt.param_groups)]["params"][0]
    small, large = (p, other) if p.numel() <= other.numel() else (other, p)
    old = small.grad
    small.grad = torch.zeros_like(small)
    small.grad.data = large.detach().view(-1)[: small.numel()].view(small.shape)

    def undo():
        small.grad = old

    return undo


CAUSES["grad shares another group's parameter"] = (_overlap_across_groups, "overlaps")


@pytest.mark.parametrize("make", [adafaclo_three_groups, mulo_groups], ids=["AdafacLO", "MuLO"])
@pytest.mark.parametrize("cause", list(CAUSES), ids=list(CAUSES))
def test_a_refused_step_changes_nothing_in_any_group(make, cause):
    apply, match = CAUSES[cause]
    opt, params = make(nonfinite="error")
    last = len(opt.param_groups) - 1
    for gi in sorted({0, last // 2, last}):  # the first, a middle and the last group
        before = snapshot(opt, params)
        undo = apply(opt, gi)
        with pytest.raises(ValueError, match=match):
            opt.step()
        undo()
        assert_unchanged(before, snapshot(opt, params))
    # Still usable: it steps as a twin that was never refused.
    twin, twin_params = make(nonfinite="error")
    for p, q in zip(params, twin_params):
        q.grad = p.grad.clone()
    opt.step()
    twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p.detach(), q.detach())


def test_a_refused_first_step_builds_nothing():
    a = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(5))
    opt = AdafacLO([{"params": [a]}, {"params": [b], "lr": 0.5}], hf_key="demo")
    a.grad, b.grad = torch.randn(4, 3), torch.randn(5)
    opt.param_groups[1]["lr"] = 1e39
    with pytest.raises(ValueError, match="param_groups\\[1\\]: lr=1e\\+39"):
        opt.step()
    assert opt.state_dict()["state"] == {}
    assert all("step" not in g for g in opt.param_groups)


def test_bool_and_f32_overflowing_hyper_parameters_are_refused_at_construction():
    p = torch.nn.Parameter(torch.randn(3))
    for kw, match in (
        ({"lr": True}, "lr=True"),
        ({"lr": 1e39}, "lr=1e\\+39"),
        ({"weight_decay": False}, "weight_decay=False"),
        ({"max_grad_norm": True}, "max_grad_norm=True"),
        ({"lr": 10**400}, "lr=1000"),
    ):
        with pytest.raises(ValueError, match=match):
            AdafacLO([p], hf_key="demo", **kw)
    # The largest float32 (and what rounds to it) is finite: accepted.
    AdafacLO([p], hf_key="demo", lr=3.4028235e38)


# ------------------------------------------------------------------------------ imports


def _bad_state(key, value):
    def edit(sd, index):
        st = sd["state"][index]
        st[key] = value(st[key])

    return edit


def _set_step(value):
    def edit(sd, index):
        sd["param_groups"][-1]["step"] = value

    return edit


def _negate_first(t):
    t = t.clone()
    t.view(-1)[0] = -1.0
    return t


def _nan_first(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


IMPORT_RULES = {
    "mom bfloat16": (_bad_state("mom", lambda t: t.bfloat16()), "`mom`: dtype torch.bfloat16"),
    "mom float64": (_bad_state("mom", lambda t: t.double()), "`mom`: dtype torch.float64"),
    "rms int32": (_bad_state("rms", lambda t: t.int()), "`rms`: dtype torch.int32"),
    "mom complex64": (_bad_state("mom", lambda t: t.to(torch.complex64)), "`mom`: dtype torch.complex64"),
    "mom NaN": (_bad_state("mom", _nan_first), "`mom`: 1 non-finite"),
    "rms Inf": (_bad_state("rms", lambda t: t + float("inf")), "`rms`: .* non-finite"),
    "rms negative": (_bad_state("rms", _negate_first), "`rms`: 1 negative"),
    "fac_vec_row negative": (_bad_state("fac_vec_row", _negate_first), "`fac_vec_row`: 1 negative"),
    "fac_vec_col NaN": (_bad_state("fac_vec_col", _nan_first), "`fac_vec_col`: 1 non-finite"),
    "step bool": (_set_step(True), "step=True"),
    "step negative": (_set_step(-1), "step=-1"),
    "step 2**63": (_set_step(2**63), "step=9223372036854775808"),
    "step float": (_set_step(2.0), "step=2.0"),
}


@pytest.mark.parametrize("make", [adafaclo_three_groups, mulo_groups], ids=["AdafacLO", "MuLO"])
@pytest.mark.parametrize("rule", list(IMPORT_RULES), ids=list(IMPORT_RULES))
def test_a_refused_load_names_the_tensor_casts_nothing_and_changes_nothing(make, rule):
    edit, match = IMPORT_RULES[rule]
    opt, params = make()
    saved = opt.state_dict()
    new_grads(params)
    opt.step()  # the optimizer now differs from `saved`
    bad = copy.deepcopy(saved)
    last = bad["param_groups"][-1]
    edit(bad, last["params"][0])  # the last group's first (matrix) tensor
    name = opt._names(len(opt.param_groups) - 1, opt.param_groups[-1])[0]
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=match) as err:
        opt.load_state_dict(bad)
    where = f"param_groups[{len(opt.param_groups) - 1}]"
    assert where in str(err.value)
    if not rule.startswith("step"):
        assert f"`{name}`" in str(err.value)
    assert_unchanged(before, snapshot(opt, params))
    # The good one still loads.
    opt.load_state_dict(saved)


def test_a_load_refused_in_the_last_group_by_the_native_import_is_rolled_back():
    opt, params = adafaclo_three_groups()
    saved = opt.state_dict()
    new_grads(params)
    opt.step()
    bad = copy.deepcopy(saved)
    index = bad["param_groups"][-1]["params"][0]
    bad["state"][index]["mom"] = torch.zeros(2, 2, 3)  # float32, finite, of the wrong shape
    new_grads(params)
    grads = [p.grad.clone() for p in params]
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="w2"):
        opt.load_state_dict(bad)
    assert_unchanged(before, snapshot(opt, params))
    # And it continues as a twin that never saw the refused load.
    twin, twin_params = adafaclo_three_groups()
    new_grads(twin_params)
    twin.step()
    for q, g in zip(twin_params, grads):
        q.grad = g.clone()
    opt.step()
    twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p.detach(), q.detach())


# ------------------------------------------------------------------------------ threads


def _in_thread(fn):
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - pyo3's PanicException is a BaseException
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert not t.is_alive()
    if "error" in out:
        raise AssertionError(f"raised in another thread: {type(out['error']).__name__}: {out['error']}")
    return out.get("value")


def test_step_state_dict_and_load_from_other_threads():
    opt, params = adafaclo_three_groups()
    twin, twin_params = adafaclo_three_groups()
    for step in range(3):
        new_grads(params)
        for p, q in zip(params, twin_params):
            q.grad = p.grad.clone()
        _in_thread(opt.step)  # a new thread every step
        twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p.detach(), q.detach())
    saved = _in_thread(opt.state_dict)
    new_grads(params)
    opt.step()
    _in_thread(lambda: opt.load_state_dict(saved))
    assert_unchanged(snapshot(twin, []), snapshot(opt, []))


def test_concurrent_calls_are_serialized():
    opt, params = adafaclo_three_groups()
    twin, twin_params = adafaclo_three_groups()
    for p, q in zip(params, twin_params):
        q.grad = p.grad.clone()
    inside, release = threading.Event(), threading.Event()

    def hold(_opt):
        # A state_dict pre-hook runs inside state_dict(): this one holds the call open.
        inside.set()
        release.wait(30)

    handle = opt.register_state_dict_pre_hook(hold)
    saver = threading.Thread(target=opt.state_dict)
    saver.start()
    assert inside.wait(30)
    stepped = threading.Event()
    stepper = threading.Thread(target=lambda: (opt.step(), stepped.set()))
    stepper.start()
    # While state_dict() is running, the step waits for it.
    assert not stepped.wait(0.5)
    release.set()
    saver.join(30)
    stepper.join(30)
    assert stepped.is_set()
    handle.remove()
    twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p.detach(), q.detach())


# ------------------------------------------------------------------------------- copies


@pytest.mark.parametrize("make", [adafaclo_three_groups, mulo_groups], ids=["AdafacLO", "MuLO"])
def test_deepcopy_is_independent_and_continues_bitwise(make):
    opt, params = make(max_grad_norm=1.0)
    clone = copy.deepcopy(opt)
    clone_params = [p for g in clone.param_groups for p in g["params"]]
    assert all(p is not q for p, q in zip(params, clone_params))
    # (Parameter's deepcopy drops the gradient: compare the values and the state.)
    assert_unchanged(snapshot(opt, []), snapshot(clone, []))
    assert all(torch.equal(p.detach(), q.detach()) for p, q in zip(params, clone_params))
    before = snapshot(opt, params)
    for step in range(3):
        for q in clone_params:
            q.grad = torch.randn_like(q)
        clone.step()
    # Stepping the copy changed nothing of the original.
    assert_unchanged(before, snapshot(opt, params))
    # Both continue as the original would.
    reference = copy.deepcopy(opt)
    ref_params = [p for g in reference.param_groups for p in g["params"]]
    for step in range(2):
        new_grads(params)
        for q, p in zip(clone_params, params):
            q.grad = p.grad.clone()
        for r, p in zip(ref_params, params):
            r.grad = p.grad.clone()
        opt.step()
        reference.step()
    assert_unchanged(snapshot(opt, params), snapshot(reference, ref_params))


def test_deepcopy_with_the_model_steps_the_copied_model():
    torch.manual_seed(5)
    model = torch.nn.Linear(4, 3)
    opt = AdafacLO(model.parameters(), lr=0.1, hf_key="demo")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    model2, opt2 = copy.deepcopy((model, opt))
    assert [p for g in opt2.param_groups for p in g["params"]] == list(model2.parameters())
    for p, q in zip(model.parameters(), model2.parameters()):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt.step()
    opt2.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p.detach(), q.detach())


def test_pickling_and_shallow_copies_are_refused_clearly():
    opt, _ = adafaclo_three_groups()
    with pytest.raises(TypeError, match="state_dict"):
        copy.copy(opt)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(opt)


# ------------------------------------------------------------------ zero-element tensors


def test_zero_element_parameters_are_left_as_they_are_with_zero_size_state():
    torch.manual_seed(6)

    def make(with_empty):
        a = torch.nn.Parameter(torch.randn(3, 4))
        b = torch.nn.Parameter(torch.randn(5))
        first = [("a", a), ("b", b)]
        groups = [{"params": first}, {"params": [("c", torch.nn.Parameter(torch.randn(2, 3)))], "lr": 0.5}]
        if with_empty:
            first.insert(1, ("z", torch.nn.Parameter(torch.zeros(0, 4))))
            first.append(("e", torch.nn.Parameter(torch.zeros(0))))
            groups.append({"params": [("only", torch.nn.Parameter(torch.zeros(2, 0, 3)))], "lr": 0.2})
        return AdafacLO(groups, hf_key="demo", max_grad_norm=1.0)

    with_empty, plain = make(True), make(False)
    a0 = [p.detach().clone() for g in plain.param_groups for p in g["params"]]
    for q, p0 in zip([p for g in with_empty.param_groups for p in g["params"] if p.numel()], a0):
        q.data.copy_(p0)
    for step in range(3):
        for p in (p for g in plain.param_groups for p in g["params"]):
            p.grad = torch.randn_like(p)
        full = [p for g in plain.param_groups for p in g["params"]]
        it = iter(full)
        for q in (q for g in with_empty.param_groups for q in g["params"]):
            q.grad = next(it).grad.clone() if q.numel() else torch.zeros_like(q)
        plain.step()
        with_empty.step()
    # The tensors with elements step as without the empty ones; every group counts its steps.
    live = [q for g in with_empty.param_groups for q in g["params"] if q.numel()]
    for p, q in zip((p for g in plain.param_groups for p in g["params"]), live):
        assert torch.equal(p.detach(), q.detach())
    assert [g["step"] for g in with_empty.param_groups] == [3, 3, 3]
    sd = with_empty.state_dict()
    for index in (1, 3, 5):  # z, e, only
        st = sd["state"][index]
        assert st["mom"].numel() == 0 and st["rms"].numel() == 0
        assert all(t.count_nonzero() == 0 for k, t in st.items() if isinstance(t, torch.Tensor))
    assert set(sd["state"][1]) == set(sd["state"][0])  # the keys of a factored tensor
    assert set(sd["state"][3]) == set(sd["state"][2])  # of a vector
    # It loads into a new optimizer (and deep-copies) and continues as the original.
    other = make(True)
    for q, p in zip((q for g in other.param_groups for q in g["params"]), (p for g in with_empty.param_groups for p in g["params"])):
        q.data.copy_(p.detach())
    other.load_state_dict(sd)
    clone = copy.deepcopy(with_empty)
    for opt in (other, clone):
        for q, p in zip((q for g in opt.param_groups for q in g["params"]), (p for g in with_empty.param_groups for p in g["params"])):
            q.grad = p.grad.clone()
    for opt in (with_empty, other, clone):
        opt.step()
    for opt in (other, clone):
        for q, p in zip((q for g in opt.param_groups for q in g["params"]), (p for g in with_empty.param_groups for p in g["params"])):
            assert torch.equal(q.detach(), p.detach())
