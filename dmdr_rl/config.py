"""The one typed configuration of a DMDR run (DESIGN section 6): YAML presets plus dotted overrides.

    cfg = load_config("toy-dmdr", ["student.steps=1", "trainer.backend=local"])

Every section is a pydantic model that forbids unknown keys, so a typo or a bad value fails at
start-up with the field's dotted name, the value given and what is allowed.
"""

from __future__ import annotations

import difflib
import os
import re
import string
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, Sequence

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

PRESETS_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and the fix."""


class PluginImportError(ConfigError):
    """A plugin's module (an import path's) cannot be imported in this process: where another process builds the
    plugin (a Ray worker, a Serve replica, with its own runtime_env), that one may still import it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_truth_values_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic reads true as 1 for a number; here it is a mistake (`trainer.batch_size=true`)."""
        annotation = cls.model_fields[info.field_name].annotation
        kinds = set(getattr(annotation, "__args__", ())) or {annotation}
        numbers = bool not in kinds and kinds & {int, float}
        if isinstance(value, bool) and numbers:
            raise ValueError("true/false is not a number here: give a number")
        if (isinstance(value, (list, tuple)) and numbers and getattr(annotation, "__origin__", None) in (list, tuple)
                and any(isinstance(item, bool) for item in value)):  # (dmd.renoise_beta=[true, 1.5])
            raise ValueError("true/false is not a number here: give numbers")
        return value


class LoraSpec(_Section):
    """A peft LoRA adapter on the frozen base transformer."""

    rank: int = Field(64, ge=1)  # r: the rank of each adapted layer's update
    alpha: float = Field(128.0, gt=0)  # the update is scaled by alpha / rank
    targets: Optional[list[str]] = Field(None, min_length=1)  # module names to adapt; null: the joint attention projections


class ModelSection(_Section):
    """The backbone: the teacher, whose frozen weights the critic's and a LoRA generator's adapters share."""

    backbone: str = "toy"  # a registered backbone (toy, sd3, flux) or an import path "package.module:factory"
    path: Optional[str] = None  # weights directory or hub id; null = the backbone's default
    # recompute the transformer's blocks (and an SD3 or Flux VAE decoder's) during the backward pass instead of
    # keeping their activations: much less memory for about a third more compute
    gradient_checkpointing: bool = False
    # torch.compile the transformer's repeated blocks (regional compilation) in the learner and the rollouts: faster
    # steps on a GPU once each block variant has compiled (about ten, in the first two steps); `sample --compile` too
    compile: bool = False
    # torch.compile's mode for them; max-autotune-no-cudagraphs also searches matmul kernels (longer compiles).
    # No CUDA-graph modes: their outputs live in buffers the next call overwrites, and a DMD step keeps several
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"
    resolution: int = Field(32, ge=8)  # image side in pixels (toy: 32; sd3, flux: a multiple of 16, the VAE factor x patch size)
    # passed to the backbone's loader (sd3: dtype, max_sequence_length; flux: those and guidance, FLUX.1-dev's
    # embedded guidance scale, default 3.5)
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kwargs")
    @classmethod
    def _not_the_sections_own_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        """The loader gets path and resolution from their own fields, and `encoders` from the run (a learner
        builds none): the same key in kwargs would reach it twice."""
        for key, field in (("path", "model.path"), ("resolution", "model.resolution"), ("encoders", None)):
            if key in value:
                raise ValueError(f"{key!r} is not a loader option here: " + (f"set {field} instead" if field else
                                 "the run decides where prompt encoders are built (rollouts, not the learner)"))
        return value


class StudentSection(_Section):
    """The few-step generator: how it samples, and its adapter."""

    steps: int = Field(4, ge=1, le=8)  # K: the few-step generator's sampling steps
    shift: float = Field(1.0, gt=0)  # timestep shift of the student's schedule, t' = s t / (1 + (s - 1) t) (paper: 3)
    # ode: each step follows the predicted velocity; sde: each step re-noises its x0 prediction with fresh noise
    # (rl.mode=grpo needs it: the policy gradient is over those random steps)
    sampler: Literal["ode", "sde"] = "ode"
    lora: Optional[LoraSpec] = LoraSpec(rank=64, alpha=128)  # the generator's adapter; null: a full fine-tune


class CriticSection(_Section):
    """The fake-score critic, which tracks the generator's distribution; at LoRA scale s_r(step) the same
    adapter gives the real score (DynaDG)."""

    lora: LoraSpec = LoraSpec(rank=32, alpha=32)  # the fake-score critic's adapter on the frozen teacher
    fake_scale: float = Field(2.0, gt=0)  # s_f: the critic adapter's LoRA scale as the fake score
    # s_r0: the critic adapter's scale as the real score at step 0, annealed to 0 (the teacher) over dmd.dynamic_steps;
    # 0: the real score is the teacher from the first step (no DynaDG)
    real_scale0: float = Field(0.5, ge=0)
    # the samples the critic learns: final, the rollout's final x0 (DESIGN section 2); step, with
    # student.sampler=sde, each sample's x0_k at a uniformly drawn step k, the samples whose distribution the
    # generator step's DMD gradient is taken on (the paper's code). With the ODE sampler both are the final x0
    samples: Literal["final", "step"] = "final"


class DmdSection(_Section):
    """The distribution matching loss and its schedules (DESIGN section 2)."""

    weight: float = Field(1.0, ge=0)  # the DMD term's weight in L_G; 0 turns it off (the RL-only ablation)
    # the real score's CFG scale w_r, drawn from U(real_cfg +- cfg_jitter) per generator step; at most 1 (1: no
    # guidance) it is not drawn but used as it is, as the paper's code does (a jitter would guide away from the prompt)
    real_cfg: float = Field(4.0, ge=0)
    cfg_jitter: float = Field(0.5, ge=0)  # half the width of that draw
    # the real score's CFG only where tau <= this (a guidance interval: guidance at the highest noise levels
    # darkens and over-contrasts the toy students); 1.0: at every noise level, as DESIGN section 2 writes it
    cfg_max_tau: float = Field(1.0, gt=0, le=1)
    ratio: int = Field(5, ge=1)  # a generator update every ratio-th iteration, a critic update every one (TTUR)
    # S_dyn: generator steps over which DynaDG's real-score scale and DynaRS's Beta anneal, by c(s) from 1 to 0
    # (0: annealed from the start: the real score is the teacher and tau uniform)
    dynamic_steps: int = Field(2000, ge=0)
    # (a0, b0) of DynaRS: the critic's and DMD's noise levels tau ~ Beta(a, b), which starts at Beta(a0, b0)
    # (mostly high noise) and ends uniform
    renoise_beta: tuple[float, float] = (4.0, 1.5)

    @field_validator("renoise_beta")
    @classmethod
    def _positive(cls, value: tuple[float, float]) -> tuple[float, float]:
        if min(value) <= 0:
            raise ValueError(f"both Beta parameters must be > 0, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _guidance_not_negative(self) -> "DmdSection":
        if self.real_cfg > 1 and self.cfg_jitter > self.real_cfg:
            raise ValueError(f"cfg_jitter={self.cfg_jitter:g} > real_cfg={self.real_cfg:g} would draw negative guidance "
                             "scales (U(real_cfg - cfg_jitter, real_cfg + cfg_jitter)): lower dmd.cfg_jitter")
        return self


class RLSection(_Section):
    """How the rewards train the generator after the cold start (DESIGN section 2)."""

    # refl: back-propagate d reward / d image (differentiable rewards); grpo: policy gradient over the SDE
    # sampler's Gaussian steps with group-normalised advantages, for rewards that give no gradient (black-box
    # models, HTTP services, counts); the DMD term is the regulariser in both
    mode: Literal["refl", "grpo"] = "refl"
    group_size: int = Field(4, ge=2)  # grpo: samples per prompt in a rollout batch; advantages are normalised per group
    # grpo: PPO's clip of the likelihood ratio of a transition's per-dimension mean log-probability (those
    # ratios stay very close to 1, hence a small range; Flow-GRPO uses 1e-4)
    clip_range: float = Field(1e-4, gt=0)
    policy_weight: float = Field(1.0, gt=0)  # grpo: the policy term's weight in L_G beside dmd.weight * L_dmd
    adv_clip: float = Field(5.0, gt=0)  # grpo: advantages are clipped to [-adv_clip, adv_clip]
    # grpo: which of a sample's K - 1 random sampler steps the policy term trains at each update: one drawn at
    # random (one more generator pass), or all of them (K - 1 more passes: less noise, more compute and memory)
    transitions: Literal["one", "all"] = "one"

    @property
    def policy_gradient(self) -> bool:
        return self.mode == "grpo"


def _serve_autoscaling_config() -> Any:
    """Ray Serve's AutoscalingConfig, imported only when a config sets autoscaling (so this module stays light);
    None without Ray, where no app is deployed and there is nothing to check against."""
    try:
        from ray.serve.config import AutoscalingConfig
    except ImportError:
        return None
    return AutoscalingConfig


def _autoscaling_key(key: str) -> str:
    """Serve's AutoscalingConfig ignores keys it does not know: {max_replica: 4} would deploy one replica."""
    config = _serve_autoscaling_config()
    known = list(getattr(config, "model_fields", None) or getattr(config, "__fields__", {}))  # (pydantic 2 or 1)
    if known and key not in known:
        raise ValueError(f"unknown key, which Serve would ignore; its autoscaling_config has {', '.join(known)}"
                         + _did_you_mean_among(key, known))
    return key


