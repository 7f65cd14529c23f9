"""Argument checks shared by the samplers: each error names the argument, its value and the fix."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from diffusion_core.sampling.model import GradLogProb


def check_choice(name: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(valid)}")


def check_steps(steps: int, T: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise ValueError(f"steps must be an int, got {steps!r}")
    if not 1 <= steps <= T:
        raise ValueError(f"steps must lie in [1, T={T}], got {steps}")


def check_eta(eta: float) -> None:
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: ancestral), got {eta}")


def check_order(order: int) -> None:
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")


def check_only_for(name: str, value: object, default: object, method: str, owner: str) -> None:
    """An option that only ``owner`` uses must keep its default for every other method."""
    if value != default and method != owner:
        raise ValueError(
            f"{name}={value!r} only applies to method={owner!r}, not method={method!r}"
        )


def check_guidance(grad_log_prob: GradLogProb | None, scale: float) -> None:
    if grad_log_prob is None and scale != 1.0:
        raise ValueError(
            f"classifier_scale={scale} has no effect without grad_log_prob; pass "
            "grad_log_prob=classifier_grad(classifier, y)"
        )
