"""Backbones hide model families from the algorithm (DESIGN section 6).

The algorithm sees a `Backbone`: encode prompts, predict velocity with a named LoRA adapter at a
given scale and with classifier-free guidance, and decode to images in [0, 1]. The trainers, rollout
actors, checkpoints and samplers need a `TrainableBackbone`: that, plus adapters to add and train,
placement, and sampling. `TransformerBackbone` implements it for diffusers transformers (the toy teacher,
SD3, Flux, or a user's model: docs/custom-backbone.md; `call_transformer` says how one is called, SD3's
signature unless a subclass says otherwise): generator and critic are
peft LoRA adapters on one shared frozen base, switched per call; scale 0 (or no adapter) is exactly the
base model. A generator may instead be a full trainable copy of the base (`add_full_copy`, config
`student.lora: null`); the algorithm does not see the difference.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch
import torch.utils.checkpoint
from peft import LoraConfig

from .conditioning import Conditioning
from .flow import generators, randn, sample

# The attention projections of SD3's joint blocks and Flux's double-stream blocks (image and context streams;
# to_q, to_k and to_v match Flux's single-stream blocks too).
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def missing_lora_targets(module_names: Sequence[str], targets: Sequence[str]) -> list[str]:
    """The targets no module answers to: whole dotted segments, as peft matches them ("q_proj" is not
    "add_q_proj")."""
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in module_names)]


def adaptable_layers(transformer: torch.nn.Module) -> list[str]:
    """The names LoRA targets can take in `transformer`: the last name segment of its Linear and Conv layers (what an
    error lists, so that a user of another model than SD3 sees its own names)."""
    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)

    def ending(name: str) -> str:  # (an index in a Sequential keeps its parent: to_out.0, net.2)
        parts = name.split(".")
        return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]

    return sorted({ending(name) for name, module in transformer.named_modules() if isinstance(module, kinds)})


def _no_such_targets(missing: Sequence[str], transformer: torch.nn.Module, adapter: str | None = None) -> str:
    layers = adaptable_layers(transformer)
    shown = ", ".join(layers[:24]) + (", ..." if len(layers) > 24 else "")
    return (f"LoRA target module(s) {list(missing)}{f' of adapter {adapter!r}' if adapter else ''} do not exist in "
            f"{type(transformer).__name__} (its Linear/Conv layers are named: {shown}; null: {list(DEFAULT_LORA_TARGETS)}, "
            "SD3's and Flux's attention projections)")


def check_lora_targets(transformer_config: Mapping[str, Any], targets_by_field: Mapping[str, Sequence[str]],
                       transformer_class: type | None = None) -> None:
    """The config's LoRA targets against a transformer built from its config alone (on the meta device: no
    weights), as a dry run can: a ConfigError naming the field. `transformer_class`: the diffusers model class
    (default SD3's)."""
    from .config import ConfigError

    if transformer_class is None:
        from diffusers import SD3Transformer2DModel as transformer_class
    with torch.device("meta"):
        transformer = transformer_class.from_config(transformer_config)
    names = [n for n, _ in transformer.named_modules()]
    for field, targets in targets_by_field.items():
        missing = missing_lora_targets(names, targets)
        if missing:
            raise ConfigError(f"{field}: {_no_such_targets(missing, transformer)}")


def transformer_velocity(transformer: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """One SD3-family transformer call with the project's conventions (diffusers takes timestep = 1000 t)."""
    return transformer(
        hidden_states=x_t, encoder_hidden_states=cond.tokens, pooled_projections=cond.pooled, timestep=t * 1000.0
    ).sample


def _in_module_precision(call: Callable, module: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                         cond: Conditioning) -> torch.Tensor:
    """`call(module, x_t, t, cond)` (a backbone's `call_transformer`) in the module's own precision (a bf16
    base takes bf16 inputs), with the answer in the caller's: the sampler and loss arithmetic stay float32.
    The timestep stays float32, as SD3's pipelines pass it: 1000 t in bf16 would round (t = 0.75 to 752),
    away from the tau that x0 = x_tau - tau v uses and from the timestep an exported student is sampled at.
    (A family whose pipeline rounds it, Flux, rounds it the same way in its `call_transformer`.)"""
    dtype = _base_dtype(module)
    return call(module, x_t.to(dtype), t.float(), cond.to(dtype=dtype)).to(x_t.dtype)


def _base_dtype(module: torch.nn.Module) -> torch.dtype:
    """The precision of a transformer's own weights, not an adapter's."""
    return next(p.dtype for n, p in module.named_parameters() if "lora_" not in n)


@runtime_checkable
class Backbone(Protocol):
    """What the DMDR step functions and rollouts call (`dmdr_rl.dmdr`, `dmdr_rl.rollout`): the algorithm's
    view of a model family, DESIGN section 6. Tensors only go in and out, so they move through the object
    store."""

    sample_shape: tuple[int, int, int]  # (C, H, W) of x, the space the networks work in: the noise's shape

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """The prompts' conditioning ([B, L, D] tokens, [B, P] pooled), without gradients: rollouts."""
        ...

    def null(self, batch: int) -> Conditioning:
        """The empty prompt's conditioning repeated `batch` times: the unconditional half of CFG."""
        ...

    def velocity(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, *, adapter: str | None = None,
        scale: float = 1.0, cfg: float | torch.Tensor = 1.0, null: Conditioning | None = None,
    ) -> torch.Tensor:
        """v = eps - x0 at x_t = (1 - t) x0 + t eps (t: [B] in [0, 1]) through `adapter` at LoRA `scale` (None
        or scale 0: exactly the frozen base, the teacher), with guidance `cfg` (a scalar or one per sample)
        against `null` (default `null(B)`): the generator's prediction, the critic's fake and real scores."""
        ...

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1], differentiable in x0: what reward models score (ReFL's gradient)."""
        ...


@runtime_checkable
class TrainableBackbone(Backbone, Protocol):
    """What a backbone that `model.backbone` names must be: `Backbone`, and what the trainers (local and Ray),
    rollout actors, checkpoints, `sample` and `eval` call besides. `build_backbone` refuses an object that
    lacks any of it. `TransformerBackbone` implements all of it for a diffusers transformer; subclass it
    (docs/custom-backbone.md).

    Three more members are called only by some configs and commands, and looked up there:
    `enable_gradient_checkpointing()` (model.gradient_checkpointing=true), `compile_blocks(**options)`
    (model.compile=true) and `standalone_transformer(name)` (`export --format transformer`: a model with
    `save_pretrained`)."""

    @property
    def device(self) -> torch.device:
        """Where the networks run: the learner moves each rollout batch there and times its steps on it."""
        ...

    def to(self, device: torch.device | str) -> TrainableBackbone:
        """Every network moved to `device` (returns the backbone): `build_backbone` places it with this."""
        ...

    def set_null(self, null: Conditioning) -> None:
        """The empty prompt's conditioning [1, ...] for a backbone built with `encoders=False` (a Ray learner,
        which gets it from a rollout actor's `null(1)`), so that `null()` needs no encoder."""
        ...

    def add_lora(self, name: str, rank: int, alpha: float, targets: Sequence[str] = ...) -> None:
        """A trainable LoRA adapter `name` on the frozen base ("generator", "critic"): student.lora and
        critic.lora, `targets` from their `targets` field when set (else the backbone's default)."""
        ...

    def add_full_copy(self, name: str) -> None:
        """A trainable copy of the whole base under `name`: the generator of a full fine-tune (student.lora: null)."""
        ...

    def named_trainable_parameters(self, name: str) -> list[tuple[str, torch.nn.Parameter]]:
        """An adapter's parameters by names stable across processes: checkpoints, resume, and the weights the
        Ray learner publishes to rollout actors."""
        ...

    def trainable_parameters(self, name: str) -> list[torch.nn.Parameter]:
        """An adapter's parameters: what its optimizer steps."""
        ...

    def sample_conditioned(
        self, cond: Conditioning, steps: int, cfg: float, seed: int | Sequence[int], shift: float = 1.0,
        adapter: str | None = None, scale: float = 1.0, mode: str = "ode", progress: bool = False,
    ) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] from encoded prompts: the student's sample grids (a Ray learner has no
        encoders), `sample` and `eval`."""
        ...

    def sample(
        self, prompts: Sequence[str], steps: int, cfg: float, seed: int | Sequence[int], shift: float = 1.0,
        adapter: str | None = None, scale: float = 1.0, mode: str = "ode", progress: bool = False,
    ) -> torch.Tensor:
        """`sample_conditioned` of `encode(prompts)`: the teacher's images (`sample --teacher`)."""
        ...


