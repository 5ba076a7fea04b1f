"""FLUX.1 through diffusers on a tiny random-weight pipeline built from configs (no network). Its DMDR and
GRPO steps run through the toy world's functions in tests/test_sd3.py (parametrized by backbone); here:
what is Flux's own (packing, the guidance embedding, CLIP + T5), and the export back into a diffusers
`FluxPipeline` that samples exactly like the trainer."""

import re
from unittest.mock import patch

import pytest
import torch

from dmdr_rl import dmdr
from dmdr_rl.conditioning import Conditioning
from dmdr_rl.config import ConfigError, load_config
from dmdr_rl.flow import sample
from dmdr_rl.flux import flux_shift, image_ids, load_flux, pack, unpack
from dmdr_rl.latent import BackboneLoadError
from dmdr_rl.trainer import LocalTrainer
from conftest import exported_pipeline, tiny_run

TINY_RUN = tiny_run("student.steps=2", "output.checkpoint_every=2", "trainer.lr_generator=1e-3", "trainer.lr_critic=1e-3")


def test_packing_and_position_ids_are_the_pipelines_and_the_velocity_is_its_transformer_call(tiny_flux):
    from diffusers import FluxPipeline

    latents = torch.randn(2, 4, 8, 12)
    packed = pack(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 4, 8, 12), rtol=0, atol=0)
    torch.testing.assert_close(unpack(packed, 8, 12), latents, rtol=0, atol=0)
    # (the pipeline's unpack takes pixel sizes and its VAE factor)
    torch.testing.assert_close(unpack(packed, 8, 12), FluxPipeline._unpack_latents(packed, 16, 24, 2), rtol=0, atol=0)
    torch.testing.assert_close(image_ids(8, 12, "cpu", torch.float32),
                               FluxPipeline._prepare_latent_image_ids(1, 4, 6, "cpu", torch.float32), rtol=0, atol=0)

    backbone = load_flux(str(tiny_flux), resolution=32, max_sequence_length=16)
    assert backbone.sample_shape == (4, 16, 16) and backbone.guidance == 3.5
    cond = backbone.encode(["a red circle", "a blue square"])
    assert cond.tokens.shape == (2, 16, 96) and cond.pooled.shape == (2, 32)  # T5's tokens, CLIP's pooled output
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([0.9, 0.3])
    with torch.no_grad():
        ours = backbone.velocity(x, t, cond)
        # as FluxPipeline calls its transformer: packed latents, its scheduler's timestep (1000 t) / 1000, guidance, ids
        direct = backbone.transformer(hidden_states=FluxPipeline._pack_latents(x, 2, 4, 16, 16), timestep=t * 1000 / 1000,
                                      guidance=torch.full([2], 3.5), pooled_projections=cond.pooled,
                                      encoder_hidden_states=cond.tokens, txt_ids=torch.zeros(16, 3),
                                      img_ids=FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32)).sample
        other_guidance = load_flux(str(tiny_flux), resolution=32, encoders=False, guidance=1.0).velocity(x, t, cond)
    torch.testing.assert_close(ours, FluxPipeline._unpack_latents(direct, 32, 32, 2), rtol=0, atol=0)
    assert (ours - other_guidance).abs().max() > 1e-4  # the guidance embedding is an input of every call


def test_a_bf16_base_sees_the_timesteps_a_bf16_flux_pipeline_gives_it(tiny_flux):
    """FluxPipeline casts its scheduler's timestep (1000 t) to the latents' bf16 and divides by 1000 there; the model
    multiplies by 1000 in bf16 again. t passed as it is would reach the model rounded otherwise."""
    backbone = load_flux(str(tiny_flux), resolution=32, encoders=False, dtype="bfloat16")
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([0.9046, 0.6123])
    cond = Conditioning(torch.randn(2, 16, 96), torch.randn(2, 32))
    model = backbone.transformer

    def direct(timestep):
        return model(hidden_states=pack(x).bfloat16(), encoder_hidden_states=cond.tokens.bfloat16(),
                     pooled_projections=cond.pooled.bfloat16(), timestep=timestep, guidance=torch.full([2], 3.5),
                     img_ids=image_ids(16, 16, "cpu", torch.bfloat16), txt_ids=torch.zeros(16, 3, dtype=torch.bfloat16)).sample

    with torch.no_grad():
        ours = backbone.velocity(x, t, cond)
        pipeline = unpack(direct((t * 1000).to(torch.bfloat16) / 1000), 16, 16).float()  # (the pipeline's timestep / 1000)
        once = unpack(direct(t), 16, 16).float()
    torch.testing.assert_close(ours, pipeline, rtol=0, atol=0)
    assert (ours - once).abs().max() > 1e-3


