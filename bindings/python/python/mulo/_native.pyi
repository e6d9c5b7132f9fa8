"""Type stubs of ``mulo._native``, the compiled layer (bindings/python/src) under
:mod:`mulo.torch` and :mod:`mulo.distributed`.

Buffers cross as flat lists of ints ``[address, values, address, values, ...]`` (the address of
contiguous float32 CPU memory and its number of values; ``(0, 0)`` where a parameter has no
gradient); state crosses as PyLO-layout tensors ``[(name, shape, little-endian f32 bytes)]``.
"""

from typing import Dict, List, Optional, Sequence, Tuple, final

__all__ = [
    "LearnedOptimizer",
    "Group",
    "CudaModel",
    "CudaStepper",
    "state_to_pylo",
    "state_from_pylo",
    "buffer_conflict",
    "ShardedGroup",
    "__version__",
]
__version__: str

# One tensor of PyLO-layout state: (name, shape, little-endian float32 bytes).
_PyloTensor = Tuple[str, List[int], bytes]
# A step report: ``step`` (int) and lists of parameter names per event (``skipped``,
# ``sanitized``, ``nonfinite``, ``clipped``, ``reverted``, ``without_grad``).
_Report = Dict[str, object]
# Factored axes (d0, d1) of a tensor of rank >= 2, None for rank <= 1.
_Axes = Optional[Tuple[int, int]]

@final
class LearnedOptimizer:
    """The learned optimizer (meta-network and meta-parameters)."""

    @staticmethod
    def load(spec: str, revision: Optional[str] = None) -> "LearnedOptimizer":
        """Loads a directory (Hub layout), a ``.safetensors`` file, or a Hub key ``owner/name``
        (at ``revision``) from the local Hugging Face cache, downloaded there first on first use
        (:func:`mulo.hub.local_weights`); ``"demo"`` is the bundled demo network."""
    def with_meta(
        self,
        exp_mult: float,
        step_mult: float,
        momentum_decays: Sequence[float],
        rms_decay: float,
        adafactor_decays: Sequence[float],
    ) -> "LearnedOptimizer":
        """A copy with other meta-parameters (final decays, not PyLO's offsets)."""
    @property
    def is_demo(self) -> bool:
        """Whether these are the bundled demo weights (not the trained μLO_M)."""
    @property
    def origin(self) -> str:
        """Where the weights came from."""
    @property
    def fingerprint(self) -> str:
        """SHA-256 of the network and meta-parameters."""
    def meta(self) -> Dict[str, object]:
        """The meta-parameters as a dict."""

@final
class Group:
    """The tensors of one parameter group, stepped together by one ``MuloOptimizer`` (one step
    counter: PyLO's group ``step``) on the CPU."""

    def __new__(
        cls,
        lopt: LearnedOptimizer,
        names: List[str],
        shapes: List[List[int]],
        axes: List[_Axes],
        max_grad_norm: Optional[float],
        nonfinite: str,
        guard: bool,
        backend: str,
    ) -> "Group":
        """``nonfinite``: ``skip``, ``zero`` or ``error``; ``backend``: ``cpu`` or ``interp``."""
    def step(self, params: List[int], grads: List[int], lr: float, weight_decay: float) -> _Report:
        """One step of every tensor (flat address lists); returns the report."""
    def set_max_grad_norm(self, max_grad_norm: Optional[float]) -> None:
        """Sets the per-tensor clipping norm (None: no clipping)."""
    def bench_steps(self, params: List[int], grads: List[int], lr: float, weight_decay: float, steps: int) -> List[float]:
        """Steps ``steps`` times from Rust; the wall time of each step in seconds."""
    @property
    def step_count(self) -> int:
        """Steps taken (PyLO's group ``step``)."""
    def set_step_count(self, step: int) -> None:
        """Sets the step counter (accumulators kept)."""
    def factored_axes(self, index: int) -> _Axes:
        """The factored axes (d0, d1) of tensor ``index``, or None for rank ≤ 1."""
    def export_state(self, index: int) -> List[_PyloTensor]:
        """Tensor ``index``'s state in PyLO's layout."""
    def import_state(self, index: int, tensors: List[Tuple[str, List[int], Tuple[int, int]]]) -> None:
        """Replaces tensor ``index``'s state from PyLO-layout tensors given as
        (name, shape, (address, values)) of contiguous float32 CPU memory."""
    def zero_state(self, index: int) -> None:
        """Resets tensor ``index``'s state to zeros."""
    @property
    def target(self) -> str:
        """The backend's name."""
    @property
    def compiled_plans(self) -> int:
        """Number of step programs compiled (one per distinct shape and axes)."""

