"""PyTorch optimizers running mulo's compiled μLO_M step: ``MuLO`` and ``AdafacLO``.

They mirror PyLO's ``MuLO_naive`` and ``AdafacLO_naive`` (names, arguments, parameter groups,
``state_dict`` layout) and step CPU tensors in place with mulo's native CPU backend, and CUDA
tensors in place with mulo's packed CUDA program (one NVRTC-compiled program for all parameter
groups, launched on torch's current stream)::

    from mulo.torch import MuLO            # instead of: from pylo.optim import MuLO_naive
    mup.set_base_shapes(model, base_model)
    opt = MuLO(model.parameters(), lr=1.0, weight_decay=1e-3, max_grad_norm=1.0)

On the CPU, each parameter group is stepped by one ``mulo.optimizer.MuloOptimizer`` (one step
counter per group, as PyLO's ``group["step"]``), which applies clipping, the
non-finite-gradient policy and the guard. Tensors reach it as (address, length) pairs after
the checks below: nothing is copied, and a refused step changes nothing. On CUDA,
``_CudaGroup`` applies the same policies with torch operations on the device and queues the
packed program's launches on torch's current stream (see its docstring).
"""

from __future__ import annotations

import copy
import functools
import math
import re
import struct
import threading
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.optim import Optimizer

from mulo._native import CudaModel as _CudaModel
from mulo import _state
from mulo import hub as _hub
from mulo import distributed as _distributed
from mulo._native import Group as _Group
from mulo._native import buffer_conflict as _buffer_conflict
from mulo._native import LearnedOptimizer
from mulo._native import state_from_pylo as _state_from_pylo
from mulo._native import state_to_pylo as _state_to_pylo

__all__ = ["AdafacLO", "MuLO", "pylo_factored_axes", "LearnedOptimizer"]

# μLO_M's meta-parameters in PyLO's parameterization (offsets added to the initial decays).
_MOMENTUM_OFFSETS = (0.15216392, 0.14245212, 0.06812963)
_RMS_OFFSETS = (0.01079706,)
_ADAFACTOR_OFFSETS = (0.18621896, -0.10864615, -0.06185547)
_INITIAL_MOMENTUM = (0.9, 0.99, 0.999)
_INITIAL_RMS = (0.999,)
_INITIAL_ADAFACTOR = (0.9, 0.99, 0.999)
_EXP_MULT = 0.001
_STEP_MULT = 0.01

# PyLO's names of a tensor's state, decay-last (SPEC.md §2).


def pylo_factored_axes(shape: Sequence[int]) -> Optional[Tuple[int, int]]:
    """The factored axes (d0, d1) PyLO picks for ``shape`` on this host.

    PyLO sorts the axes with numpy's ``np.argsort`` (not stable: with tied largest axes the
    order depends on the host's SIMD, SPEC.md §2); d0 is the last of that order, d1 the one
    before. ``None`` for rank ≤ 1 (not factored).

    Args:
        shape: a tensor's shape.
    """
    if len(shape) < 2:
        return None
    order = np.argsort(tuple(shape))
    return int(order[-1]), int(order[-2])


def _decays(initial: Sequence[float], offsets: Sequence[float]) -> List[float]:
    # PyLO's arithmetic, in torch f32: clip(1 - exp(10 (log(1 - init) / 10 + offset)), 0, 1).
    init = torch.tensor(list(initial), dtype=torch.float32)
    off = torch.tensor(list(offsets), dtype=torch.float32)
    decay = 1 - torch.exp((torch.log(1 - init) / 10.0 + off) * 10.0)
    return [float(x) for x in torch.clip(decay, 0.0, 1.0)]


def _load_lopt(hf_key: Any, meta: Dict[str, Any], revision: Optional[str] = None) -> LearnedOptimizer:
    if isinstance(hf_key, LearnedOptimizer):
        lopt = hf_key
    elif isinstance(hf_key, str):
        # A Hub key becomes its snapshot in the local cache, downloaded on first use.
        lopt = LearnedOptimizer.load(_hub.local_weights(hf_key, revision))
    else:
        raise TypeError(
            f"hf_key must be a Hub key, a directory, a .safetensors file, 'demo' or a "
            f"mulo.LearnedOptimizer, not {type(hf_key).__name__}"
        )
    default = (
        meta["exp_mult"] == _EXP_MULT
        and meta["step_mult"] == _STEP_MULT
        and tuple(meta["momentum_decays"]) == _MOMENTUM_OFFSETS
        and tuple(meta["rms_decays"]) == _RMS_OFFSETS
        and tuple(meta["adafactor_decays"]) == _ADAFACTOR_OFFSETS
        and tuple(meta["initial_momentum_decays"]) == _INITIAL_MOMENTUM
        and tuple(meta["initial_rms_decays"]) == _INITIAL_RMS
        and tuple(meta["initial_adafactor_decays"]) == _INITIAL_ADAFACTOR
    )
    if default:
        # μLO_M's: mulo's normative f32 decays (SPEC.md §1), or those of the given optimizer.
        return lopt
    for key, n in (("momentum_decays", 3), ("rms_decays", 1), ("adafactor_decays", 3)):
        if len(meta[key]) != n or len(meta["initial_" + key]) != n:
            raise ValueError(f"{key} and initial_{key} must hold {n} values each")
    return lopt.with_meta(
        float(meta["exp_mult"]),
        float(meta["step_mult"]),
        _decays(meta["initial_momentum_decays"], meta["momentum_decays"]),
        _decays(meta["initial_rms_decays"], meta["rms_decays"])[0],
        _decays(meta["initial_adafactor_decays"], meta["adafactor_decays"]),
    )


def _f32_value(where: str, key: str, value: Any, rule: str, positive: bool = False) -> None:
    """Refuses ``value`` unless it is a number (not a bool) whose f32 value, the one the native
    step receives, is finite (``1e39`` is a finite Python float but rounds to f32 infinity)
    and ``>= 0`` (``> 0`` when ``positive``: ``1e-46`` rounds to 0)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        try:
            # struct rounds as the f64 -> f32 conversion does and raises exactly when the
            # result overflows to infinity.
            (v,) = struct.unpack("<f", struct.pack("<f", value))
            ok = math.isfinite(v) and (v > 0 if positive else v >= 0)
        except (OverflowError, struct.error):
            ok = False
    if not ok:
        raise ValueError(f"{where}: {key}={value!r} must be {rule}")


def _check_hyper(where: str, lr: Any, weight_decay: Any, max_grad_norm: Any) -> None:
    _f32_value(where, "lr", lr, "a number >= 0, finite in float32 (not a bool)")
    _f32_value(where, "weight_decay", weight_decay, "a number >= 0, finite in float32 (not a bool)")
    if max_grad_norm is not None:
        _f32_value(
            where, "max_grad_norm", max_grad_norm, "None or a number > 0, finite in float32 (not a bool)", True
        )


_F32_MAX = float(np.finfo(np.float32).max)


def _count_nonfinite(g: torch.Tensor) -> str:
    """The count string of the Rust optimizer's report (``NonFiniteCount``)."""
    nan = int(torch.isnan(g).sum())
    pos = int((g == float("inf")).sum())
    neg = int((g == float("-inf")).sum())
    return f"{nan} NaN, {pos} +Inf, {neg} -Inf"


