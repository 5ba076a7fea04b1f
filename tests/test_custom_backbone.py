"""A user's own backbone, outside the package and named only by import path: the example of
docs/custom-backbone.md, read out of the page (so the page cannot drift from what works), trained with a
cold start and a reward step, resumed, sampled and exported."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_run
from dmdr_rl import dmdr
from dmdr_rl.backbone import TransformerBackbone
from dmdr_rl.config import ConfigError, load_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "custom-backbone.md"
TARGETS = ["to_q", "to_k", "to_v", "to_out"]


def doc_file(name: str) -> str:
    """The fenced block of the page whose first line is `# <name>`."""
    blocks = re.findall(r"^```\w*\n(# (\S+)\n.*?)^```", DOC.read_text(), re.S | re.M)
    (text,) = [text for text, first in blocks if first == name]
    return text


@pytest.fixture()
def user_dir(tmp_path, monkeypatch):
    """my_dit.py and my_dit.yaml as a user would save them, in a directory on the path (not the package's)."""
    directory = tmp_path / "user"
    directory.mkdir()
    for name in ("my_dit.py", "my_dit.yaml"):
        (directory / name).write_text(doc_file(name))
    monkeypatch.syspath_prepend(str(directory))
    for module in ("my_dit", "half_backbone", "no_dtype"):  # each test imports the files it wrote
        monkeypatch.delitem(sys.modules, module, raising=False)
    return directory


def _config(user_dir: Path, out: Path, *overrides: str):
    """The page's config on a tiny run: two generator steps, the reward (toy-align) from the second."""
    return load_config(user_dir / "my_dit.yaml", tiny_run("trainer.device=cpu", "output.checkpoint_every=2",
                                                          f"output.dir={out}", *overrides))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_page_s_backbone_trains_resumes_samples_and_exports(user_dir, tmp_path, monkeypatch, capsys):
    import my_dit

    from dmdr_rl import sample
    from dmdr_rl.backbone import TrainableBackbone, transformer_velocity
    from dmdr_rl.export import export_student
    from dmdr_rl.export import main as export_main
    from dmdr_rl.samples import read_samples
    from dmdr_rl.trainer import LocalTrainer

    cfg = _config(user_dir, tmp_path / "run")
    assert cfg.model.backbone == "my_dit:build" and cfg.student.lora.targets == TARGETS
    trainer = LocalTrainer(cfg)
    backbone = trainer.backbone
    assert type(backbone) is my_dit.MyBackbone and isinstance(backbone, TrainableBackbone)
    assert backbone.transformer.config.width == 64  # model.kwargs reached the factory
    # each call's LoRA scale reaches the adapters (the critic's fake and real scores are one LoRA at two scales)
    other = my_dit.build()
    other.add_lora(dmdr.CRITIC, 4, 4, TARGETS)
    x, t, cond = torch.randn(2, *other.sample_shape), torch.tensor([0.3, 0.8]), other.encode(["a red circle"] * 2)
    with torch.no_grad():
        for p in other.trainable_parameters(dmdr.CRITIC):
            p.add_(0.05 * torch.randn_like(p))
        base, at_1, at_2 = (other.velocity(x, t, cond, adapter=dmdr.CRITIC, scale=s) for s in (0.0, 1.0, 2.0))
    assert torch.equal(base, other.velocity(x, t, cond)) and not torch.allclose(at_1, at_2, atol=1e-3)

    frozen = {n: p.clone() for n, p in backbone.transformer.named_parameters() if "lora_" not in n}
    before = {n: p.detach().clone() for n, p in backbone.named_trainable_parameters(dmdr.GENERATOR)}
    trainer.train()
    rows = _metrics(tmp_path / "run")
    assert [row["step"] for row in rows] == [1, 2]
    assert "loss/reward/toy-align" not in rows[0] and "loss/reward/toy-align" in rows[1]  # cold start, then the reward
    for row in rows:
        losses = {k: v for k, v in row.items() if k.startswith("loss/")}
        assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    after = dict(backbone.named_trainable_parameters(dmdr.GENERATOR))
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the generator trained...
    assert all(torch.equal(frozen[n], p) for n, p in backbone.transformer.named_parameters() if n in frozen)  # ...not the base

    # resumed from its checkpoint, one more step lands where three steps in one go do
    resumed = LocalTrainer(_config(user_dir, tmp_path / "run", "trainer.max_steps=3",
                                   f"trainer.resume_from={tmp_path / 'run'}"))
    assert resumed.train()["generator_steps"] == 3
    straight = LocalTrainer(_config(user_dir, tmp_path / "straight", "trainer.max_steps=3"))
    straight.train()
    for (name, p), (_, q) in zip(resumed.backbone.named_trainable_parameters(dmdr.GENERATOR),
                                 straight.backbone.named_trainable_parameters(dmdr.GENERATOR)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert [row["step"] for row in _metrics(tmp_path / "run")] == [1, 2, 3]

    # sampled from the run directory: the factory is found by the import path in its config.yaml
    out = sample.main(["--run", str(tmp_path / "run"), "--prompt", "a red circle above a blue square", "--num", "2",
                       "--out", str(tmp_path / "samples")])
    table = read_samples(out / "samples.parquet")
    assert table.num_rows == 2 and (out / "grid.png").is_file()

    # exported as a whole transformer, it is the trained generator: the page's factory loads it by model.path
    settings = export_student(tmp_path / "run", "transformer", tmp_path / "export")
    student = my_dit.build(path=str(tmp_path / "export"))
    assert settings["transformer_class"] == type(student.transformer).__name__ == "TinyDiT"  # (what loads it)
    export_main(["--run", str(tmp_path / "run"), "--format", "transformer", "--out", str(tmp_path / "export")])
    said = capsys.readouterr().out  # exported again into the same directory: the earlier export's replacement is said
    assert f", replacing the export of {settings['checkpoint']} that was there" in said
    assert "TinyDiT.from_pretrained(out)" in said
    with torch.no_grad():
        torch.testing.assert_close(student.velocity(x, t, cond),
                                   resumed.backbone.velocity(x, t, cond, adapter=dmdr.GENERATOR), rtol=1e-4, atol=1e-5)
    # a backbone class without standalone_transformer cannot give a whole transformer: said, naming the way out
    with monkeypatch.context() as patched, pytest.raises(ConfigError, match=r"no standalone_transformer\(name\).*"
                                                                             r"export --format lora"):
        patched.delattr(TransformerBackbone, "standalone_transformer")
        export_student(tmp_path / "run", "transformer", tmp_path / "export-2")
    # ... and as a diffusers LoRA file, which the base model loads as diffusers' own LoRAs
    export_student(tmp_path / "run", "lora", tmp_path / "lora")
    base = my_dit.build().transformer
    base.load_lora_adapter(str(tmp_path / "lora"), prefix="transformer", weight_name="pytorch_lora_weights.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(transformer_velocity(base, x, t, cond),
                                   resumed.backbone.velocity(x, t, cond, adapter=dmdr.GENERATOR), rtol=1e-4, atol=1e-5)


def test_a_full_fine_tune_and_gradient_checkpointing_train_the_page_s_backbone(user_dir, tmp_path):
    from dmdr_rl.trainer import LocalTrainer

    trainer = LocalTrainer(_config(user_dir, tmp_path / "run", "student.lora=null", "model.gradient_checkpointing=true"))
    assert trainer.backbone.transformer.gradient_checkpointing
    before = {n: p.detach().clone() for n, p in trainer.backbone.named_trainable_parameters(dmdr.GENERATOR)}
    base = [n for n, _ in trainer.backbone.transformer.named_parameters() if "lora_" not in n]
    assert len(before) == len(base)  # a copy of the whole transformer
    trainer.train()
    assert all(torch.isfinite(torch.tensor(v)) for row in _metrics(tmp_path / "run") for k, v in row.items()
               if k.startswith("loss/"))
    after = dict(trainer.backbone.named_trainable_parameters(dmdr.GENERATOR))
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_the_page_s_backbone_moves_whole(user_dir):
    """`to(device)` takes the text encoder along (`_modules`): on the meta device, which refuses any mix with CPU
    tensors as CUDA does, prompts encode and the student samples there."""
    import my_dit

    backbone = my_dit.build().to("meta")
    backbone.add_lora(dmdr.GENERATOR, 4, 4, TARGETS)
    cond = backbone.encode(["a red circle", "a blue square"])
    assert backbone.device == cond.tokens.device == cond.pooled.device == torch.device("meta")
    assert backbone.sample_conditioned(cond, 2, 4.0, seed=0, adapter=dmdr.GENERATOR).device == torch.device("meta")


def test_the_page_s_backbone_compiles_its_blocks(user_dir):
    """model.compile finds TinyDiT's blocks in its ModuleList; compiled, the generator predicts as before."""
    import torch._dynamo
    import my_dit

    from dmdr_rl.backbone import repeated_blocks

    backbone = my_dit.build()
    backbone.add_lora(dmdr.GENERATOR, 4, 4, TARGETS)
    for _, p in backbone.named_trainable_parameters(dmdr.GENERATOR):  # (LoRA B starts at 0: make it count)
        torch.nn.init.normal_(p, std=0.1)
    cond = backbone.encode(["a red circle", "a blue square"])
    x, t = torch.randn(2, *backbone.sample_shape), torch.rand(2)
    with torch.no_grad():
        eager = backbone.velocity(x, t, cond, adapter=dmdr.GENERATOR, scale=0.5)
    torch._dynamo.reset()
    backbone.compile_blocks(backend="aot_eager")
    blocks = repeated_blocks(backbone.transformer)
    assert blocks == list(backbone.transformer.blocks) and all(b._compiled_call_impl is not None for b in blocks)
    with torch.no_grad():
        compiled = backbone.velocity(x, t, cond, adapter=dmdr.GENERATOR, scale=0.5)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(eager, backbone.velocity(x, t, cond).detach(), atol=1e-4)  # (the adapter counts)


HALF = '''
import my_dit


class Half:
    """A backbone that forgot the adapters: what the trainers would call on it is missing."""

    def __init__(self, inner):
        self.inner = inner
        self.sample_shape = inner.sample_shape

    def __getattr__(self, name):
        if name in ("encode", "null", "velocity", "decode", "device", "to"):
            return getattr(self.inner, name)
        raise AttributeError(name)


def build(**options):
    return Half(my_dit.build(**options))
'''


def test_a_factory_that_returns_less_than_a_backbone_is_refused_naming_what_it_lacks(user_dir, tmp_path):
    from dmdr_rl import run
    from dmdr_rl.trainer import LocalTrainer

    (user_dir / "half_backbone.py").write_text(HALF)
    cfg = _config(user_dir, tmp_path / "run", "model.backbone=half_backbone:build")
    with pytest.raises(ConfigError, match=r"model.backbone='half_backbone:build' built a half_backbone.Half, which lacks "
                                          r"add_full_copy, add_lora, named_trainable_parameters, sample, "
                                          r"sample_conditioned, set_null, trainable_parameters of the TrainableBackbone"):
        LocalTrainer(cfg)
    # LoRA targets the model lacks (SD3's, the default): the error names the model's own layers
    with pytest.raises(ConfigError, match=r"LoRA target module\(s\) \['to_out.0', 'add_q_proj', .*\] of adapter 'generator' do not "
                                          r"exist in TinyDiT \(its Linear/Conv layers are named: .*to_q.*\)"):
        LocalTrainer(_config(user_dir, tmp_path / "run", "student.lora.targets=null"))
    with pytest.raises(ConfigError, match=r"backbone 'my_dit:build' cannot be built with these options .*'widht'"):
        LocalTrainer(_config(user_dir, tmp_path / "run", "model.kwargs={widht: 8}"))
    # bf16 passes the factory dtype: one without it is refused by the dry run too, not first by the run
    (user_dir / "no_dtype.py").write_text("def build(path=None, resolution=32, encoders=True, width=64):\n    raise AssertionError\n")
    with pytest.raises(ConfigError, match=r"'no_dtype:build' cannot be built with these options .*'dtype'.*"
                                          r"or set trainer.precision=fp32 \(bf16 passes dtype\)"):
        run.dry_run(str(user_dir / "my_dit.yaml"), ["model.backbone=no_dtype:build", "trainer.precision=bf16"])
    # ... and only then: another option refused under bf16 says nothing of the precision
    with pytest.raises(ConfigError) as refused:
        run.dry_run(str(user_dir / "my_dit.yaml"), ["model.kwargs={widht: 8}", "trainer.precision=bf16"])
    assert "'widht'" in str(refused.value) and str(refused.value).endswith("; fix model.kwargs")


def test_the_page_s_check_refuses_a_resolution_before_anything_is_built(user_dir, tmp_path):
    """The factory's `checked_by(check)`: the dry run and the trainers call it as they call the built-ins' checks."""
    from dmdr_rl import run
    from dmdr_rl.trainer import LocalTrainer

    refused = r"model.resolution=30: TinyDiT cuts images into 4 x 4 patches, so it must be a multiple of 4"
    with pytest.raises(ConfigError, match=refused):
        run.dry_run(str(user_dir / "my_dit.yaml"), ["model.resolution=30"])
    with pytest.raises(ConfigError, match=refused):
        LocalTrainer(_config(user_dir, tmp_path / "run", "model.resolution=30"))
    assert "the config is valid" in run.dry_run(str(user_dir / "my_dit.yaml"), ["model.resolution=32"])
    # LoRA targets the model lacks: refused by the dry run, naming the field and TinyDiT's own layer names
    with pytest.raises(ConfigError, match=r"critic.lora.targets: LoRA target module\(s\) \['nope'\] do not exist in "
                                          r"TinyDiT \(its Linear/Conv layers are named: .*to_q"):
        run.dry_run(str(user_dir / "my_dit.yaml"), ["critic.lora.targets=[to_q, nope]"])
    # a size the backbone takes but the run's reward does not score: refused too, not after the cold start
    with pytest.raises(ConfigError, match=r"rewards.0: toy-align scores the toy world's 32x32 images, and "
                                          r"model.resolution=64 makes 64x64 ones"):
        run.dry_run(str(user_dir / "my_dit.yaml"), ["model.resolution=64"])


def test_the_page_s_backbone_trains_in_grpo_mode(user_dir, tmp_path):
    from dmdr_rl.trainer import LocalTrainer

    LocalTrainer(_config(user_dir, tmp_path / "run", "rl.mode=grpo", "student.sampler=sde", "student.steps=2",
                         "rl.group_size=2")).train()
    rows = _metrics(tmp_path / "run")
    assert [row["step"] for row in rows] == [1, 2] and "loss/policy" in rows[1]
    assert all(torch.isfinite(torch.tensor(v)) for row in rows for k, v in row.items() if k.startswith("loss/"))


def test_the_page_s_backbone_trains_on_a_ray_the_run_starts(user_dir, tmp_path):
    """Its module is on this process's sys.path only (not PYTHONPATH, not the working directory, which Ray gives its
    workers): the run sends it to the Ray it starts, whose rollout worker and learner build the backbone from it."""
    ray = pytest.importorskip("ray")
    from dmdr_rl.distributed import train_distributed

    assert not ray.is_initialized()  # (the run starts its own, as `python -m dmdr_rl.run` does)
    cfg = load_config(user_dir / "my_dit.yaml", tiny_run("trainer.backend=ray", f"output.dir={tmp_path / 'run'}"))
    try:
        assert train_distributed(cfg)["generator_steps"] == 2
    finally:
        ray.shutdown()
    rows = _metrics(tmp_path / "run")
    assert [row["step"] for row in rows] == [1, 2] and "loss/reward/toy-align" in rows[1]
