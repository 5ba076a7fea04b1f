"""Take a trained student back into diffusers: `python -m dmdr_rl.export --run DIR --format FORMAT --out DIR`.

    python -m dmdr_rl.export --run runs/my-sd3-run --format lora --out exports/my-student-lora
    python -m dmdr_rl.export --run runs/my-sd3-run --format transformer --out exports/my-student-transformer

`lora` writes the generator's LoRA as a diffusers LoRA file (`pipe.load_lora_weights(out)`; LoRA
students only). `transformer` writes the whole student transformer (a LoRA merged into the base, or
the fully fine-tuned copy) as a diffusers `SD3Transformer2DModel` directory. Both write
`student.json` with the sampling settings the student was trained for: its K steps are the shifted
schedule `sigmas` below, which a diffusers `FlowMatchEulerDiscreteScheduler` with `shift` reproduces.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

from . import dmdr
from .config import ConfigError, load_config
from .flow import sampling_timesteps
from .learning import load_adapter_state
from .registry import build_backbone
from .trainer import find_run

FORMATS = ("lora", "transformer")


def export_student(run: Path, fmt: str, out: Path) -> dict:
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is unknown; allowed: {', '.join(FORMATS)}")
    run_dir, checkpoint = find_run(run)
    cfg = load_config(run_dir / "config.yaml")
    if fmt == "lora" and cfg.student.lora is None:
        raise ConfigError("this student is a full fine-tune (student.lora: null): export it with --format transformer")
    backbone = build_backbone(cfg.model, encoders=False, precision=cfg.trainer.precision)
    dmdr.add_generator(backbone, cfg.student)
    load_adapter_state(backbone, dmdr.GENERATOR, load_file(str(checkpoint / f"{dmdr.GENERATOR}.safetensors")))
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "lora":
        from diffusers.loaders import SD3LoraLoaderMixin

        config = backbone.lora_config(dmdr.GENERATOR)
        metadata = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}
        SD3LoraLoaderMixin.save_lora_weights(out, transformer_lora_layers=backbone.lora_state_dict(dmdr.GENERATOR),
                                             transformer_lora_adapter_metadata=metadata)
    else:
        backbone.standalone_transformer(dmdr.GENERATOR).save_pretrained(out)
    steps, shift = cfg.student.steps, cfg.student.shift
    settings = {
        "format": fmt, "base_model": cfg.model.path, "backbone": cfg.model.backbone, "checkpoint": str(checkpoint),
        "num_inference_steps": steps, "guidance_scale": 1.0, "scheduler_shift": shift, "sampler": cfg.student.sampler,
        "sigmas": [round(float(t), 6) for t in sampling_timesteps(steps, 1.0)],  # unshifted; the scheduler shifts
        "shifted_timesteps": [round(float(t), 6) for t in sampling_timesteps(steps, shift)],
    }
    (out / "student.json").write_text(json.dumps(settings, indent=2) + "\n")
    return settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dmdr_rl.export", description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a run directory, its checkpoints/ or a step_N/")
    parser.add_argument("--format", default="lora", choices=FORMATS)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        settings = export_student(args.run, args.format, args.out)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    load = ("pipe.load_lora_weights(out)" if args.format == "lora" else
            "pipe.transformer = SD3Transformer2DModel.from_pretrained(out)")
    print(f"exported the student ({args.format}) to {args.out.resolve()}\n"
          f"use it with diffusers:\n"
          f"  pipe = StableDiffusion3Pipeline.from_pretrained({settings['base_model'] or '<base model>'!r}); {load}\n"
          f"  pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, "
          f"shift={settings['scheduler_shift']})\n"
          f"  pipe(prompt, sigmas={settings['sigmas']}, guidance_scale=1.0)")


if __name__ == "__main__":
    main(sys.argv[1:])