class _CudaProgram:
    """One packed CUDA program for the tensors of several parameter groups (in group order):
    built for the optimizer's layouts, compiled by NVRTC at the first step (the PTX cached on
    disk) and shared by the groups' ``_CudaGroup``s, so a model is compiled once, whatever its
    number of groups (``MuLO`` makes one per width multiplier)."""

    def __init__(self, lopt, layouts: Dict[int, Tuple[list, list]], device: torch.device):
        self.first: Dict[int, int] = {}
        self.layouts = layouts
        shapes: List[list] = []
        axes: List[Any] = []
        for gi, (s, a) in layouts.items():
            self.first[gi] = len(shapes)
            shapes += s
            axes += a
        self.model = _CudaModel(lopt, [list(x) for x in shapes], [tuple(x) if x is not None else None for x in axes])
        self.n = len(shapes)
        self.device = device
        self._stepper = None

    def stepper(self):
        if self._stepper is None:
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self._stepper = self.model.stepper(index)
        return self._stepper


class _CudaGroup:
    """One parameter group on a CUDA device: its tensors in a shared ``_CudaProgram`` (from
    ``first`` on) and every tensor's optimizer state as torch tensors on the device (canonical
    decay-major layout).

    A step does what ``MuloOptimizer::step_partial`` does on the CPU, with torch operations on
    the device where it needs values: the non-finite policy (``skip``/``zero``/``error``) and
    per-tensor clipping (``torch.nn.utils.clip_grad_norm_``'s rule, the norm in f64) need one
    device-to-host transfer of one value per tensor; ``zero`` and clipping step a temporary
    sanitized or scaled gradient (the caller's gradient is never modified); the guard keeps a
    device copy of every stepped parameter and state and checks them after the step (one more
    transfer), restoring any tensor whose step came out non-finite. Then the program's
    launches are queued on ``torch.cuda.current_stream()``: parameters and state are updated in
    place, with no host copy. Without the guard and without those policies' needs (no
    non-finite gradient, no clipping), a step waits for nothing but the finiteness check.

    bfloat16/float16 tensors are stepped as on the CPU (see :class:`_PerTensorGroup`): one
    launch per such tensor on float32 temporaries of its parameter and gradient (exact upcasts;
    a sanitized or clipped gradient is computed in float32), the parameter rounded back to
    nearest-even; the guard then checks the rounded parameter (a float16 overflow is undone).
    """

    def __init__(self, lopt, names, shapes, axes, max_grad_norm, nonfinite, guard, device, program=None, gi=0):
        self.names = names
        self.shapes = shapes
        self.axes = axes
        self.nonfinite = nonfinite
        self.guard = guard
        self.device = device
        self.max_grad_norm = max_grad_norm
        if program is None:
            program = _CudaProgram(lopt, {gi: (list(shapes), list(axes))}, device)
        self.program = program
        self.first = program.first[gi]  # this group's first tensor in the program
        self.state: List[Dict[str, torch.Tensor]] = []
        for j in range(len(shapes)):
            self.state.append({
                name: torch.zeros(shape, dtype=torch.float32, device=device)
                for name, shape in program.model.state_buffers(self.first + j)
            })
        self.step_count = 0

    # The interface of mulo._native.Group that AdafacLO uses.

    @property
    def target(self) -> str:
        return "cuda"

    @property
    def compiled_plans(self) -> int:
        return self.program.model.n_plans

    def set_step_count(self, step: int) -> None:
        self.step_count = int(step)

    def set_max_grad_norm(self, max_grad_norm) -> None:
        self.max_grad_norm = max_grad_norm

    def export_state(self, j: int):
        buffers = [(name, t.detach().cpu().numpy().tobytes()) for name, t in self.state[j].items()]
        return _state_to_pylo(list(self.shapes[j]), self.axes[j], buffers)

    def import_state(self, j: int, tensors) -> None:
        given = []
        for name, shape, (ptr, numel) in tensors:
            # The CPU tensors the caller keeps alive: their values, by address.
            import ctypes

            data = ctypes.string_at(ptr, 4 * numel) if numel else b""
            given.append((name, list(shape), data))
        canonical = _state_from_pylo(list(self.shapes[j]), self.axes[j], given)
        for name, data in canonical:
            dst = self.state[j][name]
            src = torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(dst.shape)
            dst.copy_(src)

    def step(self, params, grads, lr: float, weight_decay: float) -> Dict[str, list]:
        n = len(params)
        report: Dict[str, list] = {k: [] for k in ("skipped", "sanitized", "nonfinite", "clipped", "reverted", "without_grad")}
        report["step"] = self.step_count
        # Optional[Tensor] entries; Any because mypy cannot narrow those that `live` keeps.
        work: List[Any] = list(grads)
        live = [j for j in range(n) if work[j] is not None]
        for j in range(n):
            if work[j] is None:
                report["without_grad"].append(self.names[j])
        stepper = self.program.stepper()  # compile before anything changes: an error changes nothing
        if live:
            # One transfer: every gradient's finiteness (and its norm when clipping).
            flags = torch.stack([torch.isfinite(work[j]).all().to(torch.float64) for j in live])
            if self.max_grad_norm is not None:
                norms = torch.stack([torch.linalg.vector_norm(work[j], dtype=torch.float64) for j in live])
                flags = torch.cat([flags, norms])
            values = flags.tolist()
            finite = [v == 1.0 for v in values[:len(live)]]
            bad = [j for j, ok in zip(live, finite) if not ok]
            for j in bad:
                report["nonfinite"].append((self.names[j], _count_nonfinite(work[j])))
            if bad and self.nonfinite == "error":
                listed = ", ".join(f"`{name}` ({c})" for name, c in report["nonfinite"])
                raise ValueError(f"non-finite gradient in {listed}; nothing was changed (nonfinite='error')")
            for j in bad:
                if self.nonfinite == "skip":
                    report["skipped"].append(self.names[j])
                    work[j] = None
                else:
                    # In float32 (a half gradient's upcast): float32's largest value replaces ±inf.
                    work[j] = torch.nan_to_num(work[j].float(), nan=0.0, posinf=_F32_MAX, neginf=-_F32_MAX)
                    report["sanitized"].append(self.names[j])
            if self.max_grad_norm is not None:
                max_norm = float(np.float32(self.max_grad_norm))
                for k, j in enumerate(live):
                    if work[j] is None:
                        continue
                    norm = values[len(live) + k]
                    if j in bad:  # sanitized: its norm is that of the new values
                        norm = float(torch.linalg.vector_norm(work[j], dtype=torch.float64))
                    coef = max_norm / (norm + 1e-6)
                    if coef < 1.0:
                        # In float32 (a half gradient's upcast), as the CPU path scales.
                        work[j] = work[j].float() * float(np.float32(coef))
                        report["clipped"].append((self.names[j], norm))
        stepped = [j for j in range(n) if work[j] is not None]
        snapshots = {}
        if self.guard:
            for j in stepped:
                snapshots[j] = (params[j].detach().clone(), {k: t.clone() for k, t in self.state[j].items()})
        stream = torch.cuda.current_stream(self.device).cuda_stream

        def launch(js: List[int], ptrs: Dict[int, Tuple[int, int]]) -> None:
            """Queues the program for this group's tensors ``js`` ((parameter, gradient)
            addresses ``ptrs[j]``); the program's other tensors (other groups') are not
            stepped by this call."""
            addrs: List[int] = [0] * (7 * self.first)
            hypers: List[Any] = [None] * self.first
            for j in range(n):
                if j not in ptrs:
                    addrs += [0] * 7
                    hypers.append(None)
                    continue
                st = list(self.state[j].values())
                addrs += list(ptrs[j]) + [t.data_ptr() for t in st] + [0] * (5 - len(st))
                hypers.append((lr, weight_decay))
            rest = self.program.n - self.first - n
            addrs += [0] * (7 * rest)
            hypers += [None] * rest
            try:
                stepper.step(stream, addrs, hypers, [self.step_count] * self.program.n)
            except ValueError as e:
                # The Rust checks name tensors by index and buffers by kind: name the parameters.
                def named(m):
                    name = self.names[int(m.group(1)) - self.first]
                    return f"`{name}`" if m.group(2) == "param" else f"`{name}.{m.group(2)}`"

                raise ValueError(re.sub(r"tensor (\d+) `(\w+)`", named, str(e))) from None

        # float32 tensors: one launch for all, in place.
        whole = [j for j in stepped if params[j].dtype is torch.float32]
        if whole or not stepped:
            launch(whole, {j: (params[j].data_ptr(), work[j].data_ptr()) for j in whole})
        # bfloat16/float16 tensors (as on the CPU): one launch each, on float32 temporaries of
        # that tensor only (its exact upcasts), the parameter rounded back to nearest-even by
        # copy_ on the same stream, so the temporaries' memory is reused only after the launch.
        for j in stepped:
            if params[j].dtype is torch.float32:
                continue
            p32 = params[j].detach().float()
            g32 = work[j] if work[j].dtype is torch.float32 else work[j].float()
            launch([j], {j: (p32.data_ptr(), g32.data_ptr())})
            params[j].detach().copy_(p32)
        if stepped:
            # As MuloOptimizer: with the guard, parameter and state must be finite; without,
            # a non-finite parameter is an error.
            def all_finite(j):
                ok = torch.isfinite(params[j]).all()
                if self.guard:
                    for t in self.state[j].values():
                        ok = ok & torch.isfinite(t).all()
                return ok

            ok = torch.stack([all_finite(j) for j in stepped]).tolist()
            broken = [j for j, good in zip(stepped, ok) if not good]
            if broken and not self.guard:
                names = ", ".join(f"`{self.names[j]}`" for j in broken)
                raise RuntimeError(
                    f"the step made the parameters {names} non-finite (the guard is off, so they were not restored)"
                )
            for j in broken:
                old_p, old_state = snapshots[j]
                params[j].detach().copy_(old_p)
                for key, t in self.state[j].items():
                    t.copy_(old_state[key])
                report["reverted"].append(self.names[j])
                report["skipped"].append(self.names[j])
        self.step_count += 1
        return report


