"""Hot-path kernels: Triton for GPUs (`triton_kernels`) and plain PyTorch versions with the
same signatures (`torch_ops`).

`scoring.kernels_for` picks Triton for CUDA tensors when Triton imports and `torch_ops`
otherwise (the CPU build runs `torch_ops` in production). Tests run the Triton kernels
under TRITON_INTERPRET=1 against `torch_ops`.
"""