# what `build_backbone` checks a built backbone for: the two protocols' members
BACKBONE_MEMBERS = tuple(sorted({name for protocol in (Backbone, TrainableBackbone)
                                 for name in (*vars(protocol), *protocol.__annotations__) if not name.startswith("_")}))


def missing_backbone_members(backbone: object) -> list[str]:
    """The members of `TrainableBackbone` that `backbone` lacks (looked up on its class, or on the object for a
    data member): what a factory's result is checked for before any trainer uses it."""
    return [name for name in BACKBONE_MEMBERS if not hasattr(type(backbone), name) and not hasattr(backbone, name)]


def checkpoint_with_adapters(block: torch.nn.Module, *args):
    """Activation checkpointing of one block that recomputes it with the LoRA state of its forward pass.
    The backward pass runs after other calls have switched the active adapter (the critic's scores follow
    the generator's prediction) and after `_lora_scaled` has put the LoRA scale back; plain checkpointing would
    recompute the block with those, and give wrong gradients."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in block.modules() if isinstance(m, BaseTunerLayer)]
    forward_state = _lora_state(layers)

    def run(*inputs):
        current = _lora_state(layers)
        _set_lora_state(layers, forward_state)
        try:
            return block(*inputs)
        finally:
            _set_lora_state(layers, current)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


def _lora_state(layers: list) -> list[tuple]:
    return [(layer._active_adapter, layer._disable_adapters, dict(getattr(layer, "scaling", {}))) for layer in layers]


def _set_lora_state(layers: list, state: list[tuple]) -> None:
    """Active adapters, on/off and scalings as recorded (not `set_adapter` or `enable_adapters`, which would
    also freeze adapters)."""
    for layer, (active, disabled, scaling) in zip(layers, state):
        layer._active_adapter = active
        layer._disable_adapters = disabled
        if scaling:
            layer.scaling.update(scaling)


@contextlib.contextmanager
def _lora_scaled(layers: list, scale: float):
    """The active adapters' LoRA scaling times `scale` for one call, then exactly as before. diffusers' SD3
    does the same inside its forward for `joint_attention_kwargs={"scale": s}`; done here, any transformer
    gets it, and a custom one cannot take the argument and ignore it (the critic's fake and real scores would
    silently be its adapter at scale 1)."""
    if scale == 1.0:
        yield
        return
    before = [dict(layer.scaling) for layer in layers]
    for layer in layers:
        for adapter in layer.active_adapters:
            if adapter in layer.scaling:
                layer.scaling[adapter] *= scale
    try:
        yield
    finally:
        for layer, scaling in zip(layers, before):
            layer.scaling.update(scaling)


@contextlib.contextmanager
def _adapters_off(layers: list):
    """The LoRA layers run their base layer alone: the base's exact output (an adapter at scale 0 adds
    exact zeros) without the adapters' matmuls, input casts and saved activations."""
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, disabled in zip(layers, before):
            layer._disable_adapters = disabled


