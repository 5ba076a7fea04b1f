"""SD3 through diffusers on a tiny random-weight pipeline built from configs (no network): DMDR steps
through the very functions the toy world uses, decode with gradient, the load errors, and export
back into a diffusers `StableDiffusion3Pipeline`."""

import json
import os
import re
from pathlib import Path
from collections import Counter
from unittest.mock import patch

import pytest
import torch

from dmdr_rl import algo, dmdr
from dmdr_rl.config import load_config
from dmdr_rl.flow import sample
from dmdr_rl.latent import BackboneLoadError
from dmdr_rl.sd3 import load_sd3
from dmdr_rl.trainer import LocalTrainer
from conftest import backbone_overrides, exported_pipeline, tiny_run

TINY_RUN = tiny_run("student.steps=2", "output.checkpoint_every=2", "trainer.lr_generator=1e-3", "trainer.lr_critic=1e-3")


def _spy(monkeypatch, module, name, calls):
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((name, args, result))
        return result

    monkeypatch.setattr(module, name, wrapper)


@pytest.mark.parametrize("backbone", ["toy", "sd3", "flux"])
def test_dmdr_steps_run_through_the_same_functions_for_toy_sd3_and_flux(tmp_path, request, monkeypatch, backbone):
    calls = []
    for module, name in [(dmdr, "backward_simulation"), (dmdr, "critic_loss"), (dmdr, "generator_loss"),
                         (algo, "dmd_loss"), (algo, "shape_reward")]:
        _spy(monkeypatch, module, name, calls)
    extra = backbone_overrides(request, backbone)
    cfg = load_config("toy-dmdr", [*TINY_RUN, *extra, f"output.dir={tmp_path}"])
    summary = LocalTrainer(cfg).train()
    assert summary["generator_steps"] == 2
    # Two iterations (ratio 1): rollout, critic and generator each twice; the reward once, after the cold start.
    assert Counter(name for name, _, _ in calls) == {"backward_simulation": 2, "critic_loss": 2, "generator_loss": 2,
                                                     "dmd_loss": 2, "shape_reward": 1}
    # The DMD loss is the equation of DESIGN section 2: 0.5 mean((x0 - sg(x0 - g))^2) = 0.5 mean(g^2).
    for name, (x0, x0_real, x0_fake), loss in [c for c in calls if c[0] == "dmd_loss"]:
        g = (x0_fake - x0_real) / ((x0 - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-8)
        assert loss.item() == pytest.approx(0.5 * g.pow(2).mean().item(), rel=1e-5)
        expected_shape = (2, 3, 32, 32) if backbone == "toy" else (2, 4, 16, 16)
        assert tuple(x0.shape) == expected_shape
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "loss/reward/toy-align" in rows[-1] and all(torch.isfinite(torch.tensor(r["loss/generator"])) for r in rows)


@pytest.mark.parametrize("backbone", ["toy", "sd3", "flux"])
def test_grpo_steps_run_through_the_same_functions_for_toy_sd3_and_flux(tmp_path, request, monkeypatch, backbone):
    """The policy-gradient mode on the SD3 latents: its trajectory is the rollout's, each transition's
    log-ratio compares the current generator with the rollout's, and the rollout's scores give the advantages."""
    calls = []
    for module, name in [(dmdr, "rollout_advantages"), (dmdr, "policy_loss"), (algo, "gaussian_log_ratio"),
                         (algo, "dmd_loss")]:
        _spy(monkeypatch, module, name, calls)
    extra = backbone_overrides(request, backbone)
    cfg = load_config("toy-dmdr-grpo", [*TINY_RUN, "student.steps=3", "trainer.batch_size=4", "rl.group_size=2",
                                        *extra, f"output.dir={tmp_path}"])
    trainer = LocalTrainer(cfg)
    assert trainer.train()["generator_steps"] == 2
    # the cold start's step is DMD alone; then one update with both transitions of the 3-step sampler
    assert Counter(name for name, _, _ in calls) == {"dmd_loss": 2, "rollout_advantages": 1, "policy_loss": 2,
                                                     "gaussian_log_ratio": 2}
    latent = (4, 3, 32, 32) if backbone == "toy" else (4, 4, 16, 16)
    assert tuple(trainer.last_batch.x_steps.shape) == (3, *latent)
    for _, (x_next, mean, old_mean, std), log_ratio in [c for c in calls if c[0] == "gaussian_log_ratio"]:
        assert tuple(x_next.shape) == latent and tuple(log_ratio.shape) == (4,)
        torch.testing.assert_close(log_ratio, torch.zeros(4), atol=1e-4, rtol=0)  # on-policy: sampled by these weights
    [(_, (scores, _, _), (advantages, _))] = [c for c in calls if c[0] == "rollout_advantages"]
    # per group (a score's rounding in the group mean, over a small std + 1e-4, may reach 1e-4 in float32)
    torch.testing.assert_close(advantages.view(2, 2).sum(dim=1), torch.zeros(2), atol=1e-3, rtol=0)
    assert advantages.abs().max() > 0  # (not all 0: scored)
    assert set(scores) == {"toy-align"} and tuple(scores["toy-align"].shape) == (4,)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "loss/policy" in rows[-1] and rows[-1]["rl/ratio"] == pytest.approx(1.0, abs=1e-4)
    assert all(torch.isfinite(torch.tensor(r["loss/generator"])) for r in rows)


def test_decode_is_differentiable_and_matches_diffusers_and_the_empty_prompt_is_encoded_once(tiny_sd3, monkeypatch):
    backbone = load_sd3(str(tiny_sd3), resolution=32, max_sequence_length=16)
    assert backbone.sample_shape == (4, 16, 16)
    latents = torch.randn(2, 4, 16, 16, requires_grad=True)
    images = backbone.decode(latents)
    # diffusers' own SD3 decode: unscale, unshift, decode, [-1, 1] -> [0, 1]
    vae = backbone.vae
    with torch.no_grad():
        reference = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    assert vae.config.shift_factor != 0 and images.shape == (2, 3, 32, 32)
    torch.testing.assert_close(images, (reference / 2 + 0.5).clamp(0, 1), rtol=1e-5, atol=1e-5)
    images.mean().backward()
    assert latents.grad.abs().sum() > 0
    cond = backbone.encode(["a red circle", "a blue square"])
    assert cond.tokens.shape == (2, 32, 96) and cond.pooled.shape == (2, 64)  # CLIP-L/G (16) + T5 (16) tokens, T5 wide
    encoded = []
    original = backbone.text_pipeline.encode_prompt
    monkeypatch.setattr(backbone.text_pipeline, "encode_prompt", lambda prompts, *a, **k: encoded.append(prompts) or original(prompts, *a, **k))
    first, second = backbone.null(2), backbone.null(3)
    assert encoded == [[""]]  # one encoding of the empty prompt serves every later call
    torch.testing.assert_close(second.tokens[2], original([""], None, None, do_classifier_free_guidance=False,
                                                          max_sequence_length=16)[0][0])
    assert first.tokens.shape[0] == 2 and second.pooled.shape[0] == 3


def test_a_bf16_base_sees_the_exact_timestep(tiny_sd3):
    """bf16 spacing above 512 is 4: a timestep cast before the x1000 would reach the model as 752 for t = 0.75."""
    from dmdr_rl.conditioning import Conditioning

    backbone = load_sd3(str(tiny_sd3), resolution=32, encoders=False, dtype="bfloat16")
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([0.75, 0.6])
    cond = Conditioning(torch.randn(2, 32, 96), torch.randn(2, 64))
    model = backbone.transformer
    with torch.no_grad():
        ours = backbone.velocity(x, t, cond)

        def direct(timestep):
            return model(hidden_states=x.bfloat16(), encoder_hidden_states=cond.tokens.bfloat16(),
                         pooled_projections=cond.pooled.bfloat16(), timestep=timestep).sample.float()

        exact, rounded = direct(t * 1000), direct(torch.tensor([752.0, 600.0]))
    assert ours.dtype == torch.float32 and (exact - rounded).abs().max() > 1e-3
    torch.testing.assert_close(ours, exact, rtol=0, atol=0)


def test_load_errors_name_the_problem(tiny_sd3, monkeypatch):
    from diffusers import SD3Transformer2DModel

    with pytest.raises(ValueError, match=r"model.resolution=30 is not a multiple of 4 \(VAE factor 2 x transformer patch size 2\); "
                                         r"use e.g. 28 or 32$"):
        load_sd3(str(tiny_sd3), resolution=30)
    from dmdr_rl.latent import check_resolution

    with pytest.raises(ValueError, match=r"model.resolution=8 is not a multiple of 16 .*; use e.g. 16$"):  # not "0 or 16"
        check_resolution(8, 8, 2)
    with pytest.raises(BackboneLoadError, match="pass the local directory: model.path="):
        load_sd3("no-such-org/no-such-model-offline")
    import huggingface_hub.constants

    import dmdr_rl.hub

    with monkeypatch.context() as offline:  # no retries for a minute first: the hub cache alone, at once
        offline.setattr(dmdr_rl.hub, "hub_reachable", lambda *a, **k: False)
        offline.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # (the network's doing, not the user's)
        with patch.object(SD3Transformer2DModel, "from_pretrained", side_effect=OSError("not cached")) as loading:
            with pytest.raises(BackboneLoadError, match=r"hub id\. The hub \(.*\) cannot be reached from this machine"):
                load_sd3("no-such-org/no-such-model-offline")
        assert loading.call_args.kwargs["local_files_only"] is True
    with pytest.raises(BackboneLoadError, match="diffusers layout"):
        load_sd3(str(tiny_sd3 / "vae"))
    with pytest.raises(BackboneLoadError, match=r"model.path='.*no-such-dir' is not a directory here"):
        load_sd3(str(tiny_sd3 / "no-such-dir"))
    # the resolution is refused from the config files, before any weights are read
    with patch.object(SD3Transformer2DModel, "from_pretrained", side_effect=AssertionError("weights were loaded")):
        with pytest.raises(ValueError, match=r"model.resolution=30 is not a multiple of 4"):
            load_sd3(str(tiny_sd3), resolution=30)
    backbone = load_sd3(str(tiny_sd3), resolution=32, encoders=False)
    with pytest.raises(ValueError, match=r"\['to_nothing'\] of adapter 'generator' do not exist .* student.lora.targets"):
        backbone.add_lora("generator", 4, 4, targets=("to_q", "to_nothing"))
    with pytest.raises(ValueError, match=r"\['q_proj'\] of adapter 'generator' do not exist"):  # only add_q_proj has it
        backbone.add_lora("generator", 4, 4, targets=("to_q", "q_proj"))
    with pytest.raises(RuntimeError, match="without prompt encoders"):
        backbone.encode(["a red circle"])


@pytest.mark.parametrize("fmt", ["lora", "transformer"])
def test_the_exported_student_samples_in_a_diffusers_pipeline_like_the_trainer(tmp_path, tiny_sd3, tiny_sd3_overrides, fmt,
                                                                                 monkeypatch):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from dmdr_rl.export import export_student

    cfg = load_config("toy-dmdr", [*TINY_RUN, *tiny_sd3_overrides, f"output.dir={tmp_path / 'run'}",
                                   "student.steps=4", "student.shift=3.0", "trainer.max_steps=3"])
    trainer = LocalTrainer(cfg)
    trainer.train()
    if fmt == "lora":  # from the checkpoint's adapter file alone: no base model is loaded (16 GB for SD3.5-Large)
        import dmdr_rl.trainer

        monkeypatch.setattr(dmdr_rl.trainer, "load_generator", lambda *a, **k: pytest.fail("loaded the model"))
    (tmp_path / "export").mkdir()  # an earlier export with someone's file beside it: the file is left as it is
    (tmp_path / "export" / "student.json").write_text(json.dumps({"format": fmt}))
    private = tmp_path / "export" / "notes.txt"
    private.write_text("mine")
    private.chmod(0o600)
    old_mask = os.umask(0o027)
    try:
        settings = export_student(tmp_path / "run", fmt, tmp_path / "export")
    finally:
        os.umask(old_mask)
    written = [f for f in (tmp_path / "export").iterdir() if f != private]
    assert {f.stat().st_mode & 0o777 for f in written} == {0o640} and private.stat().st_mode & 0o777 == 0o600
    assert settings["num_inference_steps"] == 4 and settings["sigmas"] == [1.0, 0.75, 0.5, 0.25]
    if fmt == "lora":  # the file holds peft's adapter-free names and values of the trained adapter, alpha / r folded in
        from safetensors.torch import load_file

        written = load_file(str(tmp_path / "export" / "pytorch_lora_weights.safetensors"))
        scaling = cfg.student.lora.alpha / cfg.student.lora.rank
        expected = {"transformer." + k: v * scaling if "lora_B" in k else v
                    for k, v in trainer.backbone.lora_state_dict(dmdr.GENERATOR).items()}
        assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)

    # The trainer's own 4-step sample of the student, in latent space ...
    prompts, noise = ["a red circle"], torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    cond = trainer.backbone.encode(prompts)
    with torch.no_grad():
        ours = sample(lambda x, t: trainer.backbone.velocity(x, t, cond, adapter=dmdr.GENERATOR), noise, 4, 3.0).x0
    # ... equals diffusers' pipeline with the export loaded and the recorded scheduler settings.
    pipe = exported_pipeline(tiny_sd3, tmp_path / "export", fmt, settings)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    theirs = pipe(prompts, sigmas=settings["sigmas"], guidance_scale=settings["guidance_scale"], latents=noise.clone(),
                  height=settings["height"], width=settings["width"], output_type="latent", **settings["pipeline_options"]).images
    assert not torch.allclose(ours, noise)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    if fmt == "lora":  # the LoRA's alpha / r (32 / 16) is in its weights: loaded as a bare state dict, it is the same
        from safetensors.torch import load_file

        assert cfg.student.lora.alpha != cfg.student.lora.rank
        bare = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
        bare.load_lora_weights(load_file(str(tmp_path / "export" / "pytorch_lora_weights.safetensors")))
        bare.scheduler = pipe.scheduler
        again = bare(prompts, sigmas=settings["sigmas"], guidance_scale=1.0, latents=noise.clone(), height=32, width=32,
                     max_sequence_length=16, output_type="latent").images
        torch.testing.assert_close(again, ours, rtol=1e-4, atol=1e-4)
    base = pipe.transformer if fmt == "transformer" else None
    if base is not None:  # the merged weights differ from the teacher's: the student was trained
        teacher = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer")
        assert any(not torch.equal(a, b) for a, b in zip(base.state_dict().values(), teacher.state_dict().values()))


