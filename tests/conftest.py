"""Shared test setup.

- Without a CUDA device, Triton kernels run in Triton's CPU interpreter. TRITON_INTERPRET is read when a
  kernel is defined, so it is set here, before any test imports triton.
- One intra-op thread: the tests use tiny tensors, and on a busy 2-vCPU machine OpenMP hand-offs cost far
  more than the maths (a tiny Linear: 7.8 ms with 2 threads, 8 us with 1, measured here). OMP_NUM_THREADS=1
  tells the CLIs' `configure_cpu_threads` (called by every in-process `main(argv)`) to keep it that way.
- The attention dispatch table a CUDA run measures goes to a file of this session, not the user's cache.
"""
import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("FASTDIFF_DISPATCH_CACHE", os.path.join(tempfile.mkdtemp(prefix="fastdiff-dispatch-"),
                                                              "attention-dispatch.json"))
torch.set_num_threads(1)
