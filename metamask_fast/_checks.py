"""Argument checks shared by the public functions: one rule, one message shape, the argument named."""

from __future__ import annotations

import math

import torch


def check_number(name: str, value: object, *, minimum: float | None = None, strict: bool = False) -> float:
    """``value`` as a float, after checking that it is a finite real number (not a bool) ``>= minimum``
    (``> minimum`` when ``strict``). Raises ``ValueError`` naming ``name`` otherwise.

    Skipped while ``torch.compile`` traces: a float argument may be symbolic there (``dynamic=True``) and
    cannot be compared in Python, so compiled code does not validate its numbers."""
    if torch.compiler.is_compiling():
        return value  # type: ignore[return-value]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return float(value)