def test_decode_is_differentiable_and_a_model_without_guidance_embedding_refuses_the_guidance(tmp_path, tiny_flux):
    from dmdr_rl.tiny import save_tiny_flux

    backbone = load_flux(str(tiny_flux), resolution=32, max_sequence_length=16)
    latents = torch.randn(2, 4, 16, 16, requires_grad=True)
    images = backbone.decode(latents)
    vae = backbone.vae
    with torch.no_grad():  # FluxPipeline's decode: unscale, unshift, decode, [-1, 1] -> [0, 1]
        reference = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    torch.testing.assert_close(images, (reference / 2 + 0.5).clamp(0, 1), rtol=1e-5, atol=1e-5)
    images.mean().backward()
    assert latents.grad.abs().sum() > 0

    schnell = save_tiny_flux(tmp_path / "schnell", guidance_embeds=False)
    with pytest.raises(ValueError, match=r"model.kwargs.guidance=3.5: this Flux transformer has no guidance embedding"):
        load_flux(str(schnell), resolution=32, encoders=False, guidance=3.5)
    plain = load_flux(str(schnell), resolution=32, max_sequence_length=16)
    assert plain.guidance is None
    from dmdr_rl.flux import check_guidance  # a scale that is not one: refused with the config's values, as the dry run does

    for wrong, written in ((-1, "-1"), (0, "0"), ("high", '"high"'), (True, "true")):  # (as YAML writes them)
        with pytest.raises(ValueError, match=rf"model.kwargs.guidance={written}: FLUX.1-dev's embedded guidance scale, a "
                                             r"number > 0 \(null: its pipeline's default, 3.5\)"):
            check_guidance({"guidance_embeds": True}, {"guidance": wrong})
    check_guidance({"guidance_embeds": True}, {"guidance": 1.5})
    from dmdr_rl.config import load_config
    from dmdr_rl.registry import check_model

    # a published hub id whose files are not here: its known config says it all the same
    schnell_hub = load_config("flux-dev-dmdr", ["model.path=black-forest-labs/FLUX.1-schnell"]).model
    with pytest.raises(ValueError, match=r"model.kwargs.guidance=3.5: this Flux transformer has no guidance embedding"):
        check_model(schnell_hub)
    check_model(load_config("flux-dev-dmdr").model)  # FLUX.1-dev's has one
    assert plain.sample(["a red circle"], steps=2, cfg=1.0, seed=0).shape == (1, 3, 32, 32)


def test_load_and_dry_run_errors_name_the_problem(tmp_path, tiny_flux, tiny_flux_overrides, tiny_sd3, capsys):
    from diffusers import FluxTransformer2DModel

    from dmdr_rl import run
    from dmdr_rl.tiny import save_tiny_flux

    with patch.object(FluxTransformer2DModel, "from_pretrained", side_effect=AssertionError("weights were loaded")):
        with pytest.raises(ValueError, match=r"model.resolution=30 is not a multiple of 4 \(VAE factor 2 x 2x2 "
                                             r"packing 2\); use e.g. 28 or 32$"):
            load_flux(str(tiny_flux), resolution=30)  # from the config files, before any weights are read
    with pytest.raises(BackboneLoadError, match=r"cannot load the Flux model .* pass the local directory: "
                                                r"model.path=/path/to/FLUX.1-dev"):
        load_flux("no-such-org/no-such-flux-offline")
    with pytest.raises(BackboneLoadError, match=r"model.path='.*no-such-dir' is not a directory here: .* or a hub id "
                                                r"such as 'black-forest-labs/FLUX.1-dev'"):
        load_flux(str(tiny_flux / "no-such-dir"))
    dry = ["--preset", "toy-dmdr", "--dry-run", *tiny_flux_overrides]
    with pytest.raises(SystemExit):
        run.main([*dry, "model.resolution=30"])
    assert "model.resolution=30 is not a multiple of 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # LoRA targets against FluxTransformer2DModel's config (no weights read)
        run.main([*dry, "critic.lora.targets=[to_q,proj_nothing]"])
    assert "critic.lora.targets: LoRA target module(s) ['proj_nothing'] do not exist in FluxTransformer2DModel" in \
        capsys.readouterr().err
    run.main([*dry, "critic.lora.targets=[to_q,proj_mlp]"])  # (proj_mlp: Flux's single-stream blocks)
    assert "model flux" in capsys.readouterr().out
    # a guidance for a model without the embedding, and a model of another family, before any weights load
    schnell = save_tiny_flux(tmp_path / "schnell", guidance_embeds=False)
    schnell_run = [*dry[:-1], f"model.path={schnell}", "model.kwargs={max_sequence_length: 16, guidance: 3.5}"]
    with patch.object(FluxTransformer2DModel, "from_pretrained", side_effect=AssertionError("weights were loaded")):
        with pytest.raises(SystemExit):
            run.main(schnell_run)
        assert "error: model.kwargs.guidance=3.5: this Flux transformer has no guidance embedding" in capsys.readouterr().err
        with pytest.raises(ConfigError, match="model.kwargs.guidance=3.5"):  # a run checks it before it builds anything
            LocalTrainer(load_config("toy-dmdr", [*TINY_RUN, *schnell_run[3:], f"output.dir={tmp_path / 'run'}"]))
        with pytest.raises(ValueError, match="model.kwargs.guidance=3.5: this Flux transformer has no guidance"):
            load_flux(str(schnell), resolution=32, guidance=3.5)
    with pytest.raises(SystemExit):
        run.main([*dry[:-1], f"model.path={tiny_sd3}"])
    assert (f"error: model.path='{tiny_sd3}' holds an SD3Transformer2DModel, not the Flux family's "
            "FluxTransformer2DModel: set model.backbone=sd3") in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a hub id not here: FLUX.1's geometry (VAE factor 8 x packing 2)
        run.main([*dry, "model.path=no-such-org/no-such-flux-offline", "model.resolution=1000"])
    assert re.search(r"model.resolution=1000 is not a multiple of 16 .*; use e.g. 992 or 1008", capsys.readouterr().err)


