"""mulo: the μLO_M learned optimizer compiled into fast step programs.

``mulo.torch`` holds the PyTorch optimizers (``MuLO``, ``AdafacLO``); ``mulo.distributed`` is
their sharded path for DTensor parameters (FSDP2); ``mulo._native`` is the thin compiled layer
under them.
"""

from mulo._native import LearnedOptimizer, __version__

__all__ = ["LearnedOptimizer", "__version__"]
