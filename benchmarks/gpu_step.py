"""One DMDR learner step on an SD3-Medium-shaped (or FLUX.1-dev-shaped) random-weight model: step time,
achieved TFLOP/s and peak memory (issue 6). The step is the learner's own (`DMDRLearner.step` with `dmd.ratio=1`): a critic
update, then a generator update with the DMD loss and a reward term through the VAE decode (ReFL), or with
`--rl grpo` the DMD loss and the policy term over the SDE sampler's transitions (`rl.mode=grpo`: no
decode on the learner; the rollout's scores are made once, outside the timing, as rollouts do).

    python benchmarks/gpu_step.py                                  # SD3-Medium shape, bf16, 1024 px, batch 2
    python benchmarks/gpu_step.py --resolution 512 --batch 4
    python benchmarks/gpu_step.py --shape tiny --device cpu --resolution 64   # a smoke run of the same code on a CPU
    python benchmarks/gpu_step.py --count-only                     # FLOPs per step, counted without a GPU
    python benchmarks/gpu_step.py --shape flux-dev --count-only    # the same for FLUX.1-dev's shape (12B parameters)
    python benchmarks/gpu_step.py --rl grpo --transitions all      # the policy-gradient step instead of ReFL's
    python benchmarks/gpu_step.py --compile                        # model.compile: the blocks under torch.compile

What is timed is the learner only: the rollout (backward simulation, made by rollout actors in a run)
is timed apart, and the reward model runs in its own server in a run, so the step here uses a cheap
differentiable stand-in whose gradient, like a served one, reaches the generator through the decode.
FLOPs are counted once by `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and
attention, forward and backward) and divided by the median step time. Weights are random: a step
costs the same whatever their values. Text conditioning is random too (learners hold no encoders).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import write_report  # noqa: E402
from dmdr_rl import dmdr  # noqa: E402
from dmdr_rl.conditioning import Conditioning  # noqa: E402
from dmdr_rl.config import load_config  # noqa: E402
from dmdr_rl.learning import DMDRLearner  # noqa: E402
from dmdr_rl.rollout import RolloutBatch  # noqa: E402
from dmdr_rl.flux import FLUX_DEV_TRANSFORMER, FLUX_VAE, FluxBackbone  # noqa: E402
from dmdr_rl.latent import LatentBackbone, vae_scale_factor  # noqa: E402
from dmdr_rl.sd3 import SD3_MEDIUM_TRANSFORMER, SD3_MEDIUM_VAE, SD3Backbone  # noqa: E402
from dmdr_rl.tiny import tiny_flux_pipeline, tiny_sd3_pipeline  # noqa: E402

# Text tokens per prompt: SD3's 77 CLIP + 256 T5 tokens (diffusers' default, as the reference measurements of plain
# diffusers; the sd3-medium-dmdr preset encodes 128 T5 tokens, as the paper's code: 205, a little less work); FLUX.1's
# 512 T5 tokens (CLIP gives the pooled vector only); the tiny pipelines' 16 + 16 and 16.
TOKENS = {"medium": 333, "tiny": 32, "flux-dev": 512, "flux-tiny": 16}
# --rl grpo: samples per prompt (the batch must hold whole groups)
GRPO_GROUP = 2
# FlopCounterMode counts the CUDA attention kernels but not the CPU's, which would count 0 (a smoke run's
# TFLOP/s too low): the same formulas for those
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda query, key, value, *_, **__: sdpa_flop_count(query, key, value),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad_out, query, key, value, *_, **__: sdpa_backward_flop_count(grad_out, query, key, value),
}
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device name; --peak-tflops overrides.
# The first key found in the name wins, so the NVL parts come before their families.
BF16_PEAK_TFLOPS = {"H200 NVL": 835.0, "H100 NVL": 835.0, "H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0,
                    "H100 PCIe": 756.0, "H100": 756.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


class SharpnessReward:
    """A cheap differentiable stand-in for a served reward: the learner's share of ReFL is the decode
    and its backward, which this exercises exactly; the reward model itself runs in its server."""

    name = "sharpness"
    differentiable = True

    def score(self, images: torch.Tensor, prompts) -> torch.Tensor:
        dx = images[..., 1:, :] - images[..., :-1, :]
        return dx.abs().mean(dim=(1, 2, 3))


def random_backbone(shape: str, resolution: int, dtype: torch.dtype, device: torch.device) -> LatentBackbone:
    """Random weights: SD3-Medium's or FLUX.1-dev's shapes, or the tests' tiny pipelines. On the `meta` device
    nothing is allocated (shapes only, for counting FLOPs)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel

    flux = shape.startswith("flux")
    if shape in ("tiny", "flux-tiny"):
        pipeline = tiny_flux_pipeline(resolution=resolution) if flux else tiny_sd3_pipeline(resolution=resolution)
        transformer, vae = pipeline.transformer, pipeline.vae
    else:
        vae_config = FLUX_VAE if flux else SD3_MEDIUM_VAE
        blocks = len(vae_config["block_out_channels"])
        with torch.device(device):  # random init where the model runs: on a GPU it takes no time
            vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                                up_block_types=("UpDecoderBlock2D",) * blocks, sample_size=resolution,
                                use_quant_conv=False, use_post_quant_conv=False, **vae_config)
            transformer = (FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER) if flux else SD3Transformer2DModel(
                **{**SD3_MEDIUM_TRANSFORMER, "sample_size": resolution // vae_scale_factor(vae.config)}))
    family = FluxBackbone if flux else SD3Backbone
    backbone = family(transformer.to(dtype).eval(), vae.to(dtype), None, resolution)
    return backbone.to(device)


def setup(args: argparse.Namespace, device: torch.device):
    """(backbone, learner, conditioning) of one learner step: the SD3-Medium (or FLUX.1-dev) preset with a critic and
    a generator update per step and the stand-in reward on; text conditioning random (learners hold no encoders)."""
    policy = ["rl.mode=grpo", "student.sampler=sde", f"rl.group_size={GRPO_GROUP}", f"rl.transitions={args.transitions}"]
    cfg = load_config("flux-dev-dmdr" if args.shape.startswith("flux") else "sd3-medium-dmdr", [
        "dmd.ratio=1", "trainer.cold_start=0", f"trainer.optimizer={args.optimizer}", f"trainer.precision={args.precision}",
        f"student.steps={args.steps}", "rewards=[{name: sharpness, weight: 0.3, shaping: linear}]",
        f"trainer.micro_batch_size={args.micro_batch or 'null'}", *(policy if args.rl == "grpo" else [])])
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.precision]
    backbone = random_backbone(args.shape, args.resolution, dtype, device)
    if args.gradient_checkpointing:
        backbone.enable_gradient_checkpointing()
    if getattr(args, "compile", False):  # (the meta device's count runs eager)
        backbone.compile_blocks(mode=args.compile_mode)
    backbone.set_null(random_conditioning(backbone, args.shape, 1, device, scale=0.0))
    reward = dmdr.WeightedReward(SharpnessReward(), cfg.rewards[0])
    learner = DMDRLearner(backbone, cfg, [reward])
    backbone.to(device)  # peft leaves the adapters of a meta base on the CPU
    return backbone, learner, random_conditioning(backbone, args.shape, args.batch, device)


def count_only(args: argparse.Namespace) -> dict:
    """The FLOPs of one learner step, counted on the `meta` device (no GPU, no allocation): the step
    functions the learner calls, with their backward passes (the optimizer's elementwise work is not
    counted, as FlopCounterMode counts matmuls, convolutions and attention). On `meta` attention runs as its
    math path's matmuls; a fused kernel's backward also recomputes the attention scores, which a count on the
    step's own device includes: the tiny shape counts 282.4 MFLOP here, 291.3 on a CPU's fused attention."""
    device = torch.device("meta")
    backbone, learner, cond = setup(argparse.Namespace(**{**vars(args), "compile": False}), device)
    cfg = learner.cfg
    rng = torch.Generator().manual_seed(0)
    counts = {}
    with flop_counter() as counter:
        trajectory = dmdr.backward_simulation(backbone, cond, cfg.student, rng)
    counts["rollout"] = counter.get_total_flops()
    micro = {"micro_batch_size": cfg.trainer.micro_batch_size, "backward": torch.Tensor.backward}
    with flop_counter() as counter:
        dmdr.critic_loss(backbone, trajectory.x0, cond, 0, cfg.critic, cfg.dmd, rng, **micro)
    counts["critic_update"] = counter.get_total_flops()
    scores = rollout_scores(backbone, learner, trajectory, [""] * args.batch)
    with flop_counter() as counter:
        dmdr.generator_loss(backbone, trajectory, cond, [""] * args.batch, 0, cfg.student, cfg.critic, cfg.dmd,
                            learner.rewards, True, rng, **micro, rl=cfg.rl, rollout_scores=scores)
    counts["generator_update"] = counter.get_total_flops()
    step = counts["critic_update"] + counts["generator_update"]
    # the target's reference: an H200's bf16 peak (no table for fp32: only a given --peak-tflops)
    peak = args.peak_tflops or (BF16_PEAK_TFLOPS["H200"] if args.precision == "bf16" else None)
    return {
        "mode": "count-only (meta device)", "rl": args.rl, "shape": args.shape, "resolution": args.resolution,
        "batch": args.batch,
        "student_steps": args.steps, **{f"tflop_{k}": float(f"{v / 1e12:.4g}") for k, v in counts.items()},
        "tflop_per_step": float(f"{step / 1e12:.4g}"),
        "precision": args.precision, "peak_tflops": peak,
        "step_s_at_40pct_of_peak": float(f"{step / (0.4 * peak * 1e12):.4g}") if peak else None,
    }


def rollout_scores(backbone: LatentBackbone, learner: DMDRLearner, trajectory, prompts: list[str]) -> dict:
    """GRPO's advantages come from the rollout's scores (`RolloutBatch.reward_scores`), made by the
    rollouts in a run; none are needed for ReFL, whose learner scores with the gradient."""
    if not learner.cfg.rl.policy_gradient:
        return {}
    with torch.no_grad():
        images = backbone.decode(trajectory.x0)
        return {reward.spec.key: reward.model.score(images, prompts) for reward in learner.rewards}


def random_conditioning(backbone: LatentBackbone, shape: str, batch: int, device: torch.device,
                        scale: float = 1.0) -> Conditioning:
    config = backbone.transformer.config
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(batch, TOKENS[shape], config.joint_attention_dim, generator=generator)
    pooled = torch.randn(batch, config.pooled_projection_dim, generator=generator)
    return Conditioning(tokens * scale, pooled * scale).to(device)


def compiled_graphs() -> int:
    """How many graphs torch.compile has made in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def graph_breaks() -> int:
    """How many times torch.compile has split a graph in this process (each break runs code between graphs eagerly)."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device: torch.device, override: float | None, precision: str = "bf16") -> float | None:
    """The dense peak of the step's precision: `override`, else the bf16 table's (none for fp32)."""
    if override is not None:
        return override
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int = 8192, repeats: int = 10) -> float | None:
    """What one large matmul of the step's precision reaches on this device: the practical ceiling beside the
    datasheet peak."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def run(args: argparse.Namespace, write=lambda report: None) -> dict:
    """Time the step; `write(report)` is called as soon as the timings exist, again with the FLOPs."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    backbone, learner, cond = setup(args, device)
    cfg = learner.cfg

    def rollout():
        return dmdr.backward_simulation(backbone, cond, cfg.student, torch.Generator().manual_seed(0))

    rollout()  # the first CUDA work pays for handles, kernel loading and clock ramp-up
    synchronize(device)
    started = time.perf_counter()
    trajectory = rollout()
    synchronize(device)
    rollout_s = time.perf_counter() - started
    prompts = [f"prompt {i // GRPO_GROUP}" for i in range(args.batch)]
    policy = cfg.rl.policy_gradient
    template = RolloutBatch(0, 0, prompts, cond, trajectory.x0, trajectory.x0_steps, trajectory.timesteps, 0, 0,
                            rollout_scores(backbone, learner, trajectory, prompts), trajectory.inputs if policy else None)

    def step() -> dict:
        return learner.step(replace(template, iteration=learner.iteration, weight_version=learner.generator_step))

    if args.compile and hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        torch._dynamo.config.fail_on_recompile_limit_hit = True  # (else blocks past the limit run eagerly, unsaid)
    started, graphs_before = time.perf_counter(), compiled_graphs()
    for number in range(1, args.warmup + 1):  # with --compile: the block variants compile here (the third step's
        step()                                # real scale too)
        if args.compile:  # (a compile that runs out of time still says how far it got)
            synchronize(device)
            print(f"warm-up step {number}/{args.warmup}: {time.perf_counter() - started:.1f} s, "
                  f"{compiled_graphs() - graphs_before} graphs compiled", file=sys.stderr, flush=True)
    synchronize(device)
    warmup_s = time.perf_counter() - started
    graphs_after_warmup = compiled_graphs()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.repeats):
        synchronize(device)
        started = time.perf_counter()
        metrics = step()
        synchronize(device)
        times.append(time.perf_counter() - started)
    median = statistics.median(times)
    cuda = device.type == "cuda"
    graphs = compiled_graphs()
    report = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "rl": args.rl, "transitions": args.transitions if policy else None,
        "shape": args.shape, "resolution": args.resolution, "batch": args.batch, "precision": args.precision,
        "optimizer": args.optimizer, "student_steps": args.steps, "micro_batch": args.micro_batch,
        # checkpointing recomputes the blocks: the counted FLOPs include the recomputation
        "gradient_checkpointing": args.gradient_checkpointing,
        "compile": args.compile_mode if args.compile else None, "warmup_steps": args.warmup, "warmup_s": round(warmup_s, 2),
        # graphs torch.compile made in the warm-up, and in the timed steps: any there would be timed too (must be 0)
        "graphs_compiled": {"warmup": graphs_after_warmup - graphs_before, "timed_steps": graphs - graphs_after_warmup,
                            "graph_breaks": graph_breaks()} if args.compile else None,
        "step_s_median": round(median, 4), "step_s_all": [round(t, 4) for t in times],
        "rollout_s": round(rollout_s, 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
        "peak_memory_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2) if cuda else None,
        # a step whose gradient was not finite skips its optimizer update (and is cheaper): it must be 0 here
        "skipped_updates": learner.skipped_updates,
        "losses": {k: round(v, 5) for k, v in metrics.items() if k.startswith("loss/")},
        "torch": torch.__version__,
    }
    write(report)
    try:
        counter = flop_counter()
        # (a compiled block's kernels are not operators FlopCounterMode sees: with --compile it counts one step of the
        # same code run eagerly, torch.compiler's force_eager stance)
        with torch.compiler.set_stance("force_eager") if args.compile else contextlib.nullcontext(), counter:
            step()
        flops, report["flops_counted_on"] = counter.get_total_flops(), str(device)
    except Exception as err:  # the timings stand; count the same step on the meta device instead
        report["flop_count_error"] = f"{type(err).__name__}: {err}"
        flops, report["flops_counted_on"] = count_only(args)["tflop_per_step"] * 1e12, "meta"
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    achieved, peak = flops / median / 1e12, peak_tflops(device, args.peak_tflops, args.precision)
    ceiling = matmul_tflops(device, dtype)
    if args.gradient_checkpointing:  # the step's useful work, without the recomputation: comparable with plain steps
        useful = count_only(argparse.Namespace(**{**vars(args), "gradient_checkpointing": False}))["tflop_per_step"]
        report.update({"model_tflop_per_step": useful, "model_tflops": float(f"{useful / median:.4g}"),
                       "model_fraction_of_peak": round(useful / median / peak, 4) if peak else None})
    report.update({
        "tflop_per_step": float(f"{flops / 1e12:.4g}"), "achieved_tflops": float(f"{achieved:.4g}"),
        "peak_tflops": peak, "fraction_of_peak": round(achieved / peak, 4) if peak else None,
        "matmul_8192_tflops": float(f"{ceiling:.4g}") if ceiling else None,  # in the step's precision
        "fraction_of_matmul": round(achieved / ceiling, 4) if ceiling else None,
    })
    write(report)
    return report


