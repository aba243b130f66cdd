"""The optimiser: AdamW with linear warm-up, constant or cosine decay, global-norm clipping."""

from __future__ import annotations

import optax


def learning_rate_schedule(
    peak: float, warmup_steps: int, total_steps: int, decay: str = "constant",
    min_ratio: float = 0.0,
) -> optax.Schedule:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then constant or cosine decay.

    The cosine decay reaches ``peak * min_ratio`` at ``total_steps``.
    """
    if decay not in ("constant", "cosine"):
        raise ValueError(f"unknown learning-rate decay {decay!r}; valid: constant, cosine")
    if decay == "constant":
        after = optax.constant_schedule(peak)
    else:
        after = optax.cosine_decay_schedule(
            peak, max(total_steps - warmup_steps, 1), alpha=min_ratio
        )
    if warmup_steps <= 0:
        return after
    warmup = optax.linear_schedule(0.0, peak, warmup_steps)
    return optax.join_schedules([warmup, after], [warmup_steps])


def make_optimizer(
    learning_rate: optax.Schedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    grad_clip: float = 0.0,
) -> optax.GradientTransformation:
    """AdamW behind optional global-norm clipping (``grad_clip`` <= 0 turns clipping off)."""
    parts = []
    if grad_clip > 0:
        parts.append(optax.clip_by_global_norm(grad_clip))
    parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)
