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

import math
import re
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.optim import Optimizer

from mulo._native import CudaModel as _CudaModel
from mulo import _state
from mulo import hub as _hub
from mulo import distributed as _distributed
from mulo._native import Group as _Group
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


def _check_hyper(where: str, lr: Any, weight_decay: Any, max_grad_norm: Any) -> None:
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"{where}: lr={lr!r} must be a finite number >= 0")
    if not isinstance(weight_decay, (int, float)) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"{where}: weight_decay={weight_decay!r} must be a finite number >= 0")
    if max_grad_norm is not None and (
        not isinstance(max_grad_norm, (int, float))
        or not math.isfinite(max_grad_norm)
        or max_grad_norm <= 0
    ):
        raise ValueError(f"{where}: max_grad_norm={max_grad_norm!r} must be None or a finite number > 0")


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
        work: List[Optional[torch.Tensor]] = list(grads)
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
                    work[j] = torch.nan_to_num(work[j], nan=0.0, posinf=_F32_MAX, neginf=-_F32_MAX)
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
                        work[j] = work[j] * float(np.float32(coef))
                        report["clipped"].append((self.names[j], norm))
        stepped = [j for j in range(n) if work[j] is not None]
        snapshots = {}
        if self.guard:
            for j in stepped:
                snapshots[j] = (params[j].detach().clone(), {k: t.clone() for k, t in self.state[j].items()})
        # The program's other tensors (other groups') are not stepped by this call.
        addrs: List[int] = [0] * (7 * self.first)
        hypers: List[Any] = [None] * self.first
        for j in range(n):
            if work[j] is None:
                addrs += [0] * 7
                hypers.append(None)
                continue
            st = list(self.state[j].values())
            addrs += [params[j].data_ptr(), work[j].data_ptr()] + [t.data_ptr() for t in st] + [0] * (5 - len(st))
            hypers.append((lr, weight_decay))
        rest = self.program.n - self.first - n
        addrs += [0] * (7 * rest)
        hypers += [None] * rest
        stream = torch.cuda.current_stream(self.device).cuda_stream
        try:
            stepper.step(stream, addrs, hypers, [self.step_count] * self.program.n)
        except ValueError as e:
            # The Rust checks name tensors by index and buffers by kind: name the parameters.
            def named(m):
                name = self.names[int(m.group(1)) - self.first]
                return f"`{name}`" if m.group(2) == "param" else f"`{name}.{m.group(2)}`"

            raise ValueError(re.sub(r"tensor (\d+) `(\w+)`", named, str(e))) from None
        if stepped:
            # As MuloOptimizer: with the guard, parameter and state must be finite; without,
            # a non-finite parameter is an error.
            def finite(j):
                ok = torch.isfinite(params[j]).all()
                if self.guard:
                    for t in self.state[j].values():
                        ok = ok & torch.isfinite(t).all()
                return ok

            ok = torch.stack([finite(j) for j in stepped]).tolist()
            broken = [j for j, good in zip(stepped, ok) if not good]
            if broken and not self.guard:
                names = ", ".join(f"`{self.names[j]}`" for j in broken)
                raise RuntimeError(
                    f"the step made the parameters {names} non-finite (the guard is off, so they were not restored)"
                )
            for j in broken:
                old_p, old_state = snapshots[j]
                params[j].detach().copy_(old_p)
                for k, t in self.state[j].items():
                    t.copy_(old_state[k])
                report["reverted"].append(self.names[j])
                report["skipped"].append(self.names[j])
        self.step_count += 1
        return report