def test_flux_shift_is_the_pipelines_dynamic_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for resolution in (512, 1024):
        tokens = (resolution // 16) ** 2
        assert flux_shift(resolution) == pytest.approx(float(torch.tensor(calculate_shift(tokens)).exp()), rel=1e-6)
    assert flux_shift(1024) == pytest.approx(3.158, abs=1e-3) and flux_shift(512) == pytest.approx(1.878, abs=1e-3)


def test_a_student_shift_far_from_the_flux_pipelines_at_the_resolution_is_noted_not_refused(tmp_path, tiny_flux,
                                                                                             tiny_flux_overrides):
    """flux-dev-dmdr's student.shift (3.16) is FLUX.1-dev's at 1024 px: at another resolution the dry run and the start
    of a run say which shift FLUX.1-dev samples at there, and run anyway; quiet when near (10%) and for SD3, whose
    shift does not follow the resolution; a local model by its own scheduler and VAE config files."""
    import json

    from dmdr_rl.run import _warnings, dry_run

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    flux = ["trainer.backend=local", "trainer.optimizer=adamw", f"data.prompts={prompts}"]

    def shift_notes(preset, *overrides):
        return [note for note in _warnings(load_config(preset, [*flux, *overrides])) if "student.shift" in note]

    assert shift_notes("flux-dev-dmdr") == []  # 3.16 at 1024 px
    [note] = shift_notes("flux-dev-dmdr", "model.resolution=512")
    assert note.startswith("student.shift=3.16, but FLUX.1-dev's own pipeline samples 512 px images at shift 1.88")
    assert "set student.shift=1.88 to sample as FLUX.1-dev does at model.resolution=512" in note
    plan = dry_run("flux-dev-dmdr", [*flux, "model.resolution=512"])  # a note, not a refusal
    assert "the config is valid" in plan and "  warning: student.shift=3.16, but FLUX.1-dev's" in plan
    assert shift_notes("flux-dev-dmdr", "model.resolution=512", "student.shift=1.88") == []
    assert shift_notes("flux-dev-dmdr", "model.resolution=512", "student.shift=2.0") == []  # within 10% of 1.88
    assert shift_notes("flux-dev-dmdr", "model.path=no-such-org/no-such-flux-offline", "model.resolution=512") == []
    assert shift_notes("sd3-medium-dmdr", "model.resolution=512") == []  # SD3's shift is fixed
    # the tiny model's VAE factor is 2: 32 px is 64 tokens, shift 1.60 (the preset's student.shift: 1)
    [note] = shift_notes("toy-dmdr", *tiny_flux_overrides)
    assert f"samples 32 px images at shift {flux_shift(32, vae_factor=2):.2f}" in note
    assert shift_notes("toy-dmdr", *tiny_flux_overrides, f"student.shift={flux_shift(32, vae_factor=2)}") == []
    fixed = tmp_path / "fixed-shift"  # a scheduler that does not shift by the size (FLUX.1-schnell's): nothing to say
    (fixed / "scheduler").mkdir(parents=True)
    for part in ("transformer", "vae"):
        (fixed / part).symlink_to(tiny_flux / part)
    config = json.loads((tiny_flux / "scheduler" / "scheduler_config.json").read_text())
    (fixed / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "use_dynamic_shifting": False}))
    assert shift_notes("toy-dmdr", *tiny_flux_overrides, f"model.path={fixed}") == []


