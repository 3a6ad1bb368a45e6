"""metamask_fast: a fast, tested training engine for MetaMask (Li et al., NeurIPS 2022).

Public modules: :mod:`metamask_fast.functional` (losses), :mod:`metamask_fast.models` (mask and model),
:mod:`metamask_fast.meta` (the MetaMask training step), :mod:`metamask_fast.ops` (compiled multi-tensor
ops with PyTorch fallbacks) and :mod:`metamask_fast.train` (``python -m metamask_fast.train``).
"""

__version__ = "0.1.0"

# torch first: the compiled extension metamask_fast._C links against torch's shared libraries.
import torch  # noqa: E402,F401
