"""Optimizer state between mulo's runtimes and torch's ``state_dict``, shared by the
single-process path (:mod:`mulo.torch`) and the sharded one (:mod:`mulo.distributed`)."""

from __future__ import annotations

import numbers
from collections import defaultdict
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

#: PyLO's per-tensor state entries, in the order they are imported.
STATE_NAMES = ("mom", "rms", "fac_vec_row", "fac_vec_col", "fac_vec_v")

#: A loaded group ``step`` must be below this (it must fit a signed 64-bit integer, as torch and
#: most checkpoint formats store integers; the native counters are unsigned 64-bit).
STEP_LIMIT = 2**63


def check_state_dict(opt, state_dict: Dict[str, Any]) -> None:
    """Refuses a ``state_dict`` to load into ``opt`` unless every group's ``step`` is an int
    (not a bool) in ``[0, 2**63)`` and every per-tensor state tensor (PyLO's ``mom``, ``rms``,
    ``fac_vec_*``) is a float32 tensor of finite values, ``rms`` and ``fac_vec_*`` (second
    moments) ``>= 0``. Nothing is cast: torch's ``Optimizer.load_state_dict`` would cast state
    to the parameter's dtype, so this runs on the ``state_dict`` as given, before it. Errors
    name ``param_groups[g]``, the parameter and the state key."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), list):
        raise ValueError("state_dict: expected a dict with `state` and a `param_groups` list")
    state = state_dict.get("state", {})
    if not isinstance(state, dict):
        raise ValueError(f"state_dict: `state` is a {type(state).__name__}, not a dict")
    for gi, saved in enumerate(state_dict["param_groups"]):
        where = f"state_dict param_groups[{gi}]"
        step = saved.get("step") if isinstance(saved, dict) else None
        if step is not None and (
            isinstance(step, bool) or not isinstance(step, numbers.Integral) or not 0 <= int(step) < STEP_LIMIT
        ):
            raise ValueError(f"{where}: step={step!r} must be an int in [0, 2**63) (not a bool)")
        ours = opt.param_groups[gi] if gi < len(opt.param_groups) else None
        names = opt._names(gi, ours) if ours is not None else []
        for j, index in enumerate(saved.get("params", []) if isinstance(saved, dict) else []):
            st = state.get(index)
            if not st:
                continue
            name = names[j] if j < len(names) else f"param_groups[{gi}]['params'][{j}]"
            for key in STATE_NAMES:
                _check_state_tensor(f"{where}, parameter `{name}`, state `{key}`", key, st.get(key))


def _check_state_tensor(where: str, key: str, t: Any) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{where}: a {type(t).__name__}, not a tensor")
    if t.dtype != torch.float32:
        raise ValueError(f"{where}: dtype {t.dtype}; mulo loads float32 state only (it is not cast)")
    if t.layout != torch.strided:
        raise ValueError(f"{where}: a {t.layout} tensor; mulo loads dense state only")
    if t.numel() == 0:
        return
    t = t.detach()
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ValueError(f"{where}: {bad} non-finite value(s) of {t.numel()}; state must be finite")
    if key != "mom":
        neg = int((t < 0).sum())
        if neg:
            raise ValueError(
                f"{where}: {neg} negative value(s); second moments and factored accumulators are >= 0"
            )


def empty_state(shape: Tuple[int, ...], axes: Optional[Tuple[int, int]]) -> Dict[str, torch.Tensor]:
    """The state of a zero-element tensor of ``shape`` (factored on ``axes``), in the keys and
    PyLO shapes the native export gives a tensor with elements: ``mom`` and ``rms`` have zero
    elements; a factored accumulator that drops the zero-length axis has some, all zeros
    (PyLO's mean over an empty axis is never taken: the tensor is never stepped)."""
    mom = shape + (3,)
    st = {"mom": torch.zeros(mom), "rms": torch.zeros(shape + (1,))}
    if axes is not None:
        d0, d1 = axes
        st["fac_vec_row"] = torch.zeros(tuple(s for i, s in enumerate(mom) if i != d0))
        st["fac_vec_col"] = torch.zeros(tuple(s for i, s in enumerate(mom) if i != d1))
    else:
        st["fac_vec_v"] = torch.zeros(mom)
    return st


def state_dict_with_runtimes(
    opt,
    rts: Sequence[Any],
    base_state_dict: Callable[[], Dict[str, Any]],
    extra: Optional[Callable[[Any, int], Dict[str, Any]]] = None,
) -> Dict[str, Any]:
    """torch's ``state_dict`` of ``opt`` (``base_state_dict``, i.e. ``Optimizer.state_dict``)
    with each parameter's state exported by its group's runtime ``rts[gi]``: PyLO's tensors
    (decay-last), ``factored_axes``, and whatever ``extra(rt, j)`` adds. Groups without a runtime
    (never stepped) have no state. ``opt.state`` is swapped in for the call only."""
    kept = opt.state
    exported: Dict[Any, Dict[str, Any]] = defaultdict(dict)
    for gi, group in enumerate(opt.param_groups):
        rt = rts[gi] if gi < len(rts) else None
        if rt is None:
            continue
        live = getattr(rt, "live", None)
        for j, p in enumerate(group["params"]):
            st: Dict[str, Any] = {}
            if live is not None and j not in live:
                st.update(empty_state(tuple(p.shape), rt.axes[j]))
            else:
                k = j if live is None else live[j]
                for name, shape, data in rt.native.export_state(k):
                    st[name] = torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(shape)
            st["factored_axes"] = list(rt.axes[j]) if rt.axes[j] is not None else None
            if extra is not None:
                st.update(extra(rt, j))
            exported[p] = st
    opt.state = exported
    try:
        return base_state_dict()
    finally:
        opt.state = kept
