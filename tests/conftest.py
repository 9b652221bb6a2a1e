"""Test-wide setup: Triton kernels run in the interpreter when there is no CUDA device.

TRITON_INTERPRET must be set before triton builds its kernels, so it is set here,
before any test module imports scalearn_fast.kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# One autotune config under pytest keeps the interpreter fast (kernels read this).
os.environ.setdefault("SCALEARN_FAST_AUTOTUNE", "0")
