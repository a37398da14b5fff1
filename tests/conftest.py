"""Shared test setup: without a CUDA device, Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET is read when a kernel is defined, so it is set here, before any test imports triton.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
