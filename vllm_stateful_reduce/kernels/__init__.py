"""Hot-path kernels: Triton for GPUs, plain PyTorch references with the same signature.

`dispatch` picks Triton for CUDA tensors when Triton is usable and the reference
otherwise (the CPU build runs the references in production). Tests run the Triton
kernels under TRITON_INTERPRET=1 against the references.
"""

from . import reference

__all__ = ["reference"]
