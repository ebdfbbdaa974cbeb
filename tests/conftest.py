"""Test session setup.

Without a GPU the Triton kernels run in the interpreter. Triton reads TRITON_INTERPRET when a
kernel is defined, so it is set here, before any test module imports the kernels; with a GPU the
same tests run the compiled kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