def test_a_bf16_students_merged_export_keeps_its_lora_and_an_sde_student_says_so(tmp_path, tiny_sd3, tiny_sd3_overrides):
    """A LoRA merged into bf16 weights would lose much of its (small) change: the export merges in float32."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    from dmdr_rl.conditioning import Conditioning
    from dmdr_rl.export import export_student
    from dmdr_rl.learning import load_adapter_state
    from dmdr_rl.registry import build_backbone

    cfg = load_config("toy-dmdr", [*TINY_RUN, *tiny_sd3_overrides, f"output.dir={tmp_path / 'run'}",
                                   "trainer.precision=bf16", "student.sampler=sde", "trainer.max_steps=2"])
    LocalTrainer(cfg).train()
    settings = export_student(tmp_path / "run", "transformer", tmp_path / "export")
    assert settings["stochastic_sampling"] is True and settings["dtype"] == "float32"
    # the trained student at full precision: the float32 base with its (unmerged) LoRA
    student = build_backbone(cfg.model, encoders=False, precision="fp32")
    dmdr.add_generator(student, cfg.student)
    load_adapter_state(student, dmdr.GENERATOR, load_file(str(Path(settings["checkpoint"]) / "generator.safetensors")))
    exported = SD3Transformer2DModel.from_pretrained(tmp_path / "export")
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([0.9, 0.4])
    cond = Conditioning(torch.randn(2, 32, 96), torch.randn(2, 64))
    with torch.no_grad():
        ours = student.velocity(x, t, cond, adapter=dmdr.GENERATOR)
        base = student.velocity(x, t, cond)
        theirs = exported(hidden_states=x, encoder_hidden_states=cond.tokens, pooled_projections=cond.pooled,
                          timestep=t * 1000).sample
    lora_effect = (ours - base).abs().max()
    assert lora_effect > 1e-4  # the student moved away from its base
    assert (theirs - ours).abs().max() < 0.01 * lora_effect


def test_the_dry_run_checks_the_resolution_against_the_model_config_files(tiny_sd3, tiny_sd3_overrides, capsys):
    from dmdr_rl import run

    for resolution, message in ((30, r"model.resolution=30 is not a multiple of 4"),
                                (256, r"model.resolution=256 is larger than .* \(32 patches x 4 px = 128 px\)")):
        with pytest.raises(SystemExit):
            run.main(["--preset", "toy-dmdr", "--dry-run", *tiny_sd3_overrides, f"model.resolution={resolution}"])
        assert re.search(message, capsys.readouterr().err)
    run.main(["--preset", "toy-dmd", "--dry-run", *tiny_sd3_overrides, "model.resolution=128"])  # (toy-align: 32 px)
    assert "model sd3" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # LoRA targets against the transformer's config (no weights read)
        run.main(["--preset", "toy-dmdr", "--dry-run", *tiny_sd3_overrides, "student.lora.targets=[to_q,q_proj]"])
    assert "student.lora.targets: LoRA target module(s) ['q_proj'] do not exist" in capsys.readouterr().err
    run.main(["--preset", "toy-dmdr", "--dry-run", *tiny_sd3_overrides, "student.lora.targets=[to_q,add_q_proj]"])
    assert "the config is valid" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # more T5 tokens than diffusers' pipeline takes: an export it could not sample
        run.main(["--preset", "toy-dmdr", "--dry-run", *tiny_sd3_overrides, "model.kwargs.max_sequence_length=1000"])
    assert ("model.kwargs.max_sequence_length=1000: the prompt's T5 tokens, an integer from 1 to 512 (diffusers' "
            "StableDiffusion3Pipeline takes no more") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.main(["--preset", "toy-dmdr", "--dry-run", *tiny_sd3_overrides, "model.kwargs.max_sequence_length=true"])
    assert "max_sequence_length=true: the prompt's T5 tokens, an integer" in capsys.readouterr().err  # as YAML writes it
    with pytest.raises(SystemExit):  # a quoted number is text, and said so
        run.main(["--preset", "toy-dmdr", "--dry-run", *tiny_sd3_overrides, "model.kwargs.max_sequence_length='16'"])
    assert 'max_sequence_length="16": the prompt\'s T5 tokens, an integer' in capsys.readouterr().err
    # a hub id that is not in this machine's cache: checked against the SD3 family's geometry (VAE 8 x patch 2),
    # the rest left to the load
    hub = ["--preset", "toy-dmdr", "--dry-run", *tiny_sd3_overrides, "model.path=no-such-org/no-such-model-offline"]
    with pytest.raises(SystemExit):
        run.main([*hub, "model.resolution=30"])
    assert "model.resolution=30 is not a multiple of 16 (VAE factor 8 x transformer patch size 2)" in capsys.readouterr().err
    run.main([*hub, "model.resolution=32"])
    assert "model sd3 (no-such-org/no-such-model-offline)" in capsys.readouterr().out
    # a path (not a hub id) that is not a directory here: refused by a local run's dry run as by the load; a Ray
    # run's workers may mount it where this machine does not
    gone = [*tiny_sd3_overrides, f"model.path={tiny_sd3}-gone"]
    with pytest.raises(SystemExit):
        run.main(["--preset", "toy-dmdr", "--dry-run", *gone])
    assert "-gone' is not a directory here: pass the model's directory" in capsys.readouterr().err
    run.main(["--preset", "toy-dmdr", "--dry-run", *gone, "trainer.backend=ray", "data.prompts=/on/the/workers.txt"])
    assert "the config is valid" in capsys.readouterr().out


def test_gradient_checkpointing_of_the_transformer_and_the_vae_keeps_the_reward_gradient(tiny_sd3):
    from dmdr_rl.config import CriticSection, DmdSection, RewardSpec, StudentSection

    class MeanRed:
        name, differentiable = "mean-red", True

        def score(self, images, prompts):
            return images[:, 0].mean(dim=(1, 2))

    backbone = load_sd3(str(tiny_sd3), resolution=32, max_sequence_length=16)
    torch.manual_seed(0)
    dmdr.add_adapters(backbone, StudentSection(steps=2), CriticSection())
    with torch.no_grad():
        for p in backbone.trainable_parameters(dmdr.GENERATOR) + backbone.trainable_parameters(dmdr.CRITIC):
            p.add_(0.02 * torch.randn_like(p))
    prompts = ["a red circle", "a blue square"]
    cond, student = backbone.encode(prompts), StudentSection(steps=2)
    traj = dmdr.backward_simulation(backbone, cond, student, torch.Generator().manual_seed(0))
    rewards = [dmdr.WeightedReward(MeanRed(), RewardSpec(name="mean-red", weight=1.0, shaping="linear"))]

    def gradients(reward_active=True):
        params = backbone.trainable_parameters(dmdr.GENERATOR)
        for p in params:
            p.grad = None
        loss, _ = dmdr.generator_loss(backbone, traj, cond, prompts, 0, student, CriticSection(), DmdSection(), rewards,
                                      reward_active, torch.Generator().manual_seed(2))
        loss.backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    plain, dmd_only = gradients(), gradients(reward_active=False)
    assert plain and any(g.abs().sum() > 0 for g in plain)
    # the reward's gradient (through the VAE decoder) is part of them: without it they differ
    change = max((a - b).abs().max().item() for a, b in zip(plain, dmd_only))
    assert change > 1e-2 * max(g.abs().max().item() for g in plain)  # (measured 0.15)
    backbone.enable_gradient_checkpointing()
    assert backbone.transformer.gradient_checkpointing and backbone.vae.decoder.gradient_checkpointing
    for a, b in zip(gradients(), plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_an_sd3_student_and_its_teacher_are_scored_by_a_reward_model_on_the_same_noise(tmp_path, tiny_sd3,
                                                                                        tiny_sd3_overrides):
    """`sample --score`: how a real model's student is measured against its teacher (the toy judge knows toy
    scenes only): a tiny PickScore scores both, and the teacher is the run's base sampled with guidance."""
    from dmdr_rl import sample as sample_command
    from dmdr_rl.samples import decode_png, read_samples
    from reward_servers.models.testing import save_tiny_clip

    run_dir = tmp_path / "run"
    LocalTrainer(load_config("toy-dmdr", [*TINY_RUN, *tiny_sd3_overrides, f"output.dir={run_dir}",
                                          "trainer.max_steps=2"])).train()
    clip = save_tiny_clip(tmp_path / "clip")
    reward = f"{{name: pickscore, kwargs: {{path: {clip}, processor_path: {clip}}}}}"
    common = ["--run", str(run_dir), "--prompt", "a red circle", "--prompt", "a blue square", "--num", "2",
              "--reward", reward]
    student = sample_command.main([*common, "--out", str(tmp_path / "student")])
    teacher = sample_command.main([*common, "--teacher", "--steps", "3", "--cfg", "3", "--out", str(tmp_path / "teacher")])
    rows = {name: read_samples(out / "samples.parquet").to_pandas() for name, out in
            (("student", student), ("teacher", teacher))}
    scores = {name: json.loads((out / "scores.json").read_text()) for name, out in (("student", student), ("teacher", teacher))}
    assert scores["teacher"]["steps"] == 3 and scores["teacher"]["cfg"] == 3.0 and scores["student"]["steps"] == 2
    assert scores["student"]["model_kwargs"] == {"max_sequence_length": 16}  # (the backbone's own settings)
    for name in rows:
        assert torch.isfinite(torch.tensor(rows[name]["reward/pickscore"].to_numpy())).all()
        assert scores[name]["rewards"]["pickscore"]["mean"] == pytest.approx(rows[name]["reward/pickscore"].mean(), rel=1e-5)
    assert list(rows["teacher"]["seed"]) == list(rows["student"]["seed"])
    base = load_sd3(str(tiny_sd3), resolution=32, max_sequence_length=16)
    expected = base.sample(list(rows["teacher"]["prompt"]), steps=3, cfg=3.0, seed=[int(s) for s in rows["teacher"]["seed"]],
                           shift=load_config(run_dir / "config.yaml", for_sampling=True).student.shift)
    got = torch.stack([decode_png(png) for png in rows["teacher"]["png"]])
    torch.testing.assert_close(got, (expected.clamp(0, 1) * 255).round() / 255, rtol=0, atol=1.5 / 255)