class _Runtime:
    """A built parameter group: its native group, and the shapes and axes fixed at build."""

    __slots__ = ("native", "shapes", "axes", "names", "max_grad_norm")

    def __init__(self, native, shapes, axes, names, max_grad_norm):
        self.native = native
        self.shapes = shapes
        self.axes = axes
        self.names = names
        self.max_grad_norm = max_grad_norm


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

    Every parameter with a gradient must be a contiguous float32 tensor with a dense
    contiguous float32 gradient, all of them on one device (the CPU, or one CUDA device), of
    the shape it had at its first step; anything else is refused with an error naming the
    parameter, before anything changes. On CUDA the optimizer's tensors are one packed program
    compiled by NVRTC at the first step (libnvrtc must be loadable; the PTX is cached on disk),
    and the state lives in device memory.
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
        defaults = dict(lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)
        for p, axes in (factored_axes or {}).items():
            self.set_factored_axes(p, axes)

    # ----------------------------------------------------------------- parameter groups

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
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
        """The factored axes ``param`` is (or will be) stepped with; None for rank ≤ 1."""
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
        if device.type == "cuda":
            native = _CudaGroup(
                self.lopt, names, shapes, axes, group["max_grad_norm"], self._nonfinite, self._guard, device,
                self._cuda_program(gi, shapes, axes, device), gi,
            )
        else:
            native = _Group(
                self.lopt,
                names,
                [list(s) for s in shapes],
                [tuple(a) if a is not None else None for a in axes],
                group["max_grad_norm"],
                self._nonfinite,
                self._guard,
                "cpu" if self._backend == "auto" else self._backend,
            )
        if group.get("step"):
            native.set_step_count(int(group["step"]))
        return _Runtime(native, shapes, axes, names, group["max_grad_norm"])

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
                    layouts[k] = ([tuple(p.shape) for p in group["params"]], [self._axes_for(p) for p in group["params"]])
            prog = self._cuda_prog = _CudaProgram(self.lopt, layouts, device)
        return prog

    def _device(self) -> torch.device:
        """The device every parameter must be on: that of the groups already built, else of
        the first parameter. Refuses a device the chosen backend does not step."""
        device = None
        for rt in self._rt:
            if rt is not None:
                device = rt.native.device if isinstance(rt.native, _CudaGroup) else torch.device("cpu")
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
        if device.type == "cuda":
            params, grads = [], []
            for j, p in enumerate(group["params"]):
                if not (
                    p.device == device
                    and p.dtype is f32
                    and p.is_contiguous()
                    and (shapes is None or p.shape == shapes[j])
                ):
                    self._refuse(names[j], p, None, shapes[j] if shapes else None, device)
                params.append(p)
                g = p.grad
                if g is not None and not (
                    g.layout is strided
                    and g.device == device
                    and g.dtype is f32
                    and g.is_contiguous()
                    and g.shape == p.shape
                ):
                    self._refuse(names[j], p, g, None, device)
                grads.append(g)
            return params, grads
        ptrs: List[int] = []
        grads: List[int] = []
        for j, p in enumerate(group["params"]):
            # The common case in one expression; the reasons are spelled out only on failure.
            if not (
                p.is_cpu
                and p.dtype is f32
                and p.is_contiguous()
                and (shapes is None or p.shape == shapes[j])
            ):
                self._refuse(names[j], p, None, shapes[j] if shapes else None, device)
            ptrs += (p.data_ptr(), p.numel())
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

    def _refuse(self, name: str, p: torch.Tensor, g: Optional[torch.Tensor], shape, device: torch.device):
        if g is None:
            if p.device != device:
                raise ValueError(
                    f"parameter `{name}` is on {p.device}, others on {device} (mixed devices); "
                    "put the model on one device"
                )
            if p.dtype != torch.float32:
                raise ValueError(f"parameter `{name}` has dtype {p.dtype}; mulo steps float32 only")
            if not p.is_contiguous():
                raise ValueError(f"parameter `{name}` is not contiguous (strides {p.stride()})")
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
        if g.dtype != torch.float32:
            raise ValueError(f"gradient of parameter `{name}` has dtype {g.dtype}; mulo steps float32 only")
        if not g.is_contiguous():
            raise ValueError(f"gradient of parameter `{name}` is not contiguous (strides {g.stride()})")
        raise ValueError(
            f"gradient of parameter `{name}` has shape {list(g.shape)}, the parameter {list(p.shape)}"
        )

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step over every parameter group (``closure`` as in torch)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        if self._sharded is not None or _distributed.has_dtensors(groups):
            for gi, group in enumerate(groups):
                _check_hyper(f"param_groups[{gi}]", group["lr"], group["weight_decay"], group["max_grad_norm"])
            if self._sharded is None:
                self._sharded = _distributed.ShardedSteps()
            self.last_report = self._sharded.step(self)
            return loss
        device = self._device()
        work = []
        for gi, group in enumerate(groups):
            _check_hyper(f"param_groups[{gi}]", group["lr"], group["weight_decay"], group["max_grad_norm"])
            rt = self._rt[gi]
            names = rt.names if rt is not None else self._names(gi, group)
            work.append(self._check(gi, group, names, device))
        if self._nonfinite == "error" and len(groups) > 1:
            # One group must not be stepped when another is refused: check them all first.
            for gi, group in enumerate(groups):
                for j, p in enumerate(group["params"]):
                    if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                        name = self._names(gi, group)[j]
                        raise ValueError(
                            f"non-finite gradient in `{name}`; nothing was changed (nonfinite='error')"
                        )
        for gi, group in enumerate(groups):
            if self._rt[gi] is None:
                self._rt[gi] = self._build(gi, group, device)
        report: Dict[str, list] = {}
        for gi, group in enumerate(groups):
            rt = self._rt[gi]
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

    def state_dict(self) -> Dict[str, Any]:
        """torch's ``state_dict`` with PyLO's per-tensor state (``mom``, ``rms``,
        ``fac_vec_row``/``fac_vec_col`` or ``fac_vec_v``, decay-last) plus ``factored_axes``,
        and ``step`` in each parameter group. With DTensor parameters: this rank's rows of the
        state, and ``shard`` (see :mod:`mulo.distributed`)."""
        if self._sharded is not None:
            return self._sharded.state_dict(self, super().state_dict)
        return _state.state_dict_with_runtimes(self, self._rt, super().state_dict)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Loads a ``state_dict`` of this class or of PyLO's ``AdafacLO_naive``/``MuLO_naive``
        (same parameter groups); the next step continues exactly where it stopped. With DTensor
        parameters, each rank loads the ``state_dict`` it saved."""
        if self._sharded is not None or _distributed.has_dtensors(self.param_groups):
            if self._sharded is None:
                self._sharded = _distributed.ShardedSteps()
            return self._sharded.load_state_dict(self, state_dict, super().load_state_dict)
        old = (self.param_groups, self.state, self._rt, dict(self._axes_override), self._cuda_prog)
        try:
            super().load_state_dict(state_dict)
            loaded = self.state
            self.state = defaultdict(dict)
            rts: List[Optional[_Runtime]] = []
            # Every saved axis first: a CUDA program is built for all groups at once.
            for group in self.param_groups:
                for p in group["params"]:
                    axes = loaded.get(p, {}).get("factored_axes")
                    if axes is not None:
                        self._axes_override[id(p)] = (p, tuple(int(a) for a in axes))
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
                    if not st:
                        continue
                    tensors = []
                    keep = []
                    for key in _state.STATE_NAMES:
                        t = st.get(key)
                        if t is None or t.numel() == 0:
                            continue
                        t = t.detach().to("cpu", torch.float32).contiguous()
                        keep.append(t)
                        tensors.append((key, list(t.shape), (t.data_ptr(), t.numel())))
                    try:
                        rt.native.import_state(j, tensors)
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
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        names = param_group.get("param_names")
        if params and all(isinstance(p, tuple) for p in params):  # named parameters
            names = [str(n) for n, _ in params]
            params = [p for _, p in params]
        rest = {k: v for k, v in param_group.items() if k not in ("params", "param_names")}
        lr = rest.get("lr", self.defaults["lr"])

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
