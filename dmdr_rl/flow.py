"""Rectified-flow conventions (DESIGN section 2) and the multi-step Euler sampler.

x_t = (1 - t) x0 + t eps, t in [0, 1], t = 1 is pure noise; networks predict v = eps - x0.
Every trainer, sampler and evaluator uses these functions, never its own copy of the formulas.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

# velocity(x_t, t) -> v, with t a [B] tensor in [0, 1]
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# One generator for a whole batch, or one per sample (the first dimension).
Generators = torch.Generator | Sequence[torch.Generator] | None


def is_one_seed(seed) -> bool:
    """One seed (Python, numpy or pandas ints, 0-d arrays and tensors) rather than one per image."""
    return isinstance(seed, numbers.Integral) or getattr(seed, "ndim", None) == 0


def generators(seed: int | Sequence[int]) -> torch.Generator | list[torch.Generator]:
    """A generator seeded with `seed`, or one per seed of a sequence: with one seed per image, an
    image does not depend on the batch it is sampled in (what evaluation needs)."""
    if is_one_seed(seed):
        return torch.Generator().manual_seed(int(seed))
    return [torch.Generator().manual_seed(int(s)) for s in seed]


def randn(shape, generator: Generators, device: torch.device | str = "cpu",
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the CPU from `generator`, then placed on `device`: the same seed
    gives the same numbers on every device, so runs reproduce across CPU and GPU machines. With one
    generator per sample, sample i's noise comes from generator i alone."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, dtype=dtype).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}: give one seed per sample")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=dtype) for g in generator]).to(device)


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


@dataclass
class Trajectory:
    """A K-step sampling run: the output and, when kept, what each step saw and predicted."""

    x0: torch.Tensor  # [B, C, H, W] the final sample x0_{K-1}
    timesteps: torch.Tensor  # [K] t_0 = 1 > ... > t_{K-1}
    inputs: torch.Tensor | None = None  # [K, B, C, H, W] x at each step (the network's input)
    x0_steps: torch.Tensor | None = None  # [K, B, C, H, W] x0_k = x - t_k v


def sample(
    velocity: VelocityFn,
    noise: torch.Tensor,
    steps: int,
    shift: float = 1.0,
    mode: str = "ode",
    generator: Generators = None,
    keep_steps: bool = False,
    progress: bool = False,
) -> Trajectory:
    """K-step sampling (DESIGN section 2): each step predicts x0_k = x - t_k v, then moves to t_{k+1}
    along the ODE (x + (t_{k+1} - t_k) v, i.e. Euler) or by re-noising x0_k with fresh noise (SDE).

    Both land on x0_{K-1} after the last step. Teacher sampling (many steps, ODE) and the few-step
    generator's backward simulation are this one function.
    """
    if mode not in ("ode", "sde"):
        raise ValueError(f"sampling mode must be 'ode' or 'sde', got {mode!r}")
    schedule = sampling_timesteps(steps, shift)
    times = schedule.tolist()  # the step loop reads the schedule on the host (no device syncs)
    timesteps = schedule.to(noise.device)
    x, inputs, x0_steps = noise, [], []
    for t_now, t_next in tqdm(list(zip(times, times[1:] + [0.0])), desc="sampling", disable=not progress, leave=False):
        t = torch.full((x.shape[0],), t_now, dtype=x.dtype, device=x.device)
        v = velocity(x, t)
        x0_k = x - t_now * v
        if keep_steps:
            inputs.append(x)
            x0_steps.append(x0_k)
        if mode == "ode" or t_next == 0.0:
            x = x + (t_next - t_now) * v
        else:
            mean, std = sde_transition(x0_k, t_next)
            x = mean + std * randn(x.shape, generator, x.device, x.dtype)
    return Trajectory(
        x0=x,
        timesteps=timesteps,
        inputs=torch.stack(inputs) if keep_steps else None,
        x0_steps=torch.stack(x0_steps) if keep_steps else None,
    )


def sde_transition(x0_k: torch.Tensor, t_next: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor | float]:
    """The SDE sampler's step as the Gaussian it draws from: x_{k+1} ~ N((1 - t_{k+1}) x0_k, t_{k+1}^2 I),
    returned as (mean, std: a float for a float t_next, else broadcastable to x). GRPO's policy is this
    distribution; the sampler draws from it."""
    std = t_next if isinstance(t_next, float) else _broadcast(t_next, x0_k)
    return (1.0 - std) * x0_k, std


def _broadcast(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(t):
        return torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)
