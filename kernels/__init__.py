"""Triton kernels for fastdiff's hot paths, installed as `fastdiff.kernels`.

One file per kernel, each holding the kernel, its launcher and a plain-torch reference (the layout of
Triton's tutorials). Importing this package imports nothing; `fastdiff.ops` imports a kernel module
(and so Triton) only when it dispatches to it.
"""
