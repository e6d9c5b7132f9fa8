"""Sharded steps of ``mulo.torch.MuLO`` / ``AdafacLO`` for DTensor parameters sharded on dim 0.

This is the path :class:`mulo.torch.AdafacLO` takes when its parameters are DTensors (FSDP2's
``fully_shard``, or ``distribute_tensor(t, mesh, [Shard(0)])``; ``Replicate()`` tensors too).
Each rank steps only its local rows and keeps only their state; the means μLO takes over a
whole tensor (the Adafactor g² means along the sharded axis, the means of the row
accumulators, the 28 feature mean squares, the clipping norm) are per-rank partial sums added
by ``torch.distributed.all_reduce``. The factored axes are the whole tensor's.

Communication per step: one ``all_reduce`` (float64, sum) per round, batched over every tensor
of every parameter group: a header round (non-finite counts; with ``max_grad_norm`` the squared
norms), one or two rounds of partial sums (the first rides with the header without clipping),
and one round of guard flags (a tensor whose step came out non-finite on any rank is undone
on every rank). So 3 all-reduces per step without clipping, 4 with, whatever the number of
tensors; the buffers hold about ``rows + cols + 28`` values per factored tensor
(``bench/results/sharded.md``). The stages run on the native CPU backend (``mulo::shard``,
``StageEngine::Cpu``: its chunk programs and dense kernels on the local rows). A local shard
that is not a contiguous CPU tensor (a CUDA shard under FSDP2, a strided view) is stepped
through a host copy, written back once the step has succeeded; with a NCCL-only process group
the round buffers are all-reduced on the current CUDA device. (CUDA shards and NCCL are not
verified on a GPU yet; the staging is tested on the CPU with strided shards.)

A ``Replicate()`` parameter is stepped whole on every rank: its gradient must be the same on
every rank (as after DDP's all-reduce), or the ranks' copies drift apart.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from mulo import _state
from mulo._native import ShardedGroup as _ShardedGroup
from mulo._native import buffer_conflict as _buffer_conflict

__all__ = ["has_dtensors", "shard_of", "ShardedSteps"]

try:  # torch ≥ 2.4
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - older torch
    DTensor = None  # type: ignore[assignment,misc]

# An aligned non-null address for empty local shards (never dereferenced: 0 values).
_EMPTY_ADDRESS = 16


def has_dtensors(param_groups) -> bool:
    """Whether any parameter of ``param_groups`` is a DTensor.

    Args:
        param_groups: an optimizer's ``param_groups`` (dicts with ``params``).
    """
    if DTensor is None:
        return False
    return any(isinstance(p, DTensor) for g in param_groups for p in g["params"])


def shard_of(p, name: str) -> Tuple[Tuple[int, ...], Optional[Tuple[int, int]], Any]:
    """``(global shape, (row offset, rows) or None for a replicated tensor, process group)`` of
    a DTensor parameter on this rank; anything else than ``Shard(0)``/``Replicate()`` on a 1-d
    mesh is refused with an error naming the parameter.

    Args:
        p: the parameter.
        name: its name, for errors.
    """
    if DTensor is None or not isinstance(p, DTensor):
        raise ValueError(
            f"parameter `{name}` is a plain tensor among DTensor parameters: shard every "
            "parameter (fully_shard / distribute_tensor) or none"
        )
    mesh = p.device_mesh
    if mesh.ndim != 1:
        raise ValueError(
            f"parameter `{name}` is on a {mesh.ndim}-d device mesh; mulo steps DTensors on a "
            "1-d mesh (FSDP2 without HSDP) only"
        )
    placement = p.placements[0]
    shape = tuple(int(d) for d in p.shape)
    group = mesh.get_group()
    if isinstance(placement, Replicate):
        return shape, None, group
    if not (isinstance(placement, Shard) and placement.dim == 0):
        raise ValueError(
            f"parameter `{name}` has placement {placement}; mulo steps parameters sharded on "
            "dim 0 (Shard(0), FSDP2's default) or replicated"
        )
    if len(shape) == 0:
        raise ValueError(f"parameter `{name}` is 0-d and cannot be sharded by rows")
    local = p.to_local()
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local_shape, offset = compute_local_shape_and_global_offset(shape, mesh, p.placements)
        row0 = int(offset[0]) if int(local_shape[0]) > 0 else 0
    except ImportError:  # pragma: no cover - the helper moved: torch.chunk's split
        size = -(-shape[0] // dist.get_world_size(group))
        row0 = min(dist.get_rank(group) * size, shape[0])
    rows = int(local.shape[0])
    if tuple(local.shape[1:]) != shape[1:]:
        raise ValueError(
            f"parameter `{name}`: local shard of shape {list(local.shape)} is not rows of a "
            f"{list(shape)} tensor"
        )
    return shape, (row0 if rows > 0 else 0, rows), group


class _Runtime:
    __slots__ = ("native", "shapes", "shards", "axes", "names", "max_grad_norm")

    def __init__(self, native, shapes, shards, axes, names, max_grad_norm):
        self.native = native
        self.shapes = shapes
        self.shards = shards
        self.axes = axes
        self.names = names
        self.max_grad_norm = max_grad_norm


def _address(t: torch.Tensor) -> int:
    return t.data_ptr() if t.numel() > 0 else _EMPTY_ADDRESS


class _Work:
    """One parameter group's native step arguments (host addresses and lengths) and the host
    copies of staged shards (kept alive until the step is done)."""

    __slots__ = ("ptrs", "grads", "staged", "keep")

    def __init__(self):
        self.ptrs: List[int] = []
        self.grads: List[int] = []
        #: (local shard, its host copy): written back after a successful step.
        self.staged: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self.keep: List[torch.Tensor] = []

    def host(self, t: torch.Tensor, writable: bool) -> torch.Tensor:
        """``t`` itself when it is a contiguous CPU tensor, else a contiguous host copy (pinned
        for a CUDA tensor, so the copies run at full PCIe speed)."""
        if t.is_cpu and t.is_contiguous():
            return t
        pin = t.is_cuda and torch.cuda.is_available()
        copy = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
        copy.copy_(t.detach())
        self.keep.append(copy)
        if writable:
            self.staged.append((t, copy))
        return copy

    def write_back(self) -> None:
        """Copies each staged shard's stepped values back into the shard."""
        with torch.no_grad():
            for local, copy in self.staged:
                local.copy_(copy)
        self.staged = []