class RewardServeSpec(_Section):
    """How a reward model runs as a Ray Serve app (placement: serve)."""

    app: Optional[str] = None  # the Serve app's name; null: "reward-<name>"
    attach: bool = False  # true: use an app that is already running (`serve deploy deploy/serve-rewards.yaml`)
    replicas: int = Field(1, ge=1)  # the app's replicas; ignored when autoscaling is given
    # Serve's autoscaling_config, e.g. {min_replicas: 1, max_replicas: 4}
    autoscaling: Optional[dict[Annotated[str, AfterValidator(_autoscaling_key)], Any]] = None
    max_batch_size: int = Field(8, ge=1)  # requests merged into one model call (@serve.batch)
    batch_wait_timeout_s: float = Field(0.005, ge=0)  # how long a batch waits for more requests before its call
    num_cpus: float = Field(1.0, ge=0)  # CPUs per replica
    num_gpus: float = Field(0.0, ge=0)  # GPUs per replica; fractions share a GPU
    runtime_env: dict[str, Any] = Field(default_factory=dict)  # e.g. {pip: [...]} to isolate conflicting dependencies
    # replica constructor failures (over all replicas) before the app counts as failed to start; null: Serve's
    # (3 per replica, at most 20). Each is a fresh process loading the model: 1 says at once what is wrong
    constructor_retries: Optional[int] = Field(None, ge=1)
    # how often a replica being stopped (its app deleted, or scaled down) looks whether its requests have finished:
    # Serve's graceful_shutdown_wait_loop_s, whose default (2 s) adds 2 s to each app a run deletes as it ends; a
    # request that meets a replica already stopped is tried again (retries, below)
    shutdown_wait_loop_s: float = Field(0.2, gt=0)
    timeout_s: float = Field(120.0, gt=0)  # how long the client waits for one request's answer
    # tries after the first of a request that failed on the way (a timeout, a lost connection or replica), with
    # exponential backoff; an error of the model's own, or of its input, is raised at once
    retries: int = Field(3, ge=0)
    backoff_s: float = Field(0.5, ge=0)  # the first retry's wait, doubled at each retry up to 10 s
    # pixels (images x height x width) one HTTP request may carry (2^24: 64 images of 512 px, 16 of 1024);
    # bounds what a small PNG can decode to, and the body read (32 bytes a pixel: float64 .npy in base64)
    http_max_pixels: int = Field(2**24, ge=1)
    # Serve's access log line for every request (one a rollout or learner step, in the training run's console too);
    # false also keeps an app the run starts from logging its other INFO lines (replicas starting): warnings only
    access_log: bool = False

    @field_validator("runtime_env")
    @classmethod
    def _remote_code_only(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Serve refuses a deployment whose runtime_env names local code (Ray 2.60: 'Failed to update the
        deployments', nothing more); say what works instead before anything starts."""
        paths = [value.get("working_dir")] + list(value.get("py_modules") or [])
        local = [path for path in paths if isinstance(path, str) and "://" not in path]
        if local:
            raise ValueError(f"{local[0]!r} is a local path, and a Serve app's runtime_env takes only remote URIs in "
                             "working_dir and py_modules (s3://, gs://, https://...zip). A module of your own reaches the "
                             "reward apps a run starts through the run's own runtime_env: run from the directory that holds "
                             "it, or submit with `ray job submit --working-dir .`")
        return value

    @field_validator("autoscaling")
    @classmethod
    def _serve_takes_it(cls, value: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        """Serve's own checks of the values (min_replicas <= max_replicas, numbers) before anything starts, not
        when the app deploys."""
        if value is None:  # (the usual case: Ray Serve is not imported for nothing, 0.8 s)
            return value
        config = _serve_autoscaling_config()
        if config is None:
            return value
        try:  # (not its policy: that imports a module of the user's, which may exist only in the app's runtime_env)
            config(**{key: item for key, item in value.items() if key != "policy"})
        except ValueError as err:  # (pydantic's ValidationError)
            reasons = "; ".join(
                (f"{'.'.join(map(str, e['loc']))}: " if e["loc"] else "") + e["msg"].removeprefix("Value error, ")
                + (f" (got {e['input']!r})" if e["loc"] and "input" in e else "") for e in err.errors()[:3])
            raise ValueError(f"not an autoscaling_config that Serve takes ({reasons}): change the value(s) it names") from None
        return value


def _holds_the_prompt_once(template: str, which: str = "") -> str:
    if template.count("{prompt}") != 1:
        raise ValueError(f"{which}must hold '{{prompt}}' once, where the prompt goes (e.g. 'Realistic photo {{prompt}}')")
    return template


class RelativeSpec(_Section):
    """SRPO's semantic relative preference (Shen et al. 2025, as the DMDR paper's code uses it with HPSv2.1): the
    reward is (1 + k) r(x, positive) - r(x, negative), the prompt read once with a word of the style to reach and
    once with one to leave, so what the two readings share (the prompt's content, the model's biases) cancels."""

    # the prompt as read with a word of the style to reach ({prompt}: the prompt, after rewards[].prompt_template);
    # training draws one of them per image, monitoring and GRPO's scores average over all
    positive: list[str] = Field(["Natural-lighting. {prompt}", "Detailed. {prompt}", "Realistic. {prompt}"], min_length=1)
    # the same with a word of the style to leave
    negative: list[str] = Field(["Painting. {prompt}", "CG Render. {prompt}", "Oil. {prompt}"], min_length=1)
    k: float = Field(0.1, ge=0)  # the positive reading's extra weight: k = 0 scores the difference alone

    @field_validator("positive", "negative")
    @classmethod
    def _name_the_prompt(cls, templates: list[str]) -> list[str]:
        return [_holds_the_prompt_once(template, f"item {i} ({template!r}) ") for i, template in enumerate(templates)]

    def readings(self, prompts: Sequence[str]) -> list[str]:
        """Every text the model reads, each positive template over the prompts, then each negative one."""
        return [template.replace("{prompt}", prompt) for template in (*self.positive, *self.negative)
                for prompt in prompts]


class RewardSpec(_Section):
    """One reward model of `rewards:` (a list: several combine, each with its weight)."""

    name: str  # a registered reward name or an import path "package.module:Class"
    weight: float = Field(1.0, ge=0)  # lambda_j; 0: scored for monitoring only, never trained on
    shaping: Literal["hinge", "linear"] = "hinge"  # phi of the reward loss: hinge relu(margin - r), or linear -r
    margin: float = 0.7  # m of the hinge (the paper's 0.7 for CLIP / HPS scores)
    placement: Literal["local", "serve"] = "local"  # in the learner's process, or a Ray Serve app
    kwargs: dict[str, Any] = Field(default_factory=dict)  # passed to the model's constructor
    # also score the rollout batches the generator trains on (no gradient) and log rollout/reward/<name>
    monitor: bool = False
    # images per model call, in-process or in the app a run starts (an attached app keeps its own setting):
    # a larger batch, or a served app's merged requests, is scored in chunks of this size, which bounds the
    # memory of a gradient through a large reward model; null: all at once. Each image is scored on its
    # own, so chunks give the same scores and gradients.
    max_images_per_call: Optional[int] = Field(None, ge=1)
    serve: RewardServeSpec = RewardServeSpec()  # its Ray Serve app, with placement: serve
    # what its metrics, rollout scores and sample columns are called (reward/<label>) and its default app
    # name; null: `name`. Two entries of one model (other kwargs or shaping) need a label each
    label: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    # the text this reward model reads for a prompt, "{prompt}" standing for it (the paper's HPSv2.1 reward reads
    # "Realistic photo {prompt}"); the generator and the other rewards still read the prompt itself
    prompt_template: str = "{prompt}"
    # score relative to style words (SRPO's semantic relative preference, docs/rewards.md): (1 + k) r(x, positive)
    # - r(x, negative); `relative: {}` takes the DMDR paper's code's words and k; null: the model's own score
    relative: Optional[RelativeSpec] = None

    @field_validator("prompt_template")
    @classmethod
    def _names_the_prompt(cls, value: str) -> str:
        return _holds_the_prompt_once(value)

    def reward_prompts(self, prompts: Sequence[str]) -> list[str]:
        """The prompts as this reward model reads them (`prompt_template`)."""
        return [self.prompt_template.replace("{prompt}", prompt) for prompt in prompts]

    def texts_read(self, prompts: Sequence[str]) -> list[str]:
        """Every text the model may read for these prompts (the template's, and with `relative` each reading of
        them): what a check of the prompts must check."""
        templated = self.reward_prompts(prompts)
        return templated if self.relative is None else self.relative.readings(templated)

    @property
    def key(self) -> str:
        """The name this reward's numbers go by: its label, else its model's name."""
        return self.label or self.name

    @property
    def app_name(self) -> str:
        return self.serve.app or "reward-" + re.sub(r"[^A-Za-z0-9_-]+", "-", self.key).strip("-")


class TrainerSection(_Section):
    """The training loop: steps, stages, batch, optimisers, precision, device, resuming."""

    backend: Literal["local", "ray"] = "local"  # local: one process; ray: rollout actors and a Ray Train learner
    max_steps: int = Field(3000, ge=1)  # the run's generator steps, the cold start included
    cold_start: int = Field(2000, ge=0)  # generator steps with DMD only, before the rewards train
    batch_size: int = Field(32, ge=1)  # images per iteration's rollout batch, over all learner workers
    # the rollout batch after the cold start (the paper's SD3 run: 192 in the cold start, 96 after); null: batch_size
    batch_size_rl: Optional[int] = Field(None, ge=1)
    lr_generator: float = Field(1e-6, gt=0)  # the generator's AdamW learning rate (in the cold start)
    lr_critic: float = Field(5e-7, gt=0)  # the critic's (in the cold start)
    # the generator's learning rate after the cold start (paper: lower); null: lr_generator
    lr_generator_rl: Optional[float] = Field(None, gt=0)
    lr_critic_rl: Optional[float] = Field(None, gt=0)  # the critic's after the cold start; null: lr_critic
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"  # adamw: torch's; adamw8bit: bitsandbytes' 8-bit AdamW (GPU)
    weight_decay_generator: float = Field(0.01, ge=0)  # the generator's AdamW weight decay (torch's default)
    # the critic's (the paper's code: 0, as the SD3 presets set; 0.01 for the generator)
    weight_decay_critic: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)  # the gradient norm each update is clipped to (generator and critic)
    # images per forward/backward pass of a learner update (gradient accumulation): each rank's batch goes
    # through the networks in slices of this size and their gradients add up to the batch's (the random
    # draws do not change, and a non-finite score counts 0 in any slicing); bounds the activation memory of
    # large models. A rollout samples, decodes and scores its batch in slices of this size too. null: the
    # whole batch at once
    micro_batch_size: Optional[int] = Field(None, ge=1)
    precision: Literal["fp32", "bf16"] = "fp32"  # the frozen base's weights (bf16 needs a backbone that takes a dtype)
    # where backend=local runs: auto (the GPU when there is one), cpu, cuda, cuda:N; backend=ray places its
    # learner and rollout actors by ray.learner_gpus / ray.rollout_gpus instead
    device: str = "auto"
    seed: int = Field(0, ge=0)  # every random draw of iteration i comes from (seed, i): a resume continues exactly
    resume_from: Optional[str] = None  # a run directory (its latest checkpoint), its checkpoints/ or one step_N/

    def rollout_batch_size(self, train_step: int) -> int:
        """The prompts of the rollout batch that generator step `train_step` trains on (all ranks together): the
        cold start's `batch_size`, then `batch_size_rl` where set (the paper halves it). Here, not beside the
        update schedule, so the coordinator's process need not import torch."""
        return (self.batch_size_rl or self.batch_size) if train_step >= self.cold_start else self.batch_size

    def batch_size_fields(self) -> list[tuple[str, int]]:
        """The rollout batch sizes the run trains with, by field: the cold start's, and the RL stage's where set
        (each must split into the learner ranks' shards, and GRPO's groups)."""
        return [("batch_size", self.batch_size)] + ([("batch_size_rl", self.batch_size_rl)] if self.batch_size_rl else [])

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("use auto, cpu, cuda or cuda:N")
        return value

    @field_validator("resume_from")
    @classmethod
    def _home_expanded(cls, value: Optional[str]) -> Optional[str]:
        """`~` is the home directory, as in output.dir (a shell does not expand it in resume_from=~/...)."""
        return os.path.expanduser(value) if value else value


class RaySection(_Section):
    """The Ray runtime (trainer.backend=ray): cluster, workers, resources, fault tolerance; and the Serve
    proxy of served rewards (in either backend)."""

    address: Optional[str] = None  # null: the cluster of `ray job submit` / RAY_ADDRESS, else a local one
    learner_workers: int = Field(1, ge=1)  # Ray Train workers (data parallel)
    rollout_actors: int = Field(1, ge=1)  # rollout workers, each with a generator replica and the prompt encoders
    # generator versions a rollout may lag behind (0: on-policy); null: 1, but 0 under rl.mode=grpo, whose clipped
    # likelihood ratios need on-policy batches (one version behind, the clip drops part of the gradient)
    max_staleness: Optional[int] = Field(None, ge=0)
    learner_cpus: float = Field(1.0, gt=0)  # CPUs per learner worker
    learner_gpus: float = Field(0.0, ge=0)  # GPUs per learner worker; > 0 trains on GPUs with NCCL
    rollout_cpus: float = Field(1.0, gt=0)  # CPUs per rollout actor
    rollout_gpus: float = Field(0.0, ge=0)  # GPUs per rollout actor (fractions share a GPU)
    local_cpus: Optional[int] = Field(None, ge=1)  # logical CPUs of a local Ray (null: enough for the actors)
    max_failures: int = Field(3, ge=-1)  # learner-group restarts from the last checkpoint (-1: no limit)
    # a learner error that recurs unchanged (same exception and message, at the same iteration) in this many
    # consecutive tries of the learner group is a bug, not bad luck: the run ends with it instead of spending
    # the rest of max_failures (0: never; lost actors or nodes and a broken process group never count)
    same_failure_limit: int = Field(2, ge=0)
    # how long the learner waits for one rollout batch (its weights, its sampling, a dead worker's
    # replacement); a worker that takes longer is restarted once, then the learner's try fails. Raise it
    # when rollouts are slow or workers load slowly (large models, GPUs shared): only the first question at
    # a launch's start waits for a worker to load without a limit
    rollout_timeout_s: float = Field(600.0, gt=0)
    # where Ray Train keeps its checkpoints: null is <output.dir>/ray_train, which only one node can see; a
    # cluster of several nodes needs a place they all reach (s3://..., gs://..., or a shared filesystem path)
    storage_path: Optional[str] = None
    http_host: str = "127.0.0.1"  # where Serve's HTTP proxy listens (reward apps' HTTP endpoints)
    http_port: int = Field(8000, ge=1, le=65535)  # that proxy's port
    # Ray Train's own log lines on the console (worker group started, each checkpoint and its metrics): the
    # progress bar, metrics.jsonl and TensorBoard already show them; INFO brings them back
    train_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"

    # (what a local run uses too: the Ray instance and Serve proxy of its served rewards)
    APPLY_WITHOUT_THE_RUNTIME: ClassVar[frozenset[str]] = frozenset({"address", "local_cpus", "http_host", "http_port"})

    @field_validator("address")
    @classmethod
    def _cluster_address(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        """Whether a cluster answers there is checked when the run starts. (A run trained through Ray Client
        before it was refused still samples, evaluates and exports: for_sampling.)"""
        if value is not None and value.startswith("ray://"):
            if (info.context or {}).get("for_sampling"):
                return value
            raise ValueError(RAY_CLIENT_REFUSED)
        if value is not None and "://" in value:
            raise ValueError(URL_NOT_CLUSTER)
        if value is not None and not is_cluster_address(value):
            raise ValueError("use host:port (e.g. 127.0.0.1:6379), auto, local, or null")
        return value


# the driver writes the run directory and reads the ledger where it runs, and the coordinator lives on its node:
# under Ray Client those are two machines (the client's files, the head's node)
RAY_CLIENT_REFUSED = ("Ray Client (ray://) runs this driver away from the cluster, whose coordinator and learners "
                      "write the run's records on their own machines: submit the run to the cluster instead, "
                      "`ray job submit --address http://HOST:8265 --working-dir . -- python -m dmdr_rl.run ...`")


# a URL (the dashboard's, which `ray job submit --address` takes) where a run needs the cluster's GCS address
URL_NOT_CLUSTER = ("a URL is not a cluster address: give the host:port `ray start --head` printed (e.g. 127.0.0.1:6379); "
                   "http://HOST:8265 is Ray's dashboard, which `ray job submit --address` takes")


def is_cluster_address(address: str) -> bool:
    """One of the forms ray.init takes that a run can join: host:port ([::1]:6379 too), auto, local."""
    if address in ("auto", "local"):
        return True
    if "://" in address:
        return False
    host, _, port = address.rpartition(":")
    return bool(host.strip("[]")) and port.isdigit()


class DataSection(_Section):
    """The training prompts."""

    prompts: str = "toy:held-in"  # toy:<split> (held-in, held-out), or a .txt/.csv/.parquet/.jsonl file


class WandbSpec(_Section):
    """Weights & Biases logging of the metrics, beside metrics.jsonl and TensorBoard (needs `pip install wandb`)."""

    project: str = Field(min_length=1, max_length=128)  # the W&B project (created at the first run)
    entity: Optional[str] = None  # a team or user; null: the logged-in user's default
    # offline: written under the run directory, `wandb sync` later; null: WANDB_MODE, else online
    mode: Optional[Literal["online", "offline", "disabled"]] = None
    tags: list[str] = Field(default_factory=list)  # the W&B run's tags

    @field_validator("project")
    @classmethod
    def _a_project_name(cls, value: str) -> str:
        """W&B refuses these in a project's name, when the run has loaded its models; here, before."""
        bad = sorted(set(value) & set("/\\#?%:"))
        if bad:
            raise ValueError(f"a W&B project name cannot hold {' '.join(bad)}" + (
                " (a team or user goes in output.wandb.entity)" if "/" in bad else ""))
        return value

    @field_validator("tags")
    @classmethod
    def _w_and_b_tags(cls, value: list[str]) -> list[str]:
        if any(not 1 <= len(tag) <= 64 for tag in value):
            raise ValueError("each W&B tag must be 1 to 64 characters")
        return value


class OutputSection(_Section):
    """What a run writes, how often, and where."""

    dir: str = Field("runs/{name}", min_length=1)  # the run directory; {name}: the run's name
    log_every: int = Field(10, ge=1)  # generator steps between metric records (and the last step, and eval_every's)
    sample_every: int = Field(200, ge=1)  # generator steps between sample grids (and the last step)
    checkpoint_every: int = Field(500, ge=1)  # generator steps between checkpoints (and the last step)
    # generator steps between evaluations of the student during training (and the last step): the toy world's
    # judge accuracy, analytic accuracy, FID, diversity and toy-align on fixed held-in prompts and seeds, logged
    # as val/... metrics; null: none (the main job's closing evaluation, eval/..., is apart from these)
    eval_every: Optional[int] = Field(None, ge=1)
    eval_images: int = Field(64, ge=2)  # images per evaluation during training (few: a curve, not the table's numbers)
    wandb: Optional[WandbSpec] = None  # e.g. {project: dmdr}: the same metrics to a W&B run (one per training run)

    @field_validator("dir")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        try:
            fields = [(name, conversion, spec) for _, name, spec, conversion in string.Formatter().parse(value)
                      if name is not None]
        except ValueError as err:  # an unmatched brace
            fields = [(str(err), None, "")]
        if any(f != ("name", None, "") for f in fields):
            raise ValueError("the only placeholder is {name}, as it is (write a literal brace as {{ or }})")
        return value


class StoreSection(_Section):
    """Where the run's records (ledger, metrics, events) live."""

    url: Optional[str] = None  # null: files under output.dir; redis://host:port/db (the run's ledger, metrics, events)

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: Optional[str]) -> Optional[str]:
        from .store import check_store_url

        return None if value is None else check_store_url(value)


def toy_evaluation_applies(cfg: "RunConfig") -> bool:
    """The judge and the reference statistics know the toy world's scenes only: toy prompts at 32 px."""
    from .toy.scene import RESOLUTION

    return cfg.data.prompts.startswith("toy:") and cfg.model.resolution == RESOLUTION


class RunConfig(_Section):
    # the run's name: output.dir's {name}, its store records', W&B's run name; letters, digits and . _ + -
    # (starting with a letter or digit)
    name: str = Field("dmdr", min_length=1)
    model: ModelSection = ModelSection()
    student: StudentSection = StudentSection()
    critic: CriticSection = CriticSection()
    dmd: DmdSection = DmdSection()
    rewards: list[RewardSpec] = Field(default_factory=list)
    rl: RLSection = RLSection()
    trainer: TrainerSection = TrainerSection()
    ray: RaySection = RaySection()
    data: DataSection = DataSection()
    output: OutputSection = OutputSection()
    store: StoreSection = StoreSection()

    @field_validator("name")
    @classmethod
    def _name_fits_a_path_and_a_key(cls, value: str, info: ValidationInfo) -> str:
        """The name becomes a directory (output.dir's {name}) and the run store's keys: a '/' would nest
        directories, a space or a ':' would make a key other tools split. (A finished run is read whatever it was
        called.)"""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", value) and not (info.context or {}).get("for_sampling"):
            raise ValueError("a run's name becomes a directory name (output.dir's {name}) and the run store's keys: use "
                             "letters, digits and . _ + - (starting with a letter or digit)")
        return value

    @model_validator(mode="after")
    def _has_a_loss(self, info: ValidationInfo) -> "RunConfig":
        if self.ray.max_staleness is None:  # the default follows the RL mode (not a setting of the user's)
            self.ray.max_staleness = 0 if self.rl.policy_gradient else 1
            self.ray.__pydantic_fields_set__.discard("max_staleness")
        if (info.context or {}).get("for_sampling"):
            return self  # these rules are about training: a finished run is sampled whatever they say now
        if self.dmd.weight == 0 and not any(spec.weight > 0 for spec in self.rewards):
            raise ValueError("dmd.weight is 0 and no reward has weight > 0 (" + ("none is configured" if not self.rewards
                             else "monitored rewards only log") + "): the generator would have no loss; give dmd.weight "
                             "or a reward's weight a positive value")
        if self.dmd.weight == 0 and self.trainer.cold_start > 0:
            raise ValueError(f"dmd.weight is 0, so the generator has no loss during the cold start (trainer.cold_start="
                             f"{self.trainer.cold_start} generator steps of DMD only): set trainer.cold_start=0, as the "
                             "toy-rl-only preset does")
        apps = [spec.app_name for spec in self.rewards if spec.placement == "serve"]
        if len(apps) != len(set(apps)):
            raise ValueError(f"two served rewards would share a Serve app ({sorted(a for a in apps if apps.count(a) > 1)[0]!r}): "
                             "give each its own rewards.N.serve.app")
        first: dict[str, int] = {}
        for i, spec in enumerate(self.rewards):
            if (j := first.setdefault(spec.key, i)) != i:
                raise ValueError(f"rewards.{j} and rewards.{i} are both called {spec.key!r}, and a reward's metrics and "
                                 f"scores are kept by that name: give one a label (rewards.{i}.label=...)")
        if self.trainer.backend == "ray" and self.trainer.device != "auto":
            raise ValueError(f"trainer.device={self.trainer.device} applies to trainer.backend=local only: with the Ray "
                             "backend set ray.learner_gpus / ray.rollout_gpus (> 0 puts those actors on GPUs)")
        if self.rl.policy_gradient:
            self._check_policy_gradient()
        if self.output.eval_every is not None and not toy_evaluation_applies(self):
            raise ValueError(f"output.eval_every evaluates with the toy world's judge, which knows toy prompts at 32 px "
                             f"only (data.prompts={self.data.prompts}, model.resolution={self.model.resolution}): set "
                             "output.eval_every=null (the sample grids' reward scores, samples/reward/<reward>, follow training)")
        for i, spec in enumerate(self.rewards):
            if spec.weight == 0 and not spec.monitor:
                raise ValueError(f"rewards.{i} ({spec.name}) has weight 0 and monitor false, so it would never be "
                                 f"computed: set rewards.{i}.monitor=true to log it, or remove it")
        return self

    def _check_policy_gradient(self) -> None:
        if self.student.sampler != "sde" or self.student.steps < 2:
            raise ValueError(f"rl.mode=grpo takes the policy gradient over the SDE sampler's Gaussian steps, so it needs "
                             f"student.sampler=sde and student.steps >= 2 (got {self.student.sampler}, "
                             f"{self.student.steps} step(s))")
        group, workers = self.rl.group_size, self.ray.learner_workers if self.trainer.backend == "ray" else 1
        for field, size in self.trainer.batch_size_fields():
            if size % (group * workers):
                raise ValueError(f"rl.mode=grpo: trainer.{field}={size} must be a multiple of rl.group_size={group}"
                                 + (f" times ray.learner_workers={workers}" if workers > 1 else "")
                                 + " (each learner rank's batch holds whole groups of samples of one prompt)")
        if not any(spec.weight > 0 for spec in self.rewards):
            raise ValueError("rl.mode=grpo but no reward has weight > 0: the policy term would have no reward")

    def _policy_gradient_warnings(self) -> list[str]:
        notes = [f"rewards.{i} ({spec.name}) has hinge shaping, which is flat above its margin ({spec.margin:g}): a group "
                 f"whose samples all clear it has equal rewards and no advantage; rl.mode=grpo learns more with "
                 f"rewards.{i}.shaping=linear" for i, spec in enumerate(self.rewards) if spec.weight > 0 and spec.shaping == "hinge"]
        if self.trainer.backend == "ray" and self.ray.max_staleness > 0:
            notes.append(f"rl.mode=grpo with ray.max_staleness={self.ray.max_staleness}: a rollout sampled by an older "
                         f"generator has likelihood ratios off 1 by about rl.clip_range={self.rl.clip_range:g} or more, so "
                         "the clip drops part of its gradient (logged as rl/clipped); ray.max_staleness=0 keeps batches "
                         "on-policy")
        if self.student.steps == 2:
            notes.append("rl.mode=grpo with student.steps=2: only the first sampler step is a random draw the policy "
                         "gradient can train; the last step's prediction is trained by the DMD term alone")
        return notes

    def scored_on_rollout(self, spec: RewardSpec) -> bool:
        """Whether rollouts score this reward (no gradient): a monitored one for the logs, and in GRPO mode
        every trained one, whose advantages the learner takes from those scores (so a reward is scored once
        per sample, where the rollouts and reward servers scale, not on the learner)."""
        return spec.monitor or (self.rl.policy_gradient and spec.weight > 0)

    @property
    def prompt_group(self) -> int:
        """How many consecutive samples of a training batch share a prompt (GRPO's groups; 1 otherwise)."""
        return self.rl.group_size if self.rl.policy_gradient else 1

    @property
    def output_dir(self) -> Path:
        return Path(os.path.expanduser(self.output.dir.format(name=self.name)))  # (~user of no user: left as it is)

    def _ray_default(self, name: str) -> Any:
        """What ray.<name> is when not given (max_staleness's follows the RL mode, see the validator)."""
        if name == "max_staleness":
            return 0 if self.rl.policy_gradient else 1
        return RaySection.model_fields[name].get_default(call_default_factory=True)

    def warnings(self) -> list[str]:
        """Settings that run but probably not as meant (printed at start and by --dry-run)."""
        notes = []
        trained = [spec.name for spec in self.rewards if spec.weight > 0]
        if self.trainer.backend == "ray" and self.trainer.precision == "bf16" and self.ray.learner_gpus == 0:
            notes.append("trainer.precision=bf16 with ray.learner_gpus=0: the learner runs on CPUs; set "
                         "ray.learner_gpus (and ray.rollout_gpus) to train on GPUs")
        if self.trainer.batch_size_rl is not None and self.trainer.cold_start >= self.trainer.max_steps:
            notes.append(f"trainer.batch_size_rl={self.trainer.batch_size_rl} has no effect: trainer.cold_start="
                         f"{self.trainer.cold_start} >= trainer.max_steps={self.trainer.max_steps}, so every batch is the "
                         "cold start's (trainer.batch_size)")
        if self.critic.samples == "step" and self.student.sampler != "sde":
            notes.append("critic.samples=step with student.sampler=ode: the ODE sampler's generator step re-noises the "
                         "final samples, which the critic learns either way (it differs with student.sampler=sde)")
        if trained and self.trainer.cold_start >= self.trainer.max_steps:
            notes.append(f"trainer.cold_start={self.trainer.cold_start} >= trainer.max_steps={self.trainer.max_steps}: "
                         f"the reward term ({', '.join(trained)}) never trains; lower trainer.cold_start to train it")
        # (it slices nothing only when it holds every stage's batch: the cold start's may be the larger)
        rank_batch = max(size for _, size in self.trainer.batch_size_fields()) // (self.ray.learner_workers if self.trainer.backend == "ray" else 1)
        if self.trainer.micro_batch_size is not None and self.trainer.micro_batch_size >= rank_batch:
            notes.append(f"trainer.micro_batch_size={self.trainer.micro_batch_size} >= the {rank_batch} samples a learner "
                         "trains at a time: it slices nothing (it bounds memory only when smaller)")
        # the user's settings (a shipped preset's are its own backend's, not the user's: load_config); a run's
        # config.yaml sets them all, the defaults too
        ignored = sorted(name for name in self.ray.model_fields_set - RaySection.APPLY_WITHOUT_THE_RUNTIME
                         if getattr(self.ray, name) != self._ray_default(name))
        if self.trainer.backend == "local" and ignored:
            they, them = ("they configure", "them") if len(ignored) > 1 else ("it configures", "it")
            notes.append(f"{', '.join('ray.' + name for name in ignored)} set, but {they} the Ray runtime, and "
                         f"trainer.backend=local trains in this process: set trainer.backend=ray to use {them} (the local "
                         "trainer is placed with trainer.device)")
        if self.rl.policy_gradient:
            notes += self._policy_gradient_warnings()
        for i, spec in enumerate(self.rewards):
            if spec.placement == "serve" and spec.serve.attach and spec.max_images_per_call is not None:
                notes.append(f"rewards.{i}.max_images_per_call has no effect on an attached app "
                             f"({spec.app_name}): set it in that app's own config (its args)")
        return notes


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_config(preset: str | Path | None = None, overrides: Sequence[str] = (), for_sampling: bool = False) -> RunConfig:
    """A preset name (see `available_presets()`) or a YAML file, then `section.key=value` overrides;
    `for_sampling`: a finished run's config, checked field by field but not by the rules of training."""
    inherited: dict[tuple[str, ...], str | None] = {}
    from_presets: dict[tuple[str, ...], bool] = {}  # whether a preset shipped with dmdr_rl set the value at each key
    data = _read_preset(preset, (), inherited, from_presets) if preset is not None else {}
    for override in overrides:
        _apply_override(data, override)
        key = tuple(override.partition("=")[0].split("."))
        _set_by(inherited, key, None)
        _set_by(from_presets, key, False)
    try:
        cfg = RunConfig.model_validate(data, context={"for_sampling": for_sampling})
    except ValidationError as err:
        raise ConfigError(_describe(err, inherited)) from None
    _forget_preset_values(cfg, from_presets)
    return cfg


def _forget_preset_values(cfg: RunConfig, from_presets: dict[tuple[str, ...], bool]) -> None:
    """A section's fields set are the user's settings (an override, their own file): a shipped preset's values leave
    them, as the defaults it stands for (e.g. a Ray preset's ray.*_gpus in a run with trainer.backend=local)."""
    for key, shipped in from_presets.items():
        section = getattr(cfg, key[0], None) if shipped and len(key) == 2 else None
        if isinstance(section, _Section):
            section.__pydantic_fields_set__.discard(key[1])


def load_yaml(text: str) -> Any:
    """YAML as `yaml.safe_load` reads it, but a key given twice in one mapping is an error (a yaml.YAMLError):
    PyYAML keeps the last one without a word, so a section written twice in a config file lost the first one's
    values. Checked on the composed document, before PyYAML's merge keys (`<<: *anchor`) rewrite any mapping."""
    document = yaml.compose(text, Loader=yaml.SafeLoader)
    if document is not None:
        _refuse_repeated_keys(document, set())
    return yaml.safe_load(text)


def _refuse_repeated_keys(node: yaml.Node, seen: set[int]) -> None:
    if id(node) in seen:  # (an alias: that node was checked where its anchor is)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = (key_node.tag, key_node.value)
                line = key_node.start_mark.line + 1
                if key in first_line:
                    where = (f"line {line}" if first_line[key] == line else f"lines {first_line[key]} and {line}")
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key_node.value!r} is given twice in one mapping ({where}): merge them "
                        "into one")
                first_line[key] = line
            _refuse_repeated_keys(key_node, seen)
            _refuse_repeated_keys(value_node, seen)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_repeated_keys(item, seen)


