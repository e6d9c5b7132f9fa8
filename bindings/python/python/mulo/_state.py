"""Optimizer state between mulo's runtimes and torch's ``state_dict``, shared by the
single-process path (:mod:`mulo.torch`) and the sharded one (:mod:`mulo.distributed`)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Dict, Optional, Sequence

import torch

#: PyLO's per-tensor state entries, in the order they are imported.
STATE_NAMES = ("mom", "rms", "fac_vec_row", "fac_vec_col", "fac_vec_v")


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
        for j, p in enumerate(group["params"]):
            st: Dict[str, Any] = {}
            for name, shape, data in rt.native.export_state(j):
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