def _one_call_at_a_time(method):
    """Runs ``method`` holding the optimizer's lock: a step, ``state_dict``,
    ``load_state_dict`` or copy may come from any thread, and concurrent calls are serialized
    (a step that waited runs after the other has finished, on its results)."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


#: The half-precision dtypes stepped (on the CPU by :class:`_PerTensorGroup`, on CUDA by
#: :class:`_CudaGroup`), in float32 on their exact upcasts.
_HALF = (torch.bfloat16, torch.float16)


def _check_overlaps(names: List[str], params: List[torch.Tensor], grads: List[Optional[torch.Tensor]]) -> None:
    """The native group's buffer check (no parameter sharing memory with another parameter or
    a gradient) for a group stepped one tensor at a time, whose native groups each see one
    tensor only. Raises the native check's error."""
    spans = []
    for j, p in enumerate(params):
        spans.append((p.data_ptr(), p.data_ptr() + p.numel() * p.element_size(), f"`{names[j]}`", True))
        g = grads[j]
        if g is not None:
            spans.append((g.data_ptr(), g.data_ptr() + g.numel() * g.element_size(), f"`{names[j]}.grad`", False))
    # Sorted by start (ties: a parameter before its gradient, as given); a span overlaps a
    # later one iff that one starts before the furthest end seen so far.
    order = sorted(range(len(spans)), key=lambda k: (spans[k][0], k))
    reach = None  # (end, name, written) of the span reaching furthest so far
    for start, end, name, written in (spans[k] for k in order):
        if end == start:
            continue
        if reach is not None and start < reach[0] and (written or reach[2]):
            raise ValueError(
                f"step: the memory of {reach[1]} and {name} overlaps (a parameter must not share "
                "storage with another parameter or a gradient)"
            )
        if reach is None or end > reach[0]:
            reach = (end, name, written)


class _PerTensorGroup:
    """A CPU parameter group holding bfloat16 or float16 tensors: one native ``Group`` per
    tensor (each with the group's step counter), so that a step needs float32 temporaries
    for one tensor at a time, never a float32 copy of the group.

    A half tensor's step: its parameter and gradient are upcast to float32 (exactly: every
    bfloat16/float16 value is a float32 value), the float32 step runs on them with the
    tensor's float32 state, and the parameter is written back rounded to nearest-even once
    (torch's ``copy_`` into the half tensor). The result is bitwise the float32 step of the
    upcast tensors, rounded. An update smaller than half an ulp of the parameter rounds back
    to the old value and is lost (as in PyLO on bfloat16); the state keeps moving in float32.
    float32 tensors of such a group are stepped in place, as in a plain group.
    """

    def __init__(self, groups: List[Any]):
        self.groups = groups

    # The interface of mulo._native.Group that AdafacLO uses.

    @property
    def target(self) -> str:
        return self.groups[0].target

    @property
    def compiled_plans(self) -> int:
        return sum(g.compiled_plans for g in self.groups)

    @property
    def step_count(self) -> int:
        return self.groups[0].step_count

    def set_step_count(self, step: int) -> None:
        for g in self.groups:
            g.set_step_count(step)

    def set_max_grad_norm(self, max_grad_norm) -> None:
        for g in self.groups:
            g.set_max_grad_norm(max_grad_norm)

    def export_state(self, j: int):
        return self.groups[j].export_state(0)

    def import_state(self, j: int, tensors) -> None:
        self.groups[j].import_state(0, tensors)

    def step(self, params, grads, lr: float, weight_decay: float) -> Dict[str, list]:
        """Steps every tensor (``params``/``grads``: the tensors, None for no gradient). The
        caller has checked them, and their gradients' finiteness when the policy is
        ``"error"``, so that no tensor's step is refused after another's was written."""
        report: Dict[str, list] = {}
        for native, p, g in zip(self.groups, params, grads):
            half = p.dtype is not torch.float32
            # One tensor's float32 temporaries at a time (none for a float32 tensor).
            work_p = p.detach().float() if half else p.detach()
            work_g = None if g is None else (g.float() if half else g)
            r = native.step(
                [work_p.data_ptr(), work_p.numel()],
                [0, 0] if work_g is None else [work_g.data_ptr(), work_g.numel()],
                lr,
                weight_decay,
            )
            if half and work_g is not None and not r["skipped"]:
                p.detach().copy_(work_p)  # float32 -> half: rounded to nearest-even
            for key, value in r.items():
                if key != "step":
                    report.setdefault(key, []).extend(value)
        return report


