"""The DMDR math core (DESIGN section 2): schedules, the critic and DMD losses, reward shaping and
the two time-scale update rule. Every trainer, local or distributed, calls these functions; none
keeps its own copy of the formulas.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def cosine_factor(step: int, dynamic_steps: int) -> float:
    """c(s) = 0.5 (1 + cos(pi min(s / S_dyn, 1))): 1 at the start, 0 from S_dyn on."""
    if dynamic_steps <= 0:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * min(step / dynamic_steps, 1.0)))


def real_score_scale(step: int, s_r0: float, dynamic_steps: int) -> float:
    """Dynamic distribution guidance: the real score's LoRA scale s_r(s) = s_r0 c(s), ending at the teacher."""
    return s_r0 * cosine_factor(step, dynamic_steps)


def renoise_beta(step: int, a0: float, b0: float, dynamic_steps: int) -> tuple[float, float]:
    """Dynamic renoise sampling: tau ~ Beta(a, b) with a = 1 + (a0 - 1) c(s), b = 1 + (b0 - 1) c(s);
    Beta(a0, b0) (high noise) at the start, uniform from S_dyn on."""
    c = cosine_factor(step, dynamic_steps)
    return 1.0 + (a0 - 1.0) * c, 1.0 + (b0 - 1.0) * c


def sample_renoise_timesteps(
    batch: int, step: int, a0: float, b0: float, dynamic_steps: int, generator: torch.Generator | None = None,
    eps: float = 1e-3, device: torch.device | str = "cpu",
) -> torch.Tensor:
    """tau ~ DynaRS(step), one per sample, kept inside [eps, 1 - eps] so that x0 = x_tau - tau v is defined;
    drawn on the host from `generator` and placed on `device` (the same numbers on any device)."""
    a, b = renoise_beta(step, a0, b0, dynamic_steps)
    # torch's Beta sampler takes no generator: draw a seed from it and let numpy sample.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    tau = torch.from_numpy(np.random.default_rng(seed).beta(a, b, size=batch)).float()
    return tau.clamp(eps, 1.0 - eps).to(device)


def draw_guidance(real_cfg: float, jitter: float, generator: torch.Generator | None = None) -> float:
    """The real score's CFG scale for one generator step, w ~ U(w_r - jitter, w_r + jitter). A scale of at most 1
    is no guidance to jitter (around 1 the draw would guide away from the prompt half the time): it is used as it
    is, as the paper's code does. The uniform number is drawn either way, so later draws do not depend on it."""
    u = float(torch.rand((), generator=generator))
    return real_cfg + jitter * (2 * u - 1) if real_cfg > 1 else real_cfg


def guidance_interval(tau: torch.Tensor, cfg: float, max_tau: float) -> float | torch.Tensor:
    """One CFG scale per sample: `cfg` where tau <= max_tau, 1 (no guidance) above it (Kynkaenniemi et al.
    2024, applying guidance in a limited interval). With max_tau >= 1 every tau is inside, and the scalar
    `cfg` itself comes back: DESIGN section 2's step, unchanged."""
    if max_tau >= 1.0:
        return cfg
    return torch.where(tau <= max_tau, torch.full_like(tau, cfg), torch.ones_like(tau))


def finite_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of the finite entries (NaN when there are none), without a host sync."""
    finite = torch.isfinite(values)
    return torch.where(finite, values, torch.zeros_like(values)).sum() / finite.sum()


def critic_loss(v_fake: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Flow matching on the generator's (detached) samples: || F(x_tau, tau, c; s_f) - (eps - x0) ||^2."""
    return torch.mean((v_fake - (eps - x0.detach())) ** 2)