@final
class CudaStepper:
    """A :class:`CudaModel` loaded on a device: steps PyTorch's CUDA tensors in place."""

    @property
    def arch(self) -> str:
        """The architecture the program was compiled for."""
    def step(self, stream: int, addrs: List[int], hypers: List[Optional[Tuple[float, float]]], steps: List[int]) -> None:
        """Queues one step on CUDA stream ``stream``: 7 device addresses per tensor (parameter,
        gradient, state buffers, 0 for the rest), ``(lr, weight_decay)`` or None per tensor, and
        each tensor's step counter."""

@final
class CudaModel:
    """A group's tensors as one packed CUDA program; building it needs no GPU."""

    def __new__(cls, lopt: LearnedOptimizer, shapes: List[List[int]], axes: List[_Axes]) -> "CudaModel": ...
    @property
    def n_tensors(self) -> int:
        """Number of tensors."""
    @property
    def n_plans(self) -> int:
        """Number of distinct layouts (compiled plans)."""
    @property
    def slots(self) -> List[str]:
        """Entry points launched per step."""
    def state_buffers(self, index: int) -> List[Tuple[str, List[int]]]:
        """Tensor ``index``'s state buffers (name, decay-major shape), in the order
        :meth:`CudaStepper.step` takes them."""
    def source(self) -> str:
        """The ``.cu`` source of the program."""
    def manifest_json(self, arch: str) -> str:
        """``mulo_model.json`` for architecture ``arch``."""
    def stepper(self, device: int) -> CudaStepper:
        """Compiles (NVRTC, through the disk cache) and loads the program on CUDA device
        ``device``. Needs the CUDA driver and libnvrtc."""

@final
class ShardedGroup:
    """The local shards of one parameter group on this rank (one step counter)."""

    def __new__(
        cls,
        lopt: LearnedOptimizer,
        names: List[str],
        shapes: List[List[int]],
        axes: List[_Axes],
        shards: List[Optional[Tuple[int, int]]],
        max_grad_norm: Optional[float],
        nonfinite: str,
    ) -> "ShardedGroup":
        """``shards[i]``: (row offset, rows) this rank holds, or None for a replicated tensor."""
    @property
    def rounds(self) -> int:
        """Buffers (all-reduces) per step."""
    def round_len(self, round: int) -> int:
        """Number of f64 values in round ``round``'s buffer."""
    def begin(self, params: List[int], grads: List[int], lrs: List[float], weight_decays: List[float]) -> bytes:
        """Starts a step; returns round 0's buffer (f64 bytes)."""
    def advance(self, combined: bytes) -> bytes:
        """Gives the sum over every rank of the current round's buffer; returns the next one."""
    def finish(self, combined: bytes, params: List[int]) -> _Report:
        """Gives the last round's sum and writes the local parameters; returns the report."""
    def set_max_grad_norm(self, max_grad_norm: Optional[float]) -> None:
        """Sets the per-tensor clipping norm (every rank alike)."""
    @property
    def step_count(self) -> int:
        """Steps taken."""
    def set_step_count(self, step: int) -> None:
        """Sets the step counter (resuming)."""
    def export_state(self, index: int) -> List[_PyloTensor]:
        """Tensor ``index``'s local state in PyLO's layout (this rank's rows)."""
    def import_state(self, index: int, tensors: List[_PyloTensor]) -> None:
        """Replaces tensor ``index``'s local state (this rank's rows)."""

def state_to_pylo(shape: List[int], axes: _Axes, buffers: List[Tuple[str, bytes]]) -> List[_PyloTensor]:
    """Canonical-layout state (decay-major ``[(name, f32 bytes)]``) to PyLO's layout."""

def state_from_pylo(shape: List[int], axes: _Axes, tensors: List[_PyloTensor]) -> List[Tuple[str, bytes]]:
    """PyLO-layout state to the canonical layout, in ``CudaModel.state_buffers`` order."""

def buffer_conflict(params: List[int], grads: List[int]) -> Optional[Tuple[int, int]]:
    """Checks the buffers of every group of a step at once, before any group is stepped.
    ``params`` and ``grads`` are flat ``[address, values, ...]`` lists of float32 buffers
    (address 0: no gradient), numbered parameters first, then gradients. Returns ``(a, b)`` for
    two overlapping buffers one of which is written, ``(k, k)`` for a null or misaligned
    address, or None."""