def main(argv=None) -> dict:
    from dmdr_rl.cli import command_summary

    p = argparse.ArgumentParser(description=command_summary(__doc__))
    p.add_argument("--shape", choices=sorted(TOKENS), default="medium")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2, help="images per learner step")
    p.add_argument("--steps", type=int, default=4, help="student sampling steps (the rollout's trajectory length)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="the frozen base's weights")
    p.add_argument("--micro-batch", type=int, default=None, help="trainer.micro_batch_size (default: the whole batch)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="model.gradient_checkpointing")
    p.add_argument("--compile", action="store_true", help="model.compile: torch.compile the transformer's blocks")
    p.add_argument("--compile-mode", choices=["default", "max-autotune-no-cudagraphs"], default="default",
                   help="model.compile_mode")
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw")
    p.add_argument("--rl", choices=["refl", "grpo"], default="refl",
                   help=f"the reward term: ReFL's gradient, or the policy gradient (groups of {GRPO_GROUP})")
    p.add_argument("--transitions", choices=["one", "all"], default="all", help="rl.transitions, with --rl grpo")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; 3 with --compile)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak in --precision (default: bf16's by name)")
    p.add_argument("--count-only", action="store_true",
                   help="count the step's FLOPs on the meta device (no GPU needed) instead of running it")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else 3 if args.compile else 2
    if args.rl == "grpo" and args.batch % GRPO_GROUP:
        p.error(f"--rl grpo samples each prompt {GRPO_GROUP} times: --batch must be a multiple of {GRPO_GROUP}")

    def write(report: dict) -> None:
        write_report(args.json, report)

    if args.count_only:
        report = count_only(args)
        write(report)
    else:
        report = run_halving_on_oom(args, write)
    print(json.dumps(report, indent=2))
    return report


def run_halving_on_oom(args: argparse.Namespace, write) -> dict:
    """`run`, again at half the batch while the GPU runs out of memory (the report says so)."""
    asked, smallest = args.batch, GRPO_GROUP if args.rl == "grpo" else 1
    while True:
        try:
            report = run(args, write)
            break
        except torch.cuda.OutOfMemoryError:
            # (--compile: half the batch would compile every block variant again, for as long as the first time)
            if args.compile or args.batch // 2 < smallest or args.batch % (2 * smallest):
                raise
        # out of the handler: its traceback no longer holds the failed attempt's model and activations
        args.batch //= 2
        gc.collect()
        torch.cuda.empty_cache()
        print(f"out of GPU memory at batch {args.batch * 2}: trying batch {args.batch}", file=sys.stderr, flush=True)
    if args.batch != asked:
        report["out_of_memory_at_batch"] = asked
        write(report)
    return report


if __name__ == "__main__":
    main()