def _preset_file(preset: str | Path, named_by: Path | None = None) -> Path:
    """The file of a preset name or a config file's path; one that does not exist is refused, said with the config
    file whose `base:` names it (`named_by`, which may be one of several), else as --preset's."""
    path = Path(preset) if Path(preset).suffix else PRESETS_DIR / f"{preset}.yaml"
    if path.exists():
        return path
    presets = available_presets()
    where, flag = (f"{named_by}: base: ", "base:") if named_by is not None else ("", "--preset")
    if Path(preset).suffix:
        hint = (f" (the preset is {flag} {path.stem})" if path.stem in presets else
                "" if named_by is not None else f"; presets: {', '.join(presets)}")
        raise ConfigError(f"{where}config file {str(path)!r} does not exist{hint}")
    raise ConfigError(f"{where}unknown preset {str(preset)!r}; available: {', '.join(presets)}"
                      + (_did_you_mean_among(str(preset), presets) if named_by is not None else ""))


def _read_preset(preset: str | Path, chain: tuple[Path, ...], inherited: dict[tuple[str, ...], str | None],
                 from_presets: dict[tuple[str, ...], bool], named_by: Path | None = None) -> dict[str, Any]:
    """A preset's mapping; a `base: <preset or file>` key inherits another preset, merged section by
    section (mappings merge, everything else replaces). `inherited` records which base file set each
    value (None: the file named itself), so that an error in an inherited value names its file;
    `from_presets`, whether that file is a preset shipped with dmdr_rl (not the user's own)."""
    path = _preset_file(preset, named_by)
    if path.resolve() in chain:
        raise ConfigError(f"{path}: `base` presets form a cycle ({' -> '.join(p.name for p in chain)} -> {path.name})")
    try:
        data = load_yaml(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read {path} as a YAML config: " + " ".join(str(err).split())) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    own = data
    base = own.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: base must be a preset name or a YAML path, got {base!r}")
        if Path(base).suffix and not Path(base).is_absolute():
            base = str(path.parent / base)
        data = _merge(_read_preset(base, (*chain, path.resolve()), inherited, from_presets, named_by=path), own)
    shipped = path.resolve().parent == PRESETS_DIR.resolve()
    for key in _value_keys(own):  # (after its bases': its own values replace theirs)
        _set_by(inherited, key, str(path) if chain else None)
        _set_by(from_presets, key, shipped)
    return data


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = _merge(merged[key], value)
        merged[key] = value
    return merged


def _value_keys(data: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The dotted key of each value in a YAML mapping, as a tuple (a mapping's values one by one: they merge)."""
    keys = []
    for key, value in data.items():
        keys.extend(_value_keys(value, (*prefix, str(key))) if isinstance(value, dict) else [(*prefix, str(key))])
    return keys


def _set_by(inherited: dict[tuple[str, ...], Any], key: tuple[str, ...], source: Any) -> None:
    """Record `source` as where the value at `key` comes from, replacing what set the values under it."""
    for earlier in [k for k in inherited if k[:len(key)] == key]:
        del inherited[earlier]
    inherited[key] = source


def _inherited_from(inherited: dict[tuple[str, ...], str | None], loc: tuple) -> str | None:
    """The base file that set the value at an error's `loc`: the one that set it whole (or the section it is
    in) or every value under it; None where that is the file named, an override, a default, or several."""
    loc = tuple(map(str, loc))
    whole = [k for k in inherited if loc[:len(k)] == k]
    keys = [max(whole, key=len)] if whole else []
    sources = {inherited[k] for k in keys + [k for k in inherited if k[:len(loc)] == loc and len(k) > len(loc)]}
    return sources.pop() if len(sources) == 1 else None


def _apply_override(data: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like section.key=value (e.g. student.steps=1)")
    parts = key.split(".")
    node: Any = data
    schema: Any = RunConfig  # a pydantic model, ("list", item schema, item type), or None (free-form mapping)
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth])
        if isinstance(schema, tuple):  # inside a list: the part is an index
            if not isinstance(node, list):
                raise ConfigError(f"override {key!r}: {where} is not a list here; set it whole, e.g. {where}=[...]")
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {key!r}: {part!r} is not an index into a list of {len(node)} "
                                  f"(set the whole list with {where}=[...])")
            slot, annotation, schema = int(part), schema[2], schema[1]
        else:
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {where} is a value ({node!r}), not a section with keys")
            fields = getattr(schema, "model_fields", None)
            if fields is not None and part not in fields:
                raise ConfigError(f"unknown config key {key!r}: {where or 'the top level'} has {', '.join(fields)}"
                                  + _did_you_mean(key))
            slot = part
            annotation = fields[part].annotation if fields is not None else None
            schema = _schema_of(annotation)
            if not last and (part not in node or node[part] is None):
                node[part] = [] if isinstance(schema, tuple) else {}
        if last:
            nullable = annotation is None or _takes_null(annotation)  # (None: a free-form mapping's key)
            if not raw.strip():  # an unset shell variable, most likely: never a silent null
                raise ConfigError(f"override {key!r} has an empty value: give one" +
                                  (f" (or {key}=null)" if nullable else ""))
            try:
                value = _override_value(raw, annotation)
            except yaml.constructor.ConstructorError as err:
                raise ConfigError(f"override {key!r}: {err}") from None
            if annotation is str and raw.strip() in NULL_WORDS:  # a text field's literal "null"? rarely meant
                default = fields[part].default if fields is not None else None
                hint = f"; the default is {default!r}" if isinstance(default, str) else ""
                raise ConfigError(f"override {key!r}: {key} needs a value (it cannot be null{hint}); for the text "
                                  f"{raw.strip()!r} write \"{key}='{raw.strip()}'\" (the shell keeps the inner quotes)")
            node[slot] = value
        else:
            node = node[slot]


NULL_WORDS = ("null", "Null", "NULL", "~", "None")


def _override_value(raw: str, annotation: Any) -> Any:
    """YAML for numbers, lists and mappings; a text field keeps the text as written (so `name=2024`,
    `output.dir={name}-2` and `ray.address=10:20` mean what they say), `null` clearing an optional one."""
    text = raw.strip()
    args = getattr(annotation, "__args__", ()) or ()
    if annotation is str or (str in args and all(a in (str, type(None)) for a in args)):
        if type(None) in args and text in NULL_WORDS:
            return None
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":  # YAML's quoting ('it''s', "a\tb")
            try:
                unquoted = yaml.safe_load(text)
            except yaml.YAMLError:
                unquoted = None
            return unquoted if isinstance(unquoted, str) else text
        return text
    try:
        return load_yaml(raw)
    except yaml.constructor.ConstructorError:  # a key given twice ('{weight: 1, weight: 2}'): the caller names it
        raise
    except yaml.YAMLError:
        return raw  # not YAML: the field's validation says what it expects


def _schema_of(annotation: Any) -> Any:
    """What a field holds, for navigating overrides: a model, ("list", item schema, item type), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if getattr(annotation, "__origin__", None) in (list, tuple):
        return ("list", _schema_of(annotation.__args__[0]), annotation.__args__[0])  # (and the item's type)
    for arg in getattr(annotation, "__args__", ()) or ():  # Optional[Model], Optional[list[...]]
        inner = _schema_of(arg) if arg is not type(None) else None
        if inner is not None:
            return inner
    return None


def _field_at(loc: tuple) -> tuple[Any, Any] | None:
    """(what the field at `loc` holds, as `_schema_of` says; its type annotation), or None where `loc` leaves
    the schema (a free-form mapping's keys)."""
    schema: Any = RunConfig
    annotation: Any = None
    for part in loc:
        if isinstance(schema, tuple):
            schema, annotation = schema[1], schema[2]
        elif hasattr(schema, "model_fields") and part in schema.model_fields:
            annotation = schema.model_fields[part].annotation
            schema = _schema_of(annotation)
        else:
            return None
    return schema, annotation


def _dotted_keys(schema: Any = RunConfig, prefix: str = "") -> list[str]:
    """Every key of the config's sections as `section.key`, a list item's as `rewards.N.weight` (the keys of
    free-form mappings aside)."""
    keys = []
    for name, field in schema.model_fields.items():
        keys.append(prefix + name)
        inner = _schema_of(field.annotation)
        if isinstance(inner, tuple):  # a list: its items' keys
            inner, name = inner[1], f"{name}.N"
        if hasattr(inner, "model_fields"):
            keys.extend(_dotted_keys(inner, f"{prefix}{name}."))
    return keys


def _did_you_mean(key: str) -> str:
    """'; did you mean trainer.resume_from?' for an unknown key: a misspelt one, or one put in the wrong
    section (or none: `max_steps=5`). A list item's is guessed among that item's own keys only (an unknown
    `rewards.0.path` is most likely a kwarg, not model.path)."""
    keys = _dotted_keys()
    pattern = re.sub(r"(?<=\.)\d+(?=\.)", "N", key)  # rewards.0.wieght -> rewards.N.wieght
    if ".N." in pattern:
        item = pattern[: pattern.rindex(".N.") + 3]
        own = [k[len(item):] for k in keys if k.startswith(item)]
        return _did_you_mean_among(pattern[len(item):], own, prefix=key[: len(key) - len(pattern) + len(item)])
    keys = [k for k in keys if ".N." not in k]
    name = key.split(".")[-1]
    names = {k: k.split(".")[-1] for k in keys}
    guesses = ([k for k in keys if names[k] == name and k != key]
               or difflib.get_close_matches(key, keys, n=3, cutoff=0.85)
               or [k for k in keys if names[k] in difflib.get_close_matches(name, set(names.values()), n=3, cutoff=0.8)])
    section = key.split(".")[0] + "."
    guesses = [k for k in guesses if k.startswith(section)] or guesses  # critic.rnk: critic.lora.rank
    return f"; did you mean {' or '.join(guesses[:3])}?" if guesses else ""


def _did_you_mean_among(name: str, names: Sequence[str], prefix: str = "") -> str:
    """'; did you mean <prefix>max_replicas?' for a misspelt `name` among a few known `names` (a list item's
    keys, a free-form mapping's that another library reads)."""
    guesses = [prefix + close for close in difflib.get_close_matches(name, names, n=3, cutoff=0.75)]
    return f"; did you mean {' or '.join(guesses)}?" if guesses else ""


def _allowed_keys(loc: tuple) -> str:
    """'; <section> has <its keys>' for the section at `loc` (for an unknown key in a YAML file)."""
    schema = (_field_at(loc) or (None, None))[0]
    return f"; {'.'.join(map(str, loc)) or 'the top level'} has {', '.join(schema.model_fields)}" if hasattr(schema, "model_fields") else ""


def _nullable(loc: tuple) -> bool:
    """Whether the field at `loc` may be null."""
    return _takes_null((_field_at(loc) or (None, None))[1])


def _takes_null(annotation: Any) -> bool:
    """Whether a field of this type annotation may be null (Optional[...])."""
    return type(None) in (getattr(annotation, "__args__", ()) or ())


def _describe(err: ValidationError, inherited: dict[tuple[str, ...], str | None]) -> str:
    lines = []
    for e in err.errors():
        message = e["msg"].removeprefix("Value error, ")
        if not e["loc"]:  # a check across fields names them itself; its input is the whole config
            lines.append(message)
            continue
        if e["type"] == "missing" and isinstance(e["loc"][-1], int):  # a fixed-length list (renoise_beta)
            lines.append(f"{'.'.join(map(str, e['loc'][:-1]))}: too few values (no item {e['loc'][-1]})")
        elif e["type"] == "missing":
            lines.append(f"{'.'.join(map(str, e['loc']))}: required")
        else:
            key_refused = e["loc"][-1] == "[key]"  # a mapping's key that its validator refused: the path names it
            field, value = ".".join(map(str, e["loc"][:-1] if key_refused else e["loc"])), e.get("input")
            if e["loc"] == ("store", "url") and isinstance(value, str):
                from .store import redact_url

                value = redact_url(value)
            if e["type"] == "extra_forbidden":
                message = "unknown key" + _allowed_keys(e["loc"][:-1]) + _did_you_mean(field)
            elif value == "None" and _nullable(e["loc"]):
                message += "; write null, not None"
            elif e["type"] == "tuple_type":
                message += f"; write the values in brackets ({field}=[a, b])"
            elif e["type"] in ("model_type", "model_attributes_type"):
                keyed = isinstance(e["loc"][-1], str)  # (not a list's item)
                message = (("is null, which an empty key in YAML also reads as: give the section's fields"
                            + (", or remove the key" if keyed else "")) if value is None else
                           "is a section: give its fields as a mapping" + (f" ({field}.KEY=VALUE, or KEY: VALUE under "
                                                                             "it)" if keyed else ""))
                if _nullable(e["loc"]):
                    message += ", or null"
            # (a check over a whole section names its fields itself: its input, the section, says nothing more)
            lines.append(f"{field}: {message}" + ("" if isinstance(value, dict) or key_refused else f" (got {value!r})"))
        source = _inherited_from(inherited, e["loc"])
        if source is not None:  # not in the file the user named: say where to fix it
            lines[-1] += f"; set in {source} (inherited with base:)"
    return "invalid config:\n  " + "\n  ".join(lines)