def test_the_pages_commands_for_trying_sd3_without_the_weights_run_as_written(tmp_path, monkeypatch, capsys):
    """docs/sd3.md's "Trying it without the weights" block, each command in this process (/tmp/ as tmp_path)."""
    import importlib
    import shlex
    import subprocess

    page = (Path(__file__).resolve().parents[1] / "docs" / "sd3.md").read_text()
    section = page.split("## Trying it without the weights\n", 1)[1]
    block = re.search(r"^```bash\n(.*?)^```", section, re.S | re.M).group(1)
    commands = block.replace("\\\n", " ").replace("/tmp/", f"{tmp_path}/").splitlines()
    monkeypatch.chdir(tmp_path)
    for command in commands:
        argv = shlex.split(command)
        if argv[0] != ".venv/bin/python":
            subprocess.run(["bash", "-c", command], check=True)
        elif argv[1] == "-c":
            exec(argv[2], {})
        else:
            assert argv[1] == "-m", command
            importlib.import_module(argv[2]).main(argv[3:])
    out = capsys.readouterr().out
    assert "dry run of 'toy-dmdr': the config is valid" in out and "rewards: clip-score (local, weight 0.3)" in out
    last = json.loads((tmp_path / "tiny-sd3-run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and "loss/reward/clip-score" in last  # the reward trained the second step
    assert "clip-score" in json.loads((tmp_path / "tiny-sd3-samples" / "scores.json").read_text())["rewards"]
    assert (tmp_path / "tiny-sd3-lora" / "pytorch_lora_weights.safetensors").exists()