class _Runtime:
    """A built parameter group: its native group, and the shapes and axes fixed at build.

    ``live`` maps the group's tensor ``j`` to its index in the native group, which holds only
    the tensors with elements (None: all of them, the common case). A zero-element parameter
    is never passed to native code: it is left as it is and its state has zero size."""

    __slots__ = ("native", "shapes", "axes", "names", "max_grad_norm", "live")

    def __init__(self, native, shapes, axes, names, max_grad_norm, live=None):
        self.native = native
        self.shapes = shapes
        self.axes = axes
        self.names = names
        self.max_grad_norm = max_grad_norm
        self.live: Optional[Dict[int, int]] = live


class _NoTensors:
    """The native group of a parameter group whose tensors all have zero elements: nothing
    to step, only PyLO's step counter."""

    target = "none"
    compiled_plans = 0

    def __init__(self, device: torch.device):
        self.device = device
        self.step_count = 0

    def set_step_count(self, step: int) -> None:
        self.step_count = int(step)

    def set_max_grad_norm(self, max_grad_norm) -> None:
        pass

    def step(self, params, grads, lr: float, weight_decay: float) -> Dict[str, Any]:
        report: Dict[str, Any] = {k: [] for k in ("skipped", "sanitized", "nonfinite", "clipped", "reverted", "without_grad")}
        report["step"] = self.step_count
        self.step_count += 1
        return report