@pytest.mark.parametrize("fmt", ["lora", "transformer"])
def test_the_exported_student_samples_in_a_flux_pipeline_like_the_trainer(tmp_path, tiny_flux, tiny_flux_overrides, fmt):
    from dmdr_rl.export import diffusers_recipe, export_student

    overrides = [*tiny_flux_overrides[:-2], "model.kwargs={max_sequence_length: 16, guidance: 2.5}", tiny_flux_overrides[-1]]
    cfg = load_config("toy-dmdr", [*TINY_RUN, *overrides, f"output.dir={tmp_path / 'run'}", "student.steps=4",
                                   "student.shift=3.0", "trainer.max_steps=3"])
    trainer = LocalTrainer(cfg)
    trainer.train()
    settings = export_student(tmp_path / "run", fmt, tmp_path / "export")
    assert settings["pipeline"] == "FluxPipeline" and settings["guidance_scale"] == 2.5
    recipe = diffusers_recipe(settings)
    assert "use_dynamic_shifting=False" in recipe and f"FluxPipeline.from_pretrained('{tiny_flux}')" in recipe
    assert "guidance_scale=2.5, height=32, width=32, max_sequence_length=16)" in recipe  # (T5's padding: the run's)

    prompts, noise = ["a red circle"], torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    cond = trainer.backbone.encode(prompts)
    with torch.no_grad():  # the trainer's own 4-step sample of the student, in latent space ...
        ours = sample(lambda x, t: trainer.backbone.velocity(x, t, cond, adapter=dmdr.GENERATOR), noise, 4, 3.0).x0
    # ... equals diffusers' FluxPipeline with the export loaded and the recorded settings
    pipe = exported_pipeline(tiny_flux, tmp_path / "export", fmt, settings)
    assert type(pipe).__name__ == "FluxPipeline" and not pipe.scheduler.config.use_dynamic_shifting
    theirs = pipe(prompts, sigmas=settings["sigmas"], guidance_scale=settings["guidance_scale"], height=settings["height"],
                  width=settings["width"], latents=pack(noise.clone()), output_type="latent", **settings["pipeline_options"]).images
    assert not torch.allclose(ours, noise)
    torch.testing.assert_close(unpack(theirs, 16, 16), ours, rtol=1e-4, atol=1e-4)
    # and it is the student's, not the teacher's
    with torch.no_grad():
        teacher = sample(lambda x, t: trainer.backbone.velocity(x, t, cond), noise, 4, 3.0).x0
    assert (teacher - ours).abs().max() > 1e-3


def test_gradient_checkpointing_keeps_the_generators_gradient(tiny_flux):
    from dmdr_rl.config import CriticSection, DmdSection, StudentSection

    backbone = load_flux(str(tiny_flux), resolution=32, max_sequence_length=16)
    torch.manual_seed(0)
    student = StudentSection(steps=2)
    dmdr.add_adapters(backbone, student, CriticSection())
    with torch.no_grad():
        for p in backbone.trainable_parameters(dmdr.GENERATOR) + backbone.trainable_parameters(dmdr.CRITIC):
            p.add_(0.02 * torch.randn_like(p))
    prompts = ["a red circle", "a blue square"]
    cond = backbone.encode(prompts)
    traj = dmdr.backward_simulation(backbone, cond, student, torch.Generator().manual_seed(0))

    def gradients():
        params = backbone.trainable_parameters(dmdr.GENERATOR)
        for p in params:
            p.grad = None
        loss, _ = dmdr.generator_loss(backbone, traj, cond, prompts, 0, student, CriticSection(), DmdSection(), [],
                                      False, torch.Generator().manual_seed(2))
        loss.backward()
        return [p.grad.clone() for p in params]

    plain = gradients()
    assert any(g.abs().sum() > 0 for g in plain)
    backbone.enable_gradient_checkpointing()
    assert backbone.transformer.gradient_checkpointing
    for a, b in zip(gradients(), plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_a_bf16_flux_base_trains_float32_adapters(tiny_flux):
    backbone = load_flux(str(tiny_flux), resolution=32, encoders=False, dtype="bfloat16")
    backbone.add_lora(dmdr.GENERATOR, 4, 4)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([0.9, 0.3])
    cond = Conditioning(torch.randn(2, 16, 96), torch.randn(2, 32))
    v = backbone.velocity(x, t, cond, adapter=dmdr.GENERATOR)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    v.square().mean().backward()
    grads = [p.grad for p in backbone.trainable_parameters(dmdr.GENERATOR)]
    assert all(g is not None and g.dtype == torch.float32 for g in grads) and any(g.abs().sum() > 0 for g in grads)
