"""Triton kernels and their launchers (imported as ``fastdl.kernels``).

One module per op family; launchers take tensors and return tensors plus what the backward needs,
and never touch autograd. Importing this package needs Triton; fastdl imports it lazily, only when
a call resolves to the ``triton`` or ``interpret`` backend.
"""