class AdafacLO(Optimizer):
    """μLO_M without μP (PyLO's ``AdafacLO_naive``), stepped by mulo; takes any parameters.

    Arguments as PyLO's: ``lr`` (default 1.0), ``max_grad_norm`` (per-tensor clipping), the
    meta-parameters (``exp_mult``, ``step_mult``, ``momentum_decays``, ``rms_decays``,
    ``adafactor_decays`` as offsets of the ``initial_*`` decays) and ``hf_key``: a Hub key
    (default ``btherien/mulo``) taken from the local Hugging Face cache and downloaded into it
    with ``huggingface_hub`` on first use (at ``revision``, default the main branch; see
    :mod:`mulo.hub` for the variables honored), a directory in the Hub layout, a
    ``.safetensors`` file, ``"demo"`` (the bundled demo network) or a ``mulo.LearnedOptimizer``.

    mulo's additions: ``weight_decay`` (``P ← P − lr·wd·P`` after the update, per group),
    ``nonfinite`` (``"skip"``: a tensor whose gradient has NaN/Inf is left unchanged;
    ``"zero"``: they are replaced as JAX μLO's ``nan_to_num``; ``"error"``: the step is refused
    and nothing changes), ``guard`` (undo any tensor whose step came out non-finite),
    ``backend`` (``"auto"``, the default: the native CPU backend for CPU tensors, the packed
    CUDA program for CUDA tensors; ``"cpu"``; ``"cuda"``; ``"interp"``: the reference
    interpreter, CPU tensors)
    and ``factored_axes`` (``{param: (d0, d1)}`` overriding PyLO's numpy argsort for those
    tensors; see :meth:`set_factored_axes`).

    Every parameter with a gradient must be a contiguous tensor with a dense contiguous
    gradient of its dtype, all of them on one device (the CPU, or one CUDA device), of the
    shape it had at its first step; anything else is refused with an error naming the
    parameter, before anything changes. The dtype is float32, bfloat16 or float16 (the state
    stays float32; a half tensor is stepped in float32 on the exact upcast of its parameter and
    gradient, the parameter rounded back to nearest-even once, one tensor at a time; an update
    smaller than half an ulp of the parameter is lost, as in PyLO). On CUDA the optimizer's
    tensors are one packed program compiled by NVRTC at the first step (libnvrtc must be
    loadable; the PTX is cached on disk), and the state lives in device memory.

    A step checks every group's hyper-parameters (as the float32 values the native step gets),
    tensors and gradients before any group steps, so a refused step changes nothing;
    ``load_state_dict`` checks what it loads the same way. The optimizer may be used from any
    thread: a step, ``state_dict``, ``load_state_dict`` or ``copy.deepcopy`` runs one at a time
    (concurrent calls wait for each other). ``copy.deepcopy`` gives an independent optimizer
    with the same state; pickling is refused (save its ``state_dict`` instead). A zero-element
    parameter is accepted and left as it is (its state is all zeros).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        weight_decay: float = 0.0,
        max_grad_norm: Optional[float] = None,
        hf_key: Any = "btherien/mulo",
        exp_mult: float = _EXP_MULT,
        step_mult: float = _STEP_MULT,
        momentum_decays: Sequence[float] = _MOMENTUM_OFFSETS,
        rms_decays: Sequence[float] = _RMS_OFFSETS,
        adafactor_decays: Sequence[float] = _ADAFACTOR_OFFSETS,
        initial_momentum_decays: Sequence[float] = _INITIAL_MOMENTUM,
        initial_rms_decays: Sequence[float] = _INITIAL_RMS,
        initial_adafactor_decays: Sequence[float] = _INITIAL_ADAFACTOR,
        nonfinite: str = "skip",
        guard: bool = True,
        backend: str = "auto",
        factored_axes: Optional[Dict[torch.Tensor, Tuple[int, int]]] = None,
        revision: Optional[str] = None,
    ):
        """Builds the optimizer; nothing is compiled or stepped before the first :meth:`step`.

        Args:
            params: the parameters (tensors, ``(name, tensor)`` pairs, whose names then appear
                in errors and reports, or parameter-group dicts as torch's).
            lr: learning rate (default 1.0, PyLO's); per group, read at every step.
            weight_decay: decoupled weight decay, ``P ← P − lr·wd·P`` after the update (mulo's
                addition; default 0); per group.
            max_grad_norm: per-tensor gradient clipping norm (None: no clipping); per group.
            hf_key: the weights: a Hub key (default ``btherien/mulo``) from the local Hugging
                Face cache, downloaded there with ``huggingface_hub`` on first use, a directory
                in the Hub layout, a ``.safetensors`` file, ``"demo"`` (the bundled demo
                network) or a ``mulo.LearnedOptimizer``.
            exp_mult: μLO_M's exponent multiplier of the update (PyLO's, default 0.001).
            step_mult: μLO_M's step multiplier of the update (PyLO's, default 0.01).
            momentum_decays: offsets of the 3 momentum decays (PyLO's parameterization).
            rms_decays: offset of the second-moment decay (one value).
            adafactor_decays: offsets of the 3 Adafactor decays.
            initial_momentum_decays: the 3 momentum decays the offsets apply to.
            initial_rms_decays: the second-moment decay its offset applies to (one value).
            initial_adafactor_decays: the 3 Adafactor decays their offsets apply to.
            nonfinite: a gradient with NaN/Inf: ``"skip"`` (default) leaves its tensor
                unchanged, ``"zero"`` replaces them as JAX μLO's ``nan_to_num``, ``"error"``
                refuses the step and changes nothing.
            guard: undo any tensor whose step came out non-finite (default True).
            backend: ``"auto"`` (default: the native CPU backend for CPU tensors, the packed
                CUDA program for CUDA tensors), ``"cpu"``, ``"cuda"`` or ``"interp"`` (the
                reference interpreter, CPU tensors).
            factored_axes: ``{param: (d0, d1)}`` overriding PyLO's numpy argsort for those
                tensors (see :meth:`set_factored_axes`).
            revision: the Hub revision (branch, tag or commit hash) of a Hub key ``hf_key``
                (default: the main branch).
        """
        _check_hyper(type(self).__name__, lr, weight_decay, max_grad_norm)
        if nonfinite not in ("skip", "zero", "error"):
            raise ValueError(f"nonfinite={nonfinite!r}: expected 'skip', 'zero' or 'error'")
        if backend not in ("auto", "cpu", "cuda", "interp"):
            raise ValueError(f"backend={backend!r}: expected 'auto', 'cpu', 'cuda' or 'interp'")
        meta = dict(
            exp_mult=exp_mult,
            step_mult=step_mult,
            momentum_decays=momentum_decays,
            rms_decays=rms_decays,
            adafactor_decays=adafactor_decays,
            initial_momentum_decays=initial_momentum_decays,
            initial_rms_decays=initial_rms_decays,
            initial_adafactor_decays=initial_adafactor_decays,
        )
        self.lopt = _load_lopt(hf_key, meta, revision)
        self._nonfinite = nonfinite
        self._guard = bool(guard)
        self._backend = backend
        self._axes_override: Dict[int, Tuple[torch.Tensor, Tuple[int, int]]] = {}
        self._rt: List[Optional[_Runtime]] = []
        self._cuda_prog: Optional[_CudaProgram] = None
        # DTensor parameters (FSDP2): the sharded path of mulo.distributed, set at the first step.
        self._sharded: Optional[_distributed.ShardedSteps] = None
        #: What the last :meth:`step` did: lists of parameter names per event.
        self.last_report: Dict[str, list] = {}
        # Reentrant: load_state_dict and __deepcopy__ call state_dict and _build.
        self._lock = threading.RLock()
        defaults = dict(lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)
        for p, axes in (factored_axes or {}).items():
            self.set_factored_axes(p, axes)

    # ------------------------------------------------------------------------ copies

    def __deepcopy__(self, memo: Dict[int, Any]) -> "AdafacLO":
        """An independent optimizer with the same state, as torch's optimizers deep-copy: the
        parameters are deep-copied through ``memo`` (so ``copy.deepcopy((model, opt))`` steps
        the copied model's parameters), the learned optimizer (immutable) is shared, and the
        native state is carried by a ``state_dict`` round trip, so both continue bitwise as the
        original would. Not supported with DTensor parameters (``TypeError``)."""
        if self._sharded is not None or _distributed.has_dtensors(self.param_groups):
            raise TypeError(
                "copy.deepcopy of a mulo optimizer of DTensor parameters is not supported; "
                "save and load its state_dict on each rank instead"
            )
        with self._lock:
            saved = self.state_dict()
            cls = type(self)
            new = cls.__new__(cls)
            memo[id(self)] = new
            memo[id(self.lopt)] = self.lopt
            # The native runtimes (rebuilt by load_state_dict), the lock, and what is keyed by
            # the original parameters' ids are not copied.
            fresh = ("_lock", "_rt", "_cuda_prog", "_sharded", "state", "_axes_override")
            for key, value in self.__dict__.items():
                if key not in fresh:
                    new.__dict__[key] = copy.deepcopy(value, memo)
            new._lock = threading.RLock()
            new.state = defaultdict(dict)
            new._rt = [None] * len(new.param_groups)
            new._cuda_prog = None
            new._sharded = None
            new._axes_override = {
                id(memo[id(p)]): (memo[id(p)], axes)
                for p, axes in self._axes_override.values()
                if id(p) in memo
            }
            new.load_state_dict(saved)
            return new

    def __getstate__(self) -> Dict[str, Any]:
        # torch's Optimizer.__getstate__ would pickle (and copy.copy would share) the native
        # runtimes, which hold the optimizer state: refuse clearly instead.
        raise TypeError(
            f"{type(self).__name__} cannot be pickled or shallow-copied (its state lives in native "
            "objects): save opt.state_dict() and load it into a new optimizer, or use copy.deepcopy(opt)"
        )

    # ----------------------------------------------------------------- parameter groups

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Adds a parameter group, as torch's.

        Args:
            param_group: a dict with ``params`` and any of ``lr``, ``weight_decay`` and
                ``max_grad_norm`` (the optimizer's defaults otherwise).
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyper(
            f"param_groups[{len(self.param_groups) - 1}]",
            group["lr"],
            group["weight_decay"],
            group["max_grad_norm"],
        )
        self._rt.append(None)

    def _names(self, gi: int, group: Dict[str, Any]) -> List[str]:
        names = group.get("param_names")
        if names is not None and len(names) == len(group["params"]):
            return [str(n) for n in names]
        return [
            f"param_groups[{gi}]['params'][{j}] (shape {list(p.shape)})"
            for j, p in enumerate(group["params"])
        ]

    def set_factored_axes(self, param: torch.Tensor, axes: Tuple[int, int]) -> None:
        """Steps ``param`` with the factored axes ``(d0, d1)`` instead of PyLO's argsort.

        The axes are fixed at the first step of the parameter's group (and saved in its
        state); they can only be set before.

        Args:
            param: a parameter of this optimizer, of rank ≥ 2.
            axes: two different axes ``(d0, d1)`` of it.
        """
        for gi, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                if p is param:
                    if self._rt[gi] is not None:
                        raise ValueError(
                            f"parameter `{self._names(gi, group)[j]}` has already been stepped: "
                            "its factored axes are fixed (they are saved in its state)"
                        )
                    d0, d1 = (int(a) for a in axes)
                    rank = p.dim()
                    if rank < 2 or not (0 <= d0 < rank and 0 <= d1 < rank and d0 != d1):
                        raise ValueError(
                            f"factored axes {tuple(axes)} for a parameter of shape "
                            f"{list(p.shape)}: need two different axes of a tensor of rank >= 2"
                        )
                    self._axes_override[id(p)] = (p, (d0, d1))
                    return
        raise ValueError("set_factored_axes: the tensor is not a parameter of this optimizer")

    def factored_axes(self, param: torch.Tensor) -> Optional[Tuple[int, int]]:
        """The factored axes ``param`` is (or will be) stepped with; None for rank ≤ 1.

        Args:
            param: a parameter of this optimizer.
        """
        for gi, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                if p is param:
                    rt = self._rt[gi]
                    if rt is not None:
                        return rt.axes[j]
                    return self._axes_for(p)
        raise ValueError("factored_axes: the tensor is not a parameter of this optimizer")

    def _axes_for(self, p: torch.Tensor) -> Optional[Tuple[int, int]]:
        hit = self._axes_override.get(id(p))
        if hit is not None and hit[0] is p:
            return hit[1]
        return pylo_factored_axes(tuple(p.shape))

    def _build(self, gi: int, group: Dict[str, Any], device: Optional[torch.device] = None) -> _Runtime:
        params = group["params"]
        names = self._names(gi, group)
        shapes = [tuple(p.shape) for p in params]
        axes = [self._axes_for(p) for p in params]
        device = device if device is not None else self._device()
        # Zero-element parameters are left out of the native group (see _Runtime.live).
        keep = [j for j, p in enumerate(params) if p.numel() > 0]
        live = None if len(keep) == len(params) else {j: k for k, j in enumerate(keep)}
        n_names = [names[j] for j in keep]
        n_shapes = [shapes[j] for j in keep]
        n_axes = [axes[j] for j in keep]
        native: Any  # a _CudaGroup, _PerTensorGroup, _NoTensors or native Group: the same interface
        if not keep:
            native = _NoTensors(device)
        elif device.type == "cuda":
            native = _CudaGroup(
                self.lopt, n_names, n_shapes, n_axes, group["max_grad_norm"], self._nonfinite, self._guard, device,
                self._cuda_program(gi, n_shapes, n_axes, device), gi,
            )
        else:

            def native_group(k: List[int]) -> Any:
                return _Group(
                    self.lopt,
                    [n_names[j] for j in k],
                    [list(n_shapes[j]) for j in k],
                    [(a[0], a[1]) if a is not None else None for a in (n_axes[j] for j in k)],
                    group["max_grad_norm"],
                    self._nonfinite,
                    self._guard,
                    "cpu" if self._backend == "auto" else self._backend,
                )

            if any(params[j].dtype in _HALF for j in keep):
                native = _PerTensorGroup([native_group([k]) for k in range(len(keep))])
            else:
                native = native_group(list(range(len(keep))))
        if group.get("step"):
            native.set_step_count(int(group["step"]))
        return _Runtime(native, shapes, axes, names, group["max_grad_norm"], live)

    def _cuda_program(self, gi: int, shapes, axes, device: torch.device) -> "_CudaProgram":
        """The program stepping group ``gi``: one for every group of the optimizer, built
        when the first group is, reused by the others (a group whose tensors changed since,
        or one added later, gets a new one)."""
        prog = self._cuda_prog
        if prog is None or prog.device != device or prog.layouts.get(gi) != (list(shapes), list(axes)):
            layouts = {}
            for k, group in enumerate(self.param_groups):
                if k == gi:
                    layouts[k] = (list(shapes), list(axes))
                elif group["params"] and all(p.device == device for p in group["params"]):
                    live = [p for p in group["params"] if p.numel() > 0]
                    layouts[k] = ([tuple(p.shape) for p in live], [self._axes_for(p) for p in live])
            prog = self._cuda_prog = _CudaProgram(self.lopt, layouts, device)
        return prog

    def _device(self) -> torch.device:
        """The device every parameter must be on: that of the groups already built, else of
        the first parameter. Refuses a device the chosen backend does not step."""
        device = None
        for rt in self._rt:
            if rt is not None:
                device = rt.native.device if isinstance(rt.native, (_CudaGroup, _NoTensors)) else torch.device("cpu")
                break
        first = None
        if device is None:
            for gi, group in enumerate(self.param_groups):
                if group["params"]:
                    first = self._names(gi, group)[0]
                    device = group["params"][0].device
                    break
        if device is None:
            return torch.device("cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        where = f"parameter `{first}` is on {device}" if first else f"the optimizer's state is on {device}"
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"{where}: mulo steps CPU and CUDA tensors")
        if device.type == "cuda" and self._backend in ("cpu", "interp"):
            raise ValueError(
                f"{where}: backend={self._backend!r} steps CPU tensors (use backend='auto' or 'cuda')"
            )
        if device.type == "cpu" and self._backend == "cuda":
            raise ValueError(f"{where}: backend='cuda' steps CUDA tensors (use backend='auto' or 'cpu')")
        return device

    # ----------------------------------------------------------------------------- step

    def _check(self, gi: int, group: Dict[str, Any], names: List[str], device: torch.device):
        """Checks one group's tensors. On the CPU, returns the flat lists [address, length, ...]
        of the parameters and of the gradients (0, 0 where a parameter has no gradient); on
        CUDA, the lists of parameters and of gradients (None where there is none)."""
        rt = self._rt[gi]
        shapes = rt.shapes if rt is not None else None
        f32, strided = torch.float32, torch.strided
        grads: List[Any]  # the gradients (CUDA) or their addresses (CPU)
        if device.type == "cuda":
            params, grads = [], []
            for j, p in enumerate(group["params"]):
                if not (
                    p.device == device
                    and (p.dtype is f32 or p.dtype in _HALF)
                    and p.is_contiguous()
                    and (shapes is None or p.shape == shapes[j])
                ):
                    self._refuse(names[j], p, None, shapes[j] if shapes else None, device, half_group=True)
                if p.numel() == 0:
                    continue  # zero elements: left as it is (_Runtime.live)
                params.append(p)
                g = p.grad
                if g is not None and not (
                    g.layout is strided
                    and g.device == device
                    and g.dtype is p.dtype
                    and g.is_contiguous()
                    and g.shape == p.shape
                ):
                    self._refuse(names[j], p, g, None, device, half_group=True)
                grads.append(g)
            return params, grads
        # A group holding half tensors at its first step is stepped one tensor at a time.
        if rt is not None:
            per_tensor = isinstance(rt.native, _PerTensorGroup)
        else:
            per_tensor = any(p.dtype in _HALF for p in group["params"])
        if per_tensor:
            return self._check_per_tensor(group, names, shapes, device)
        ptrs: List[int] = []
        grads = []
        for j, p in enumerate(group["params"]):
            # The common case in one expression; the reasons are spelled out only on failure.
            if not (
                p.is_cpu
                and p.dtype is f32
                and p.is_contiguous()
                and (shapes is None or p.shape == shapes[j])
            ):
                self._refuse(names[j], p, None, shapes[j] if shapes else None, device)
            n = p.numel()
            if n == 0:
                continue  # zero elements: left as it is (_Runtime.live)
            ptrs += (p.data_ptr(), n)
            g = p.grad
            if g is None:
                grads += (0, 0)
                continue
            if not (
                g.layout is strided
                and g.is_cpu
                and g.dtype is f32
                and g.is_contiguous()
                and g.shape == p.shape
            ):
                self._refuse(names[j], p, g, None, device)
            grads += (g.data_ptr(), g.numel())
        return ptrs, grads

    def _check_across_groups(self, groups, work, device: torch.device) -> None:
        """Refuses a step whose buffers overlap across groups (or within one): each group's
        native step checks only its own buffers, after the groups before it have stepped."""
        names = []
        for gi, group in enumerate(groups):
            rt = self._rt[gi]
            group_names = rt.names if rt is not None else self._names(gi, group)
            names += [n for n, p in zip(group_names, group["params"]) if p.numel() > 0]
        if device.type == "cuda" or any(ps and isinstance(ps[0], torch.Tensor) for ps, _ in work):
            # Tensors (CUDA, or a CPU group stepped one tensor at a time): spans in bytes, as
            # bfloat16/float16 tensors need (the native check counts float32 values).
            tensors = [p for group in groups for p in group["params"] if p.numel() > 0]
            _check_overlaps(names, tensors, [p.grad for p in tensors])
            return
        params: List[int] = []
        grads: List[int] = []
        for ps, gs in work:
            params += ps
            grads += gs
        conflict = _buffer_conflict(params, grads)
        if conflict is None:
            return

        def what(k):
            return f"`{names[k]}`" if k < len(names) else f"`{names[k - len(names)]}.grad`"
        a, b = conflict
        if a == b:
            raise ValueError(f"step: {what(a)} has an address that is not that of float32 data")
        raise ValueError(
            f"step: the memory of {what(a)} and {what(b)} overlaps (a parameter must not share "
            "storage with another parameter or a gradient)"
        )

    def _check_per_tensor(self, group: Dict[str, Any], names: List[str], shapes, device: torch.device):
        """:meth:`_check` for a CPU group holding bfloat16/float16 tensors (stepped by a
        :class:`_PerTensorGroup`): the lists of parameters and of gradients (None where there
        is none)."""
        params: List[torch.Tensor] = []
        grads: List[Optional[torch.Tensor]] = []
        for j, p in enumerate(group["params"]):
            if not (
                p.is_cpu
                and (p.dtype is torch.float32 or p.dtype in _HALF)
                and p.is_contiguous()
                and (shapes is None or p.shape == shapes[j])
            ):
                self._refuse(names[j], p, None, shapes[j] if shapes else None, device, half_group=True)
            if p.numel() == 0:
                continue  # zero elements: left as it is (_Runtime.live)
            g = p.grad
            if g is not None and not (
                g.layout is torch.strided
                and g.is_cpu
                and g.dtype is p.dtype
                and g.is_contiguous()
                and g.shape == p.shape
            ):
                self._refuse(names[j], p, g, None, device, half_group=True)
            params.append(p)
            grads.append(g)
        _check_overlaps([n for n, p in zip(names, group["params"]) if p.numel() > 0], params, grads)
        return params, grads

    def _refuse(
        self,
        name: str,
        p: torch.Tensor,
        g: Optional[torch.Tensor],
        shape,
        device: torch.device,
        half_group: bool = False,
    ):
        if g is None:
            if p.device != device:
                raise ValueError(
                    f"parameter `{name}` is on {p.device}, others on {device} (mixed devices); "
                    "put the model on one device"
                )
            if p.dtype not in (torch.float32,) + _HALF:
                raise ValueError(
                    f"parameter `{name}` has dtype {p.dtype}; mulo steps float32, bfloat16 and "
                    "float16 tensors"
                )
            if not p.is_contiguous():
                raise ValueError(f"parameter `{name}` is not contiguous (strides {p.stride()})")
            if p.dtype != torch.float32 and not half_group:
                raise ValueError(
                    f"parameter `{name}` has dtype {p.dtype}, but its group's first step had "
                    "float32 tensors only: whether a group steps half-precision tensors is fixed "
                    "then (convert the model before its first step)"
                )
            raise ValueError(
                f"parameter `{name}` has shape {list(p.shape)}, but it was stepped with shape "
                f"{list(shape)}: its optimizer state is for that shape"
            )
        if g.layout != torch.strided:
            raise ValueError(f"parameter `{name}`: sparse gradient ({g.layout}) is not supported")
        if g.device != p.device:
            raise ValueError(
                f"parameter `{name}` is on {p.device} but its gradient on {g.device} (mixed devices)"
            )
        if g.dtype != p.dtype:
            raise ValueError(
                f"gradient of parameter `{name}` has dtype {g.dtype}, the parameter {p.dtype} "
                "(they must be the same)"
            )
        if not g.is_contiguous():
            raise ValueError(f"gradient of parameter `{name}` is not contiguous (strides {g.stride()})")
        raise ValueError(
            f"gradient of parameter `{name}` has shape {list(g.shape)}, the parameter {list(p.shape)}"
        )

    @_one_call_at_a_time
    @torch.no_grad()
    # PyLO's signature, step(loss=None), on purpose not torch's step(closure=None) (see below).
    def step(self, loss: Any = None, *, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """One optimizer step over every parameter group; returns the loss.

        ``loss`` is what PyLO's ``step(loss=None)`` takes and torch's ``step(closure=None)``
        takes, told apart by whether it can be called:

        - ``None`` (the default), a tensor or a number: returned as given, untouched (PyLO's
          documented loop, ``loss.backward(); optimizer.step(loss)``). The step uses the
          gradients already in ``.grad``; the value plays no part in it.
        - a callable: torch's closure. It is called once, with gradients enabled, before the
          step (it must compute the loss and call ``backward()``), and its result is returned.

        Args:
            loss: the loss (returned as given) or a closure (called), or None.
            closure: keyword only: torch's closure, for callers that name it
                (``step(closure=f)``, as Lightning does); give ``loss`` or ``closure``, not both.
        """
        if closure is not None:
            if loss is not None:
                raise TypeError("step: give `loss` or `closure`, not both")
            if not callable(closure):
                raise TypeError(f"step: closure={closure!r} is not callable")
            loss = closure
        if callable(loss):
            # A tensor is never callable, so PyLO's `step(loss)` cannot land here.
            with torch.enable_grad():
                loss = loss()
        groups = self.param_groups
        if self._sharded is not None or _distributed.has_dtensors(groups):
            for gi, group in enumerate(groups):
                _check_hyper(f"param_groups[{gi}]", group["lr"], group["weight_decay"], group["max_grad_norm"])
            if self._sharded is None:
                self._sharded = _distributed.ShardedSteps()
            self.last_report = self._sharded.step(self)
            return loss
        device = self._device()
        # One group must not be stepped when another is refused: every group's
        # hyper-parameters, tensors and gradients are checked before any group steps.
        work = []
        for gi, group in enumerate(groups):
            _check_hyper(f"param_groups[{gi}]", group["lr"], group["weight_decay"], group["max_grad_norm"])
            rt = self._rt[gi]
            names = rt.names if rt is not None else self._names(gi, group)
            work.append(self._check(gi, group, names, device))
        if len(groups) > 1:
            self._check_across_groups(groups, work, device)
        # A CPU group stepped one tensor at a time: its check returned tensors, not addresses.
        per_tensor = device.type == "cpu" and any(w[0] and isinstance(w[0][0], torch.Tensor) for w in work)
        if self._nonfinite == "error" and (len(groups) > 1 or per_tensor):
            # One group (or, in a group stepped one tensor at a time, one tensor) must not be
            # stepped when another is refused: check them all first.
            for gi, group in enumerate(groups):
                for j, p in enumerate(group["params"]):
                    if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                        name = self._names(gi, group)[j]
                        raise ValueError(
                            f"non-finite gradient in `{name}`; nothing was changed (nonfinite='error')"
                        )
        # Built aside and kept only when every group builds: a refused first step leaves no
        # runtime (so no state in state_dict) behind.
        built = list(self._rt)
        for gi, group in enumerate(groups):
            if built[gi] is None:
                built[gi] = self._build(gi, group, device)
        self._rt = built
        report: Dict[str, list] = {}
        for gi, group in enumerate(groups):
            rt = self._rt[gi]
            assert rt is not None  # built above
            if group["max_grad_norm"] != rt.max_grad_norm:
                rt.native.set_max_grad_norm(group["max_grad_norm"])
                rt.max_grad_norm = group["max_grad_norm"]
            ptrs, grads = work[gi]
            r = rt.native.step(ptrs, grads, float(group["lr"]), float(group["weight_decay"]))
            group["step"] = rt.native.step_count
            for key, value in r.items():
                if key != "step":
                    report.setdefault(key, []).extend(value)
        self.last_report = report
        return loss

    # ------------------------------------------------------------------------ state dict

    @_one_call_at_a_time
    def state_dict(self) -> Dict[str, Any]:
        """torch's ``state_dict`` with PyLO's per-tensor state (``mom``, ``rms``,
        ``fac_vec_row``/``fac_vec_col`` or ``fac_vec_v``, decay-last) plus ``factored_axes``,
        and ``step`` in each parameter group. With DTensor parameters: this rank's rows of the
        state, and ``shard`` (see :mod:`mulo.distributed`)."""
        if self._sharded is not None:
            return self._sharded.state_dict(self, super().state_dict)
        return _state.state_dict_with_runtimes(self, self._rt, super().state_dict)

    @_one_call_at_a_time
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Loads a ``state_dict`` of this class or of PyLO's ``AdafacLO_naive``/``MuLO_naive``
        (same parameter groups); the next step continues exactly where it stopped. With DTensor
        parameters, each rank loads the ``state_dict`` it saved.

        What is loaded is checked first (``_state.check_state_dict``: float32, finite,
        second moments ``>= 0``, ``step`` in range); a refused load leaves the optimizer as it
        was.

        Args:
            state_dict: what :meth:`state_dict` (or PyLO's) returned, e.g. through ``torch.load``.
        """
        _state.check_state_dict(self, state_dict)
        if self._sharded is not None or _distributed.has_dtensors(self.param_groups):
            if self._sharded is None:
                self._sharded = _distributed.ShardedSteps()
            return self._sharded.load_state_dict(self, state_dict, super().load_state_dict)
        old = (self.param_groups, self.state, self._rt, dict(self._axes_override), self._cuda_prog)
        try:
            super().load_state_dict(state_dict)
            # The saved tensors themselves, not torch's copies in self.state: torch casts a
            # floating-point state to its parameter's dtype, which would round the float32
            # state of a bfloat16/float16 parameter.
            loaded = {
                p: state_dict["state"].get(i, {})
                for saved, group in zip(state_dict["param_groups"], self.param_groups)
                for i, p in zip(saved["params"], group["params"])
            }
            self.state = defaultdict(dict)
            rts: List[Optional[_Runtime]] = []
            # Every saved axis first: a CUDA program is built for all groups at once.
            for group in self.param_groups:
                for p in group["params"]:
                    axes = loaded.get(p, {}).get("factored_axes")
                    if axes is not None:
                        self._axes_override[id(p)] = (p, (int(axes[0]), int(axes[1])))
            for gi, group in enumerate(self.param_groups):
                for key, value in self.defaults.items():
                    group.setdefault(key, value)
                _check_hyper(f"param_groups[{gi}]", group["lr"], group["weight_decay"], group["max_grad_norm"])
                names = self._names(gi, group)
                has_state = any(len(loaded.get(p, {})) for p in group["params"])
                if not has_state and not group.get("step"):
                    rts.append(None)
                    continue
                rt = self._build(gi, group)
                rt.native.set_step_count(int(group.get("step") or 0))
                for j, p in enumerate(group["params"]):
                    st = loaded.get(p)
                    if not st or (rt.live is not None and j not in rt.live):
                        continue  # (a zero-element parameter's state has zero size)
                    k = j if rt.live is None else rt.live[j]
                    tensors = []
                    keep = []
                    for key in _state.STATE_NAMES:
                        t = st.get(key)
                        if t is None or t.numel() == 0:
                            continue
                        # float32 already (checked above): moved, never cast.
                        t = t.detach().to("cpu").contiguous()
                        keep.append(t)
                        tensors.append((key, list(t.shape), (t.data_ptr(), t.numel())))
                    try:
                        rt.native.import_state(k, tensors)
                    except ValueError as e:
                        raise ValueError(f"state of parameter `{names[j]}`: {e}") from None
                rts.append(rt)
            self._rt = rts
        except Exception:
            self.param_groups, self.state, self._rt, self._axes_override, self._cuda_prog = old
            raise


class MuLO(AdafacLO):
    """μLO_M with μP (PyLO's ``MuLO_naive``), stepped by mulo.

    Every parameter needs mup's ``infshape`` (call ``mup.set_base_shapes(model, base_model)``
    first). As ``MuLO_naive`` does, each parameter group is split into one group per width
    multiplier for the tensors with two infinite dimensions (hidden weights), whose ``lr`` is
    the group's divided by mup's ``width_mult()``, followed by one group for all other tensors
    (lr unchanged). Weight decay is not scaled. Arguments as :class:`AdafacLO`.
    """

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Adds a parameter group, split by width multiplier as ``MuLO_naive`` does.

        Args:
            param_group: a dict with ``params`` (each with mup's ``infshape``) and any of
                ``lr``, ``weight_decay`` and ``max_grad_norm``.
        """
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        names = param_group.get("param_names")
        if params and all(isinstance(p, tuple) for p in params):  # named parameters
            names = [str(n) for n, _ in params]
            params = [p for _, p in params]
        rest = {k: v for k, v in param_group.items() if k not in ("params", "param_names")}
        lr = rest.get("lr", self.defaults["lr"])
        # Before the split: lr / width_mult would turn a refused lr (True, 1e39) into another.
        _check_hyper(
            f"param_groups[{len(self.param_groups)}]",
            lr,
            rest.get("weight_decay", self.defaults["weight_decay"]),
            rest.get("max_grad_norm", self.defaults["max_grad_norm"]),
        )

        def new_group():
            g = dict(rest)
            g["lr"] = lr
            g["params"] = []
            if names is not None:
                g["param_names"] = []
            return g

        matrix: Dict[float, Dict[str, Any]] = {}
        vector = new_group()
        for j, p in enumerate(params):
            name = names[j] if names is not None else f"parameter {j} of the group (shape {list(p.shape)})"
            infshape = getattr(p, "infshape", None)
            if infshape is None:
                raise ValueError(
                    f"{name} has no `infshape`: MuLO needs mup's base shapes; call "
                    "`mup.set_base_shapes(model, base_model)` before creating the optimizer "
                    "(or use mulo.torch.AdafacLO, which takes any parameters)"
                )
            ninf = infshape.ninf()
            if ninf > 2:
                raise ValueError(f"{name} has {ninf} infinite dimensions; μP here handles at most 2")
            if ninf == 2:
                wm = infshape.width_mult()
                target = matrix.setdefault(wm, new_group())
            else:
                target = vector
            target["params"].append(p)
            if names is not None:
                target["param_names"].append(names[j])
        for wm, g in matrix.items():
            g["lr"] = g["lr"] / wm
        for g in list(matrix.values()) + [vector]:
            super().add_param_group(g)