# recompilations allowed per block's code when a run compiles (torch's default, 8, is for one model called one
# way): a DMDR step calls each block with grad on and off, with the generator's adapter, the critic's at two
# scales or none, at the batch and the CFG batch, and SD3's last block differs from the others (11 graphs on
# the toy world by its second step, 14 with the final sample grid; 8 and 10 on the tiny SD3 with gradient
# checkpointing and on the tiny Flux), each compiled once
RECOMPILE_LIMIT = 64


def repeated_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks regional compilation compiles: the classes a diffusers model names in `_repeated_blocks`
    (Flux), else the members of the model's own ModuleLists (SD3's `transformer_blocks`, a custom DiT's)."""
    names = getattr(transformer, "_repeated_blocks", None)
    if names:
        return [m for m in transformer.modules() if type(m).__name__ in names]
    return [block for child in transformer.children() if isinstance(child, torch.nn.ModuleList) for block in child]


def _compile(transformer: torch.nn.Module, options: Mapping[str, Any]) -> None:
    blocks = repeated_blocks(transformer)
    if not blocks:
        from .config import ConfigError

        raise ConfigError(f"model.compile: {type(transformer).__name__} has no repeated blocks to compile (neither diffusers' "
                          "`_repeated_blocks` nor a torch.nn.ModuleList of blocks); set model.compile=false")
    for block in blocks:
        block.compile(**options)


