"""Shared test setup.

- Without a CUDA device, Triton kernels run in Triton's CPU interpreter. TRITON_INTERPRET is read when a
  kernel is defined, so it is set here, before any test imports triton.
- One intra-op thread: the tests use tiny tensors, and on a busy 2-vCPU machine OpenMP hand-offs cost far
  more than the maths (a tiny Linear: 7.8 ms with 2 threads, 8 us with 1, measured here).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)
