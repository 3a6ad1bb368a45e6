"""Triton kernels of metamask_fast, installed as ``metamask_fast.kernels``.

This package holds kernels only (no torch state). It is empty until the fused Barlow Twins loss kernel
lands; until then every loss runs its plain-PyTorch path and ``backend="triton"`` raises a clear error.
"""
