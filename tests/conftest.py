"""Session-wide test settings, applied before pytest imports any test module.

Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter. The choice has to be made
before Triton is first imported, and importing torchvision already imports it (metamask_fast.backbones and
metamask_fast.data do), so tests/test_triton_loss.py setting it at its own import can come too late.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