def dmd_gradient(x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """g = (x0_fake - x0_real) / (mean_CHW |x0 - x0_real| + 1e-8), with non-finite values zeroed."""
    with torch.no_grad():
        dims = tuple(range(1, x0.dim()))
        weight = (x0 - x0_real).abs().mean(dim=dims, keepdim=True) + 1e-8
        return torch.nan_to_num((x0_fake - x0_real) / weight, nan=0.0, posinf=0.0, neginf=0.0)


def dmd_loss(x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """L_dmd = 0.5 mean((x0 - stopgrad(x0 - g))^2); its gradient with respect to x0 is g / numel."""
    target = (x0 - dmd_gradient(x0, x0_real, x0_fake)).detach()
    return 0.5 * torch.mean((x0 - target) ** 2)


def shape_reward(reward: torch.Tensor, shaping: str, margin: float = 0.7) -> torch.Tensor:
    """phi(r) per sample, a loss to minimise: hinge relu(m - r) (paper: m = 0.7) or linear -r."""
    if shaping == "hinge":
        return torch.relu(margin - reward)
    if shaping == "linear":
        return -reward
    raise ValueError(f"unknown reward shaping {shaping!r}; allowed: hinge, linear")


def group_advantages(rewards: torch.Tensor, valid: torch.Tensor, group_size: int, clip: float) -> torch.Tensor:
    """GRPO's advantages: A_i = (R_i - mean_g R) / (std_g R + 1e-4) over the valid samples of i's group g
    (consecutive blocks of `group_size`), clipped to [-clip, clip]; 0 for an invalid sample (its reward was not
    finite) and for every sample of a group with fewer than two valid ones (nothing to compare with)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form whole groups of {group_size}")
    # at least float32: a user's reward may score in bf16, whose group means and stds round samples' advantages
    # to 0 or to groups that no longer sum to zero
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    shape = (-1, group_size)
    mask = valid.reshape(shape)
    weights = mask.to(rewards.dtype)
    kept = torch.where(mask, rewards.reshape(shape), torch.zeros_like(weights))
    count = weights.sum(dim=1, keepdim=True)
    mean = kept.sum(dim=1, keepdim=True) / count.clamp(min=1)
    std = ((((kept - mean) * weights) ** 2).sum(dim=1, keepdim=True) / count.clamp(min=1)).sqrt()
    advantages = torch.where(mask & (count >= 2), (kept - mean) / (std + 1e-4), torch.zeros_like(kept))
    return advantages.clamp(-clip, clip).reshape(-1)


def gaussian_log_ratio(x: torch.Tensor, mean: torch.Tensor, old_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2 I) - log N(x; old_mean, std^2 I) per sample, averaged over its dimensions (not summed:
    Flow-GRPO's convention, which keeps likelihood ratios near 1 at any image size). Written as
    ((x - old)^2 - (x - mean)^2) = (mean - old)(2x - old - mean): in float32, subtracting two log-densities (or
    two squares) would round away the small moves of the mean that matter here; so would bfloat16 (a bf16
    base's outputs), hence float32 at least."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, mean, old_mean, std = x.to(dtype), mean.to(dtype), old_mean.detach().to(dtype), std.to(dtype).expand_as(x)
    return ((mean - old_mean) * (2 * x - old_mean - mean) / (2 * std**2)).flatten(1).mean(dim=1)


def clipped_policy_loss(log_ratio: torch.Tensor, advantages: torch.Tensor,
                        clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per sample, max(-A r, -A clip(r, 1 - e, 1 + e)) with r = exp(log_ratio) the
    likelihood ratio, and the ratios r. At r = 1 its gradient is -A d log_ratio: the plain policy gradient."""
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(-advantages * ratio, -advantages * clipped), ratio


class UpdateSchedule:
    """The two time-scale update rule and the two stages: the critic learns every iteration, the
    generator every `ratio`-th; the reward term joins after `cold_start` generator steps."""

    def __init__(self, ratio: int, cold_start: int):
        if ratio < 1:
            raise ValueError(f"dmd.ratio must be >= 1, got {ratio}")
        if cold_start < 0:
            raise ValueError(f"trainer.cold_start must be >= 0, got {cold_start}")
        self.ratio = ratio
        self.cold_start = cold_start

    def generator_updates(self, iteration: int) -> bool:
        """Iterations count from 0; the generator moves after each `ratio` critic updates."""
        return (iteration + 1) % self.ratio == 0

    def reward_active(self, generator_step: int) -> bool:
        return generator_step >= self.cold_start
