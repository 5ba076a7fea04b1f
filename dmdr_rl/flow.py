"""Rectified-flow conventions (DESIGN section 2) and the multi-step Euler sampler.

x_t = (1 - t) x0 + t eps, t in [0, 1], t = 1 is pure noise; networks predict v = eps - x0.
Every trainer, sampler and evaluator uses these functions, never its own copy of the formulas.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

# velocity(x_t, t) -> v, with t a [B] tensor in [0, 1]
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = _broadcast(t, x0)
    return (1.0 - t) * x0 + t * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return eps - x0


def x0_from_velocity(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return x_t - _broadcast(t, x_t) * v


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift t' = s t / (1 + (s - 1) t); shift > 1 spends more steps at high noise."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def sampling_timesteps(steps: int, shift: float = 1.0) -> torch.Tensor:
    """t_0 = 1 > t_1 > ... > t_{K-1}: the shifted linspace of K+1 points without the final 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1)[:-1], shift)


def sample_euler(
    velocity: VelocityFn,
    noise: torch.Tensor,
    steps: int,
    shift: float = 1.0,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate the probability-flow ODE from t=1 to t=0 with K Euler steps; returns x0.

    The last step lands exactly on the x0 prediction x_{K-1} - t_{K-1} v, which is also the
    few-step generator's output in DESIGN section 2.
    """
    timesteps = sampling_timesteps(steps, shift).tolist() + [0.0]
    x = noise
    for t_now, t_next in tqdm(list(zip(timesteps[:-1], timesteps[1:])), desc="sampling", disable=not progress, leave=False):
        t = torch.full((x.shape[0],), t_now, dtype=x.dtype, device=x.device)
        x = x + (t_next - t_now) * velocity(x, t)
    return x


def _broadcast(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(t):
        return torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)