class _BaseDtypeLinear(torch.nn.Linear):
    """A LoRA factor that computes in its input's precision, its weights kept in float32 for the optimizer
    (what torch.autocast does to a linear layer). Left to peft, a bf16 base's activations are cast to
    float32 at every adapted layer, and those float32 copies are what the backward pass keeps (measured
    on SD3-Medium's block: 73 MiB saved per block at 512 px against 52 MiB in bf16), besides running
    the adapters' matmuls in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)


def _compute_in_base_precision(layers: list, adapter: str) -> None:
    """Make `adapter`'s LoRA factors compute in the precision of the activations that reach them (the
    base's), keeping their float32 parameters (the same objects: optimizers and checkpoints see no
    change). peft's cast of the input to the adapters' dtype is switched off only in a layer whose
    factors all compute this way (it is one switch per layer, not per adapter)."""
    for layer in layers:
        factors = [d[adapter] for d in (layer.lora_A, layer.lora_B) if adapter in d]
        for factor in factors:
            if type(factor) is torch.nn.Linear:
                factor.__class__ = _BaseDtypeLinear
        every = [f for d in (layer.lora_A, layer.lora_B) for f in d.values()]
        layer.cast_input_dtype_enabled = not all(type(f) is _BaseDtypeLinear for f in every)


class TransformerBackbone:
    """A diffusers transformer (called as `call_transformer` says), a prompt encoder, and named LoRA adapters on
    the transformer."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        encoder: Callable[[Sequence[str]], Conditioning] | None,
        decoder: Callable[[torch.Tensor], torch.Tensor],
    ):
        self.transformer = transformer.requires_grad_(False)
        self._encoder = encoder
        self._decoder = decoder
        self._null: Conditioning | None = None
        self._lora_params: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
        self._lora_layers: list[torch.nn.Module] = []  # peft's layers in the base: switched off for base calls
        self._copies: dict[str, torch.nn.Module] = {}
        self._active: str | None = None
        self._compile_options: dict[str, Any] | None = None  # torch.compile's options once compile_blocks ran

    # -- placement ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the networks run; the step functions keep their tensors here."""
        return next(self.transformer.parameters()).device

    def to(self, device: torch.device | str) -> "TransformerBackbone":
        """Move every network of the backbone (base, adapters, full copies, encoders, decoder) to `device`."""
        for module in self._modules():
            module.to(device)
        if self._null is not None:
            self._null = self._null.to(device)
        return self

    def _modules(self) -> list:
        """The networks `to` moves; a subclass adds its encoders and decoder."""
        return [self.transformer, *self._copies.values()]

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each transformer block in the backward pass instead of keeping its activations (diffusers'
        checkpointing, with the adapters' state of the forward pass: see `checkpoint_with_adapters`; a full
        copy made later inherits it). A subclass adds its decoder."""
        for module in [self.transformer, *self._copies.values()]:
            module.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_with_adapters)

    def compile_blocks(self, **options: Any) -> None:
        """torch.compile each repeated block of the transformer and of its full copies, `options` passed to
        torch.compile (model.compile=true). Regional compilation: the blocks share their compiled code, so a
        run compiles one block's variants rather than the whole model's, and the code between the blocks
        (gradient checkpointing, Flux's packing) stays as it is; adapters added later and full copies made
        later are covered. torch.compile's shapes stay automatic (no dynamic=False): after a value first changes
        it becomes an input of the compiled code, so the real score's LoRA scale, annealed at every step
        (DynaDG), and the CFG batch's size cost one recompilation each, not one per step."""
        import logging

        import torch._dynamo

        if self.device.type == "cpu":  # inductor's C++ build looks for CUDA and says so at each process's first compile
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        for module in [self.transformer, *self._copies.values()]:
            _compile(module, options)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        # a float that changes becomes an input, as the scale above needs (recent torch's default; said for older)
        if hasattr(torch._dynamo.config, "specialize_float"):
            torch._dynamo.config.specialize_float = False
        self._compile_options = dict(options)

    # -- conditioning -------------------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, int, int]:
        cfg = self.transformer.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        if self._encoder is None:
            raise RuntimeError("this backbone was built without prompt encoders (a learner's): conditioning comes "
                               "with each RolloutBatch, and the empty prompt's through set_null()")
        with torch.no_grad():
            return self._encoder(prompts)

    def set_null(self, null: Conditioning) -> None:
        """The empty prompt's conditioning [1, ...], for a backbone without encoders."""
        self._null = Conditioning(null.tokens[:1].detach(), null.pooled[:1].detach()).to(self.device)

    def null(self, batch: int) -> Conditioning:
        """The empty prompt's conditioning, encoded once and repeated."""
        if self._null is None:
            self._null = self.encode([""])
        return Conditioning(self._null.tokens.expand(batch, -1, -1), self._null.pooled.expand(batch, -1))

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return self._decoder(x0)

    # -- adapters -----------------------------------------------------------------------------
    @property
    def adapters(self) -> tuple[str, ...]:
        return (*self._copies, *self._lora_params)

    def add_lora(self, name: str, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_LORA_TARGETS) -> None:
        self._check_new(name)
        missing = missing_lora_targets([n for n, _ in self.transformer.named_modules()], targets)
        if missing:
            from .config import ConfigError

            raise ConfigError(f"{_no_such_targets(missing, self.transformer, name)}; fix student.lora.targets / "
                              "critic.lora.targets")
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
        with warnings.catch_warnings():  # several adapters on one base is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            self.transformer.add_adapter(config, adapter_name=name)
        self._lora_params[name] = [
            (n, p) for n, p in self.transformer.named_parameters() if "lora_" in n and f".{name}." in n
        ]
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._lora_layers = [m for m in self.transformer.modules() if isinstance(m, BaseTunerLayer)]
        base_dtype = next(p.dtype for n, p in self.transformer.named_parameters() if "lora_" not in n)
        if base_dtype != torch.float16:  # float16's range, without loss scaling, would flush their small gradients to 0
            _compute_in_base_precision(self._lora_layers, name)
        for _, p in self._lora_params[name]:  # trained in float32 on a bf16 base too, computed in bf16
            p.data = p.data.float()
        self._activate(name, force=True)

    def add_full_copy(self, name: str) -> None:
        """A trainable copy of the whole base under `name` (a full fine-tune); the base stays frozen.
        Added before any LoRA adapter, so the copy is the plain base."""
        self._check_new(name)
        if self._lora_params:
            raise ValueError(f"add the full copy {name!r} before any LoRA adapter (it would copy them too)")
        # trained in float32 whatever the base's precision (Adam on bf16 weights loses small updates)
        self._copies[name] = copy.deepcopy(self.transformer).float().requires_grad_(True)
        if self._compile_options is not None:  # (a deep copy of a compiled block is not compiled)
            _compile(self._copies[name], self._compile_options)

    def named_trainable_parameters(self, name: str) -> list[tuple[str, torch.nn.Parameter]]:
        """The parameters an adapter trains, with names stable across processes (for checkpoints)."""
        self._check_adapter(name)
        if name in self._copies:
            return list(self._copies[name].named_parameters())
        return list(self._lora_params[name])

    def adapter_compute_dtype(self, name: str) -> torch.dtype | None:
        """The precision adapter `name`'s weights take part in its computations, where it is lower than their
        float32: a LoRA whose factors all compute in a bf16 base's precision (`_BaseDtypeLinear` casts each
        weight to bf16 at every call), so its weights rounded to bf16 give exactly its outputs. None: all
        digits count (a float32 base, a float16 one, a full copy, whose norms compute in float32 under autocast)."""
        self._check_adapter(name)
        if name in self._copies or _base_dtype(self.transformer) != torch.bfloat16:
            return None
        factors = [d[name] for layer in self._lora_layers for d in (layer.lora_A, layer.lora_B) if name in d]
        return torch.bfloat16 if factors and all(type(f) is _BaseDtypeLinear for f in factors) else None

    def lora_config(self, name: str) -> LoraConfig:
        if name not in self._lora_params:
            raise ValueError(f"adapter {name!r} is not a LoRA adapter; LoRA adapters: {', '.join(self._lora_params) or 'none'}")
        return self.transformer.peft_config[name]

    def lora_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """A LoRA adapter's weights under peft's adapter-free names (what diffusers' LoRA files hold)."""
        from peft.utils import get_peft_model_state_dict

        self.lora_config(name)
        return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(self.transformer, adapter_name=name).items()}

    def standalone_transformer(self, name: str) -> torch.nn.Module:
        """The base transformer with adapter `name` applied, as a plain diffusers model (LoRA merged into
        a copy of the base; a full copy as it is), for export."""
        self._check_adapter(name)
        if name in self._copies:
            return self._copies[name]
        from peft.tuners.tuners_utils import BaseTunerLayer

        merged = copy.deepcopy(self.transformer)
        others = [a for a in self._lora_params if a != name]
        if others:
            merged.delete_adapters(others)
        for module in merged.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge(adapter_names=[name])
        merged.unload_lora()  # drops the (now merged) LoRA layers
        return merged

    def trainable_parameters(self, name: str) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named_trainable_parameters(name)]

    def _check_new(self, name: str) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} exists already")

    def _check_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise ValueError(f"no adapter {name!r}; adapters: {', '.join(self.adapters) or 'none'}")

    def _activate(self, name: str, force: bool = False) -> None:
        if name == self._active and not force:
            return
        self.transformer.set_adapter(name)
        # peft's set_adapter freezes every inactive adapter; keep each one trainable.
        for params in self._lora_params.values():
            for _, p in params:
                p.requires_grad_(True)
        self._active = name

    # -- prediction ---------------------------------------------------------------------------
    def call_transformer(self, module: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One call of `module` (the base with its adapters as set, or a full copy): the velocity at `x_t` [B, C, H, W]
        and `t` [B] in [0, 1], with the inputs in the module's precision. SD3's call signature; a family whose
        transformer is called otherwise (Flux packs latents into tokens) overrides this, and nothing else."""
        return transformer_velocity(module, x_t, t, cond)

    def velocity(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, *, adapter: str | None = None,
        scale: float = 1.0, cfg: float | torch.Tensor = 1.0, null: Conditioning | None = None,
    ) -> torch.Tensor:
        """v(x_t, t | c) of the base with `adapter` at LoRA `scale` (None or scale 0: the base itself, run
        with the adapters off); with cfg != 1, v_null + cfg (v_cond - v_null) from one batched call; `cfg`
        may also be one scale per sample ([B]). A full copy has no scale."""
        if adapter in self._copies:
            if scale != 1.0:
                raise ValueError(f"adapter {adapter!r} is a full copy of the model: it has no LoRA scale (got {scale})")
            forward = self._copy_forward(self._copies[adapter])
        else:
            if adapter is not None:
                self._check_adapter(adapter)
            forward = self._base_forward() if adapter is None or scale == 0.0 else self._lora_forward(adapter, scale)
        per_sample = torch.is_tensor(cfg)
        if not per_sample and cfg == 1.0:
            return forward(x_t, t, cond)
        null = null if null is not None else self.null(x_t.shape[0])
        v_null, v_cond = forward(torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([null, cond])).chunk(2)
        if per_sample:  # kept in float32 like a Python scalar, so a bf16 model sees the same scale either way
            cfg = cfg.to(device=v_cond.device, dtype=torch.float32).reshape(-1, *[1] * (v_cond.dim() - 1))
            return v_null + (cfg * (v_cond - v_null)).to(v_cond.dtype)
        return v_null + cfg * (v_cond - v_null)

    def _lora_forward(self, adapter: str, scale: float):
        self._activate(adapter)

        def forward(x_t, t, cond):
            with _lora_scaled(self._lora_layers, scale):
                return _in_module_precision(self.call_transformer, self.transformer, x_t, t, cond)

        return forward

    def _base_forward(self):
        def forward(x_t, t, cond):
            with _adapters_off(self._lora_layers):
                return _in_module_precision(self.call_transformer, self.transformer, x_t, t, cond)

        return forward

    def _copy_forward(self, module: torch.nn.Module):
        """A full copy's weights are float32 (the optimizer's). On a bf16 base it computes in bf16 like the
        adapters, under autocast (each weight cast per call, gradients reaching the float32 weights): a
        float32 forward and backward of a whole transformer would run far below the GPU's bf16 rate. A
        float16 base keeps float32 (without loss scaling small gradients would flush to 0)."""
        def forward(x_t, t, cond):
            if _base_dtype(self.transformer) != torch.bfloat16 or not torch.amp.is_autocast_available(x_t.device.type):
                return _in_module_precision(self.call_transformer, module, x_t, t, cond)  # (e.g. meta: FLOPs alike)
            with torch.autocast(x_t.device.type, dtype=torch.bfloat16):
                v = self.call_transformer(module, x_t, t.float(), cond)
            return v.to(x_t.dtype)

        return forward

    @torch.no_grad()
    def sample(
        self, prompts: Sequence[str], steps: int, cfg: float, seed: int | Sequence[int], shift: float = 1.0,
        adapter: str | None = None, scale: float = 1.0, mode: str = "ode", progress: bool = False,
    ) -> torch.Tensor:
        """Images [B, C, H, W] in [0, 1]; the same (prompts, seed) gives the same images. `seed`: one
        for the batch, or one per image (then each image is the same in any batch)."""
        return self.sample_conditioned(self.encode(prompts), steps, cfg, seed, shift, adapter, scale, mode, progress)

    @torch.no_grad()
    def sample_conditioned(
        self, cond: Conditioning, steps: int, cfg: float, seed: int | Sequence[int], shift: float = 1.0,
        adapter: str | None = None, scale: float = 1.0, mode: str = "ode", progress: bool = False,
    ) -> torch.Tensor:
        """`sample` from encoded prompts (what a learner without encoders can do)."""
        cond = cond.to(self.device)
        null = self.null(len(cond)) if cfg != 1.0 else None
        generator = generators(seed)
        noise = randn((len(cond), *self.sample_shape), generator, self.device)
        trajectory = sample(
            lambda x, t: self.velocity(x, t, cond, adapter=adapter, scale=scale, cfg=cfg, null=null),
            noise, steps, shift, mode=mode, generator=generator, progress=progress,
        )
        return self.decode(trajectory.x0)
