"""Take a trained student back into diffusers: `python -m dmdr_rl.export --run DIR --format FORMAT --out DIR`.

    python -m dmdr_rl.export --run runs/my-sd3-run --format lora --out exports/my-student-lora
    python -m dmdr_rl.export --run runs/my-sd3-run --format transformer --out exports/my-student-transformer

`lora` writes the generator's LoRA as a diffusers LoRA file (`pipe.load_lora_weights(out)`; LoRA
students only), from the checkpoint alone: no base weights are read. `transformer` writes the whole
student transformer (a LoRA merged into the base, or the fully fine-tuned copy) as a directory of its
family's diffusers model (`SD3Transformer2DModel`, `FluxTransformer2DModel`). Both write `student.json`
with the sampling settings the student was trained for, and print how to use them with the family's
pipeline: its K steps are the shifted schedule `sigmas` below, which a diffusers
`FlowMatchEulerDiscreteScheduler` with `shift` reproduces (with `stochastic_sampling=True` for an SDE
student, DESIGN's re-noising step; Flux's with its shift by the token count switched off).

A LoRA is merged into a float32 copy of the base, and the transformer is written in `--dtype`
(default float32). Writing it in bfloat16 rounds base + LoRA to bf16, which can erase much of a small
LoRA's change; for a bf16 model prefer `--format lora`, which keeps the base as the hub has it. The
float32 merge holds the base twice in host memory: about 16 GB for SD3-Medium, 65 GB for SD3.5-Large, 95 GB
for FLUX.1-dev.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ConfigError, load_config
from .cli import fixable_errors, with_article
from .store import file_states, readable_as_umask_allows, write_json_whole

if TYPE_CHECKING:  # (the model stack loads when an export runs: --help answers at once)
    import torch

FORMATS = ("lora", "transformer")
DTYPES = ("float32", "bfloat16", "float16")


def export_student(run: Path, fmt: str, out: Path, dtype: str = "float32") -> dict:
    import torch

    from . import dmdr
    from .flow import sampling_timesteps
    from .registry import backbone_family
    from .trainer import find_run, load_generator, run_directory_of

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is unknown; allowed: {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is unknown; allowed: {', '.join(DTYPES)}")
    if fmt == "lora" and dtype != "float32":
        raise ValueError("--dtype applies to --format transformer only (a LoRA file keeps its float32 weights)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a directory")
    run_dir = run_directory_of(run)  # (None: find_run below says what `run` is not)
    if run_dir is not None and run_dir.resolve() in (out.resolve(), *out.resolve().parents):
        raise ValueError(f"--out {out} is in the run directory {run_dir}: the export's files would mix with the run's; "
                         f"give a directory outside it, e.g. --out exports/{run_dir.resolve().name}-{fmt}")
    earlier = earlier_export(out)
    if earlier is not None and earlier.get("format") != fmt:  # its files would stay beside ours
        raise ValueError(f"--out {out} holds an export of another format: choose another --out")
    others = sorted(p.name for p in out.iterdir()) if earlier is None and out.is_dir() else []
    if others:  # e.g. a folder of prompt files: the export's files would be lost among them
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise ValueError(f"--out {out} already holds other files ({shown}) and no earlier export: give a new or empty "
                         f"directory, e.g. --out {out / f'student-{fmt}'}")
    run_dir, checkpoint = find_run(run)
    cfg = load_config(run_dir / "config.yaml", for_sampling=True)
    before = file_states(out)  # (an earlier export's --out may hold the user's files too: theirs keep their modes)
    if fmt == "lora" and cfg.student.lora is None:
        raise ConfigError("this student is a full fine-tune (student.lora: null): export it with --format transformer")
    family = backbone_family(cfg.model.backbone)
    if fmt == "lora":  # the checkpoint's adapter file is all it takes: no base weights are read
        from diffusers.loaders import SD3LoraLoaderMixin

        out.mkdir(parents=True, exist_ok=True)
        layers, metadata = lora_file(checkpoint, cfg.student.lora)
        writer = family.diffusers_class("pipeline") if family is not None else SD3LoraLoaderMixin  # (the toy's is SD3's)
        writer.save_lora_weights(out, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata)
    else:  # a merge needs the base, in float32 also where the run's model.kwargs asked for another dtype
        model = cfg.model.model_copy(update={"kwargs": {k: v for k, v in cfg.model.kwargs.items() if k != "dtype"}})
        backbone, cfg, checkpoint = load_generator(run, model, "fp32", encoders=False)
        out.mkdir(parents=True, exist_ok=True)
        if not hasattr(backbone, "standalone_transformer"):
            raise ConfigError(f"model.backbone={cfg.model.backbone!r} builds {with_article(type(backbone).__name__)}, which has no "
                              "standalone_transformer(name) to export a whole transformer from: export --format lora, "
                              "or give the backbone that method (TransformerBackbone has it)")
        student, target = backbone.standalone_transformer(dmdr.GENERATOR), getattr(torch, dtype)
        if student.dtype != target:
            student = student.to(target)
        student.save_pretrained(out)
    transformer_class = family.transformer_class if family else type(student).__name__ if fmt == "transformer" else None
    steps, shift = cfg.student.steps, cfg.student.shift
    settings = {
        "format": fmt, "base_model": cfg.model.path or (family.default_model if family else None),
        "backbone": cfg.model.backbone, "checkpoint": str(checkpoint), "num_inference_steps": steps,
        "pipeline": family.pipeline_class if family else None, "transformer_class": transformer_class,
        "guidance_scale": family.pipeline_guidance(cfg.model.kwargs) if family else 1.0,
        "scheduler_shift": shift, "scheduler_settings": dict(family.scheduler_settings) if family else {},
        "sampler": cfg.student.sampler, "height": cfg.model.resolution, "width": cfg.model.resolution,
        # what the pipeline must be given as the run had it (T5's padding length is part of the conditioning)
        "pipeline_options": {k: v for k, v in cfg.model.kwargs.items() if k == "max_sequence_length"},
        "base_dtype": "bfloat16" if cfg.trainer.precision == "bf16" else "float32",  # the base the student trained on
        "stochastic_sampling": cfg.student.sampler == "sde", "dtype": dtype if fmt == "transformer" else None,
        "sigmas": [round(float(t), 6) for t in sampling_timesteps(steps, 1.0)],  # unshifted; the scheduler shifts
        "shifted_timesteps": [round(float(t), 6) for t in sampling_timesteps(steps, shift)],
    }
    write_json_whole(out / "student.json", settings)
    readable_as_umask_allows(out, leave=before)
    return settings


def earlier_export(out: Path) -> dict | None:
    """The student.json of an export already in `out`, if any."""
    try:
        return json.loads((out / "student.json").read_text())
    except (OSError, ValueError):
        return None


def lora_file(checkpoint: Path, lora) -> tuple[dict[str, torch.Tensor], dict]:
    """The generator's LoRA as diffusers' LoRA file holds it, read from a checkpoint alone (its adapter file
    holds the transformer's parameter names; peft's adapter-free names drop the adapter's), and its
    metadata. alpha / r is folded into lora_B and alpha written as r: a loader that reads the metadata and
    one that does not (a bare state dict, older diffusers, other tools: scaling 1) apply the same LoRA."""
    from safetensors.torch import load_file

    from . import dmdr
    from .backbone import DEFAULT_LORA_TARGETS

    tag, scaling = f".{dmdr.GENERATOR}.", lora.alpha / lora.rank
    state = load_file(str(Path(checkpoint) / f"{dmdr.GENERATOR}.safetensors"))
    layers = {name.replace(tag, "."): value * scaling if ".lora_B." in name else value for name, value in state.items()}
    targets = sorted(set(lora.targets or DEFAULT_LORA_TARGETS))
    return layers, {"r": lora.rank, "lora_alpha": lora.rank, "target_modules": targets}


def main(argv: list[str] | None = None) -> None:
    from .cli import command_name, command_summary

    parser = argparse.ArgumentParser(prog=command_name("dmdr_rl.export"), description=command_summary(__doc__))
    parser.add_argument("--run", type=Path, required=True, help="a run directory, its checkpoints/ or a step_N/")
    parser.add_argument("--format", default="lora", choices=FORMATS,
                        help="lora: diffusers LoRA weights (load_lora_weights); transformer: a merged model directory (default lora)")
    parser.add_argument("--out", type=Path, required=True,
                        help="the directory to write: a new or empty one, or an earlier export of this format (replaced)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="the transformer format's weights (default float32)")
    args = parser.parse_args(argv)
    earlier = (earlier_export(args.out) or {}).get("checkpoint")
    try:
        settings = export_student(args.run, args.format, args.out, args.dtype)
    except (*fixable_errors(), FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    replaced = f", replacing the export of {earlier} that was there" if earlier else ""
    print(f"exported the student ({args.format}, checkpoint {settings['checkpoint']}) to {args.out.resolve()}{replaced}")
    if settings["pipeline"] is None:  # e.g. the toy world: its own text encoder and pixel space, no diffusers pipeline
        if args.format == "lora":
            load = ("model.load_lora_adapter(out, prefix='transformer', weight_name='pytorch_lora_weights.safetensors') "
                    "on the base transformer")
        else:
            load = f"{settings['transformer_class']}.from_pretrained(out)"
        print(f"({with_article(settings['backbone'])} student, no diffusers pipeline: sample it with `python -m dmdr_rl.sample --run "
              f"{args.run} --prompt TEXT`; the files hold its {'LoRA' if args.format == 'lora' else 'transformer'} in "
              f"diffusers' format: {load})")
        return
    print(f"use it with diffusers:\n{diffusers_recipe(settings)}")


def diffusers_recipe(settings: dict) -> str:
    """How to sample the export with its family's diffusers pipeline at the student's own steps, shift, size, text
    length and precision."""
    # a LoRA on the base in the precision it trained on; a merged transformer as written (--dtype: float32 keeps a
    # small LoRA's change, which bf16 would round away), the pipeline alike
    precision = settings["base_dtype"] if settings["format"] == "lora" else settings["dtype"]
    dtype = f", dtype=torch.{precision}" if precision != "float32" else ""
    load = ("pipe.load_lora_weights(out)" if settings["format"] == "lora" else
            f"pipe.transformer = {settings['transformer_class']}.from_pretrained(out{dtype})")
    scheduler = "".join(f", {k}={v!r}" for k, v in {"shift": settings["scheduler_shift"], **settings["scheduler_settings"],
                                                  **({"stochastic_sampling": True} if settings["stochastic_sampling"] else {})}.items())
    call = "".join(f", {k}={v!r}" for k, v in {"height": settings["height"], "width": settings["width"],
                                              **settings["pipeline_options"]}.items())
    return (f"  pipe = {settings['pipeline']}.from_pretrained({settings['base_model'] or '<base model>'!r}{dtype}); {load}\n"
            f"  pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config{scheduler})\n"
            f"  pipe(prompt, sigmas={settings['sigmas']}, guidance_scale={settings['guidance_scale']}{call})")


if __name__ == "__main__":
    main(sys.argv[1:])
