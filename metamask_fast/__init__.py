"""metamask_fast: a fast, tested training engine for MetaMask (Li et al., NeurIPS 2022).

Public modules: :mod:`metamask_fast.functional` (losses), :mod:`metamask_fast.models` (mask and model),
:mod:`metamask_fast.meta` (the MetaMask training step), :mod:`metamask_fast.ops` (compiled multi-tensor
ops with PyTorch fallbacks), :mod:`metamask_fast.train` (``python -m metamask_fast.train``) and
:mod:`metamask_fast.info` (``python -m metamask_fast.info``: what this installation runs on).
"""

__version__ = "0.1.0"

import os  # noqa: E402

# torch first: the compiled extension metamask_fast._C links against torch's shared libraries.
import torch  # noqa: E402,F401

from metamask_fast import _build  # noqa: E402

# Imported from a source checkout (`python -m` in the repository root), the compiled parts come from the
# installed build of the same sources, or, failing that, one line says why the fallbacks run.
_build.attach(os.path.dirname(os.path.abspath(__file__)))
