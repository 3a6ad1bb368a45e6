"""Triton kernels of metamask_fast, installed as ``metamask_fast.kernels``.

Kernels and their host launchers only: no registered ops, no module state. :mod:`.barlow_twins` holds the
fused Barlow Twins loss (column statistics, masked normalisation, cross-correlation and redundancy loss,
forward and backward); :mod:`metamask_fast._fused_loss` registers it as a ``torch.library`` custom op.
"""