class ShardedSteps:
    """The sharded state of one optimizer: a native ``ShardedGroup`` per parameter group,
    built at the first step after every rank's shard layout has been checked."""

    def __init__(self):
        self.rts: List[Optional[_Runtime]] = []
        self.group = None
        self.checked = False
        #: All-reduces made by the last step (for tests and the communication report).
        self.last_collectives = 0
        #: Bytes all-reduced by the last step (per rank, before the reduction).
        self.last_bytes = 0
        #: Bytes of each all-reduce of the last step.
        self.last_round_bytes: List[int] = []
        #: Seconds the last step spent in all_reduce (wall clock, this rank).
        self.last_comm_seconds = 0.0

    # ------------------------------------------------------------------------ building

    def _layouts(self, opt) -> List[List[Tuple[str, Tuple[int, ...], Optional[Tuple[int, int]], Any]]]:
        out = []
        group = None
        for gi, g in enumerate(opt.param_groups):
            names = opt._names(gi, g)
            rows = []
            for j, p in enumerate(g["params"]):
                shape, shard, pg = shard_of(p, names[j])
                if group is None:
                    group = pg
                elif pg is not group:
                    raise ValueError(
                        f"parameter `{names[j]}` is on another device mesh than the others; "
                        "mulo batches the collectives of one mesh"
                    )
                rows.append((names[j], shape, shard, opt._axes_for(p)))
            out.append(rows)
        self.group = group
        return out

    def _check_layouts(self, layouts) -> None:
        """Every rank must hold the same tensors (names, whole shapes, axes) and their shards
        must tile dim 0 in rank order; checked once, with one all_gather_object, so that a
        mismatch is the same clear error on every rank instead of a hang or a wrong step."""
        mine = [[(n, list(s), sh, list(a) if a else None) for n, s, sh, a in g] for g in layouts]
        world = dist.get_world_size(self.group)
        every: List[Any] = [None] * world
        dist.all_gather_object(every, mine, group=self.group)
        ref = every[0]
        for r, theirs in enumerate(every):
            if len(theirs) != len(ref) or any(len(a) != len(b) for a, b in zip(theirs, ref)):
                raise ValueError(
                    f"rank {r} has {[len(g) for g in theirs]} tensors per parameter group, rank 0 "
                    f"{[len(g) for g in ref]}: every rank must step the same parameters"
                )
            for gi, (a_g, b_g) in enumerate(zip(theirs, ref)):
                for (na, sa, sha, aa), (nb, sb, shb, ab) in zip(a_g, b_g):
                    if sa != sb or aa != ab or (sha is None) != (shb is None):
                        raise ValueError(
                            f"shard layouts differ between ranks: `{na}` on rank {r} is a "
                            f"{sa} tensor ({'replicated' if sha is None else 'sharded'}, factored "
                            f"axes {aa}), on rank 0 `{nb}` is {sb} "
                            f"({'replicated' if shb is None else 'sharded'}, axes {ab})"
                        )
        for gi, g in enumerate(ref):
            for j, (name, shape, shard, _) in enumerate(g):
                if shard is None:
                    continue
                spans = sorted(
                    (every[r][gi][j][2][0], every[r][gi][j][2][1], r)
                    for r in range(world)
                    if every[r][gi][j][2][1] > 0
                )
                at = 0
                for start, rows, r in spans:
                    if start != at:
                        raise ValueError(
                            f"shard layouts differ between ranks: the rows of `{name}` "
                            f"({shape[0]} rows) are not split into consecutive shards: rank {r} "
                            f"holds rows {start}..{start + rows}, expected a shard from row {at}"
                        )
                    at += rows
                if at != shape[0]:
                    raise ValueError(
                        f"shard layouts differ between ranks: the shards of `{name}` hold "
                        f"{at} rows of {shape[0]}"
                    )

    def _build(self, opt, gi: int, group, layout) -> _Runtime:
        if not opt._guard:
            raise ValueError("guard=False is not supported with DTensor parameters (the sharded step always guards)")
        names = [row[0] for row in layout]
        shapes = [row[1] for row in layout]
        shards = [row[2] for row in layout]
        axes = [row[3] for row in layout]
        native = _ShardedGroup(
            opt.lopt,
            names,
            [list(s) for s in shapes],
            [tuple(a) if a is not None else None for a in axes],
            shards,
            group["max_grad_norm"],
            opt._nonfinite,
        )
        if group.get("step"):
            native.set_step_count(int(group["step"]))
        return _Runtime(native, shapes, shards, axes, names, group["max_grad_norm"])

    def built(self, gi: int) -> "_Runtime":
        """Group ``gi``'s runtime, which :meth:`ensure_built` has made.

        Args:
            gi: the parameter group's index.
        """
        rt = self.rts[gi]
        assert rt is not None, "ensure_built builds every group before it is used"
        return rt

    def ensure_built(self, opt) -> None:
        """Builds the runtime of every group of ``opt`` not built yet (at the first one, after
        checking every rank's shard layout: a collective, so every rank must call it).

        Args:
            opt: the ``mulo.torch`` optimizer whose DTensor parameters this steps.
        """
        if all(rt is not None for rt in self.rts) and len(self.rts) == len(opt.param_groups):
            return
        layouts = self._layouts(opt)
        if not self.checked:
            self._check_layouts(layouts)
            self.checked = True
        while len(self.rts) < len(opt.param_groups):
            self.rts.append(None)
        for gi, group in enumerate(opt.param_groups):
            if self.rts[gi] is None:
                self.rts[gi] = self._build(opt, gi, group, layouts[gi])

    # ---------------------------------------------------------------------------- step

    def _local(self, rt: _Runtime, group) -> "_Work":
        """The native step's arguments for one parameter group: addresses and lengths of every
        local shard and gradient, in host memory. A shard that is not a contiguous CPU tensor
        (a CUDA shard under FSDP2 with NCCL, or a strided view) is staged: copied to a host
        tensor here, stepped there, and copied back by ``_Work.write_back`` once every rank's
        step has succeeded, so a refused step changes nothing."""
        work = _Work()
        for j, p in enumerate(group["params"]):
            name = rt.names[j]
            if tuple(p.shape) != rt.shapes[j]:
                raise ValueError(
                    f"parameter `{name}` has shape {list(p.shape)}, but it was stepped with shape "
                    f"{list(rt.shapes[j])}: its optimizer state is for that shape"
                )
            local = p.to_local()
            if local.dtype is not torch.float32 or local.layout is not torch.strided:
                raise ValueError(
                    f"parameter `{name}`: its local shard must be a float32 strided tensor "
                    f"(got {local.dtype}, {local.layout} on {local.device})"
                )
            host = work.host(local, writable=True)
            work.ptrs += (_address(host), host.numel())
            g = p.grad
            if g is None:
                work.grads += (0, 0)
                continue
            if isinstance(g, DTensor):
                if g.placements != p.placements:
                    raise ValueError(
                        f"gradient of `{name}` has placements {g.placements}, the parameter "
                        f"{p.placements}"
                    )
                g = g.to_local()
            if not (
                g.layout is torch.strided
                and g.dtype is torch.float32
                and g.device == local.device
                and g.shape == local.shape
            ):
                raise ValueError(
                    f"gradient of `{name}`: expected a float32 shard of shape {list(local.shape)} "
                    f"on {local.device}, got {g.dtype} {list(g.shape)} on {g.device}"
                )
            g = work.host(g, writable=False)
            work.grads += (_address(g), g.numel())
        return work

    def _collective_device(self) -> torch.device:
        """Where the round buffers are all-reduced: on the current CUDA device for a NCCL-only
        process group (NCCL reduces device memory only), on the CPU otherwise (gloo, MPI, and
        mixed ``cpu:gloo,cuda:nccl`` groups route CPU tensors to their CPU backend)."""
        backend = str(dist.get_backend(self.group)).lower()
        if backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def step(self, opt) -> Dict[str, list]:
        """One sharded step of every group of ``opt`` (collective: every rank calls it);
        returns the report (lists of parameter names per event).

        Args:
            opt: the ``mulo.torch`` optimizer whose DTensor parameters this steps.
        """
        groups = opt.param_groups
        self.ensure_built(opt)
        # Every group's tensors are checked (and staged) before any group changes.
        work = [self._local(self.built(gi), group) for gi, group in enumerate(groups)]
        if len(groups) > 1:
            conflict = _buffer_conflict([a for w in work for a in w.ptrs], [a for w in work for a in w.grads])
            if conflict is not None:
                names = [n for gi in range(len(groups)) for n in self.built(gi).names]
                what = [f"`{n}`" for n in names] + [f"the gradient of `{n}`" for n in names]
                raise ValueError(
                    f"sharded step: the memory of {what[conflict[0]]} and {what[conflict[1]]} "
                    "overlaps (a parameter must not share storage with another parameter or a gradient)"
                )
        for gi, group in enumerate(groups):
            rt = self.built(gi)
            if group["max_grad_norm"] != rt.max_grad_norm:
                # Changes the number of rounds: every rank's group must change alike.
                rt.native.set_max_grad_norm(group["max_grad_norm"])
                rt.max_grad_norm = group["max_grad_norm"]
        bufs = []
        for gi, group in enumerate(groups):
            rt = self.built(gi)
            n = len(group["params"])
            bufs.append(
                rt.native.begin(
                    work[gi].ptrs,
                    work[gi].grads,
                    [float(group["lr"])] * n,
                    [float(group["weight_decay"])] * n,
                )
            )
        rounds = [self.built(gi).native.rounds for gi in range(len(groups))]
        report: Dict[str, list] = {}
        self.last_collectives = 0
        self.last_bytes = 0
        self.last_comm_seconds = 0.0
        self.last_round_bytes = []
        device = self._collective_device()
        for r in range(max(rounds)):
            live = [gi for gi in range(len(groups)) if r < rounds[gi]]
            flat = torch.frombuffer(bytearray(b"".join(bufs[gi] for gi in live)), dtype=torch.float64)
            t0 = time.perf_counter()
            if device.type == "cpu":
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            else:
                on_device = flat.to(device)
                dist.all_reduce(on_device, op=dist.ReduceOp.SUM, group=self.group)
                flat = on_device.cpu()
            self.last_comm_seconds += time.perf_counter() - t0
            self.last_collectives += 1
            self.last_bytes += flat.numel() * 8
            self.last_round_bytes.append(flat.numel() * 8)
            raw = flat.numpy().tobytes()
            at = 0
            for gi in live:
                part = raw[at : at + len(bufs[gi])]
                at += len(bufs[gi])
                rt = self.built(gi)
                if r + 1 < rounds[gi]:
                    bufs[gi] = rt.native.advance(part)
                else:
                    rep = rt.native.finish(part, work[gi].ptrs)
                    work[gi].write_back()
                    groups[gi]["step"] = rt.native.step_count
                    for key, value in rep.items():
                        if key != "step":
                            report.setdefault(key, []).extend(value)
        return report

    # ---------------------------------------------------------------------- state dict

    def state_dict(self, opt, base_state_dict) -> Dict[str, Any]:
        """This rank's ``state_dict``: per tensor its local rows of PyLO's state, the factored
        axes and ``shard`` = [row offset, rows, *whole shape] (empty for a replicated tensor).

        Args:
            opt: the ``mulo.torch`` optimizer.
            base_state_dict: torch's ``Optimizer.state_dict`` of ``opt``, bound.
        """
        return _state.state_dict_with_runtimes(
            opt, self.rts, base_state_dict, extra=lambda rt, j: {"shard": _shard_entry(rt, j)}
        )

    def load_state_dict(self, opt, state_dict, base_load_state_dict) -> None:
        """Loads a ``state_dict`` this rank saved (same parameters, same shards).

        Args:
            opt: the ``mulo.torch`` optimizer.
            state_dict: what this rank's :meth:`state_dict` returned.
            base_load_state_dict: torch's ``Optimizer.load_state_dict`` of ``opt``, bound.
        """
        from collections import defaultdict

        old = (opt.param_groups, opt.state, list(self.rts), dict(opt._axes_override))
        try:
            base_load_state_dict(state_dict)
            loaded = opt.state
            opt.state = defaultdict(dict)
            for p, st in loaded.items():
                axes = st.get("factored_axes")
                if axes is not None:
                    opt._axes_override[id(p)] = (p, tuple(int(a) for a in axes))
            self.rts = []
            self.ensure_built(opt)
            for gi, group in enumerate(opt.param_groups):
                rt = self.built(gi)
                rt.native.set_step_count(int(group.get("step") or 0))
                for j, p in enumerate(group["params"]):
                    st = loaded.get(p)
                    if not st:
                        continue
                    want = _shard_entry(rt, j)
                    got = [int(x) for x in st.get("shard", [])]
                    if got != want:
                        raise ValueError(
                            f"state of parameter `{rt.names[j]}` was saved for shard {got} "
                            f"([row offset, rows, *shape]); this rank holds {want}"
                        )
                    tensors = []
                    for key in _state.STATE_NAMES:
                        t = st.get(key)
                        if t is None:
                            continue
                        # float32 already (checked by _state.check_state_dict): moved, never cast.
                        t = t.detach().to("cpu").contiguous()
                        tensors.append((key, list(t.shape), t.numpy().tobytes()))
                    rt.native.import_state(j, tensors)
        except Exception:
            opt.param_groups, opt.state, self.rts, opt._axes_override = old
            raise


def _shard_entry(rt, j: int) -> List[int]:
    """The ``shard`` entry of tensor ``j``'s saved state: [row offset, rows, *whole shape], or
    empty for a replicated tensor."""
    s = rt.shards[j]
    return [] if s is None else [s[0], s[1], *rt.shapes[j]]
