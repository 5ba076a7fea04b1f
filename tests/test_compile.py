"""model.compile: the transformer's repeated blocks under torch.compile train exactly as the eager model does
(toy, SD3 with gradient checkpointing, Flux, a full fine-tune), and stop compiling once each block variant has
compiled, although the real score's LoRA scale changes at every step (DynaDG). The equivalence tests use
torch's `aot_eager` backend (dynamo's capture and AOTAutograd's forward and backward graphs, without
inductor's code generation, which takes about a minute on two CPU cores); one slow test runs inductor."""

import json

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from conftest import backbone_overrides, tiny_run
from dmdr_rl import dmdr
from dmdr_rl.backbone import TransformerBackbone, repeated_blocks
from dmdr_rl.config import ConfigError, load_config
from dmdr_rl.registry import build_backbone
from dmdr_rl.trainer import LocalTrainer

RUN = tiny_run("trainer.max_steps=3", "student.steps=2", "trainer.lr_generator=1e-3", "trainer.lr_critic=1e-3",
               "dmd.dynamic_steps=10")  # the real score's scale changes at every step


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _train(cfg, compile_options: dict | None):
    """A local run of `cfg`, its backbone's blocks compiled with `compile_options` (None: eager); its metrics and
    the generator's and critic's trained weights."""
    backbone = build_backbone(cfg.model, precision=cfg.trainer.precision)
    if compile_options is not None:
        backbone.compile_blocks(**compile_options)
    trainer = LocalTrainer(cfg, backbone=backbone)
    trainer.train()
    rows = [json.loads(line) for line in (cfg.output_dir / "metrics.jsonl").read_text().splitlines()]
    weights = {f"{a}/{n}": p.detach().clone() for a in (dmdr.GENERATOR, dmdr.CRITIC)
               for n, p in backbone.named_trainable_parameters(a)}
    return rows, weights, backbone


def _losses(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k.startswith("loss/")} for row in rows]


@pytest.mark.parametrize("case", ["toy-full-copy", "toy-grpo", "sd3-checkpointed", "flux"])  # (the toy LoRA run: below)
def test_compiled_blocks_train_as_the_eager_model_does(tmp_path, request, case):
    backbone = case.split("-")[0]
    extra = {"toy-full-copy": ["student.lora=null"], "sd3-checkpointed": ["model.gradient_checkpointing=true"],
             "toy-grpo": ["student.steps=3", "trainer.batch_size=4", "rl.group_size=2"]}.get(case, [])
    preset = "toy-dmdr-grpo" if case == "toy-grpo" else "toy-dmdr"  # (the policy gradient over SDE transitions)
    overrides = [*RUN, *backbone_overrides(request, backbone), *extra]
    eager_rows, eager_weights, _ = _train(load_config(preset, [*overrides, f"output.dir={tmp_path / 'eager'}"]), None)
    rows, weights, compiled = _train(load_config(preset, [*overrides, f"output.dir={tmp_path / 'compiled'}"]),
                                     {"backend": "aot_eager"})
    blocks = repeated_blocks(compiled.transformer)
    assert blocks and all(block._compiled_call_impl is not None for block in blocks)  # compiled, not eager
    assert counters["stats"]["unique_graphs"] > 0  # and dynamo did capture them
    if case == "toy-full-copy":  # the copy made after compiling has its own compiled blocks
        copy_blocks = repeated_blocks(compiled._copies[dmdr.GENERATOR])
        assert copy_blocks and all(block._compiled_call_impl is not None for block in copy_blocks)
    assert len(rows) == len(eager_rows) == 3
    for step, (row, eager) in enumerate(zip(_losses(rows), _losses(eager_rows))):
        assert row.keys() == eager.keys() and "loss/dmd" in row
        assert case != "toy-grpo" or step == 0 or "loss/policy" in row  # (after the cold start's step)
        for key in row:
            assert row[key] == pytest.approx(eager[key], rel=1e-5, abs=1e-8), key
    for name, value in weights.items():
        torch.testing.assert_close(value, eager_weights[name], rtol=1e-4, atol=1e-6)  # (float32 sums reordered)
    moved = [n for n, v in weights.items() if n.startswith(dmdr.GENERATOR)]
    assert moved  # (the comparison above covered the generator's weights; the run changed them)


@pytest.mark.parametrize("dynamic", [None, False])
def test_the_annealed_real_scale_does_not_recompile_the_blocks(tmp_path, monkeypatch, dynamic):
    """Each generator step calls the critic at a new real-score scale s_r(step), a float in peft's layers. With
    torch.compile's automatic shapes (what compile_blocks leaves on) it becomes an input of the compiled code once
    it has changed: after the first steps no step compiles anything. With dynamic=False it is a constant the
    blocks guard on, and every step compiles new graphs (until dynamo's limit, then eager blocks)."""
    graphs = []
    original = dmdr.generator_loss

    def spy(*args, **kwargs):
        graphs.append(counters["stats"]["unique_graphs"])
        return original(*args, **kwargs)

    monkeypatch.setattr(dmdr, "generator_loss", spy)
    cfg = load_config("toy-dmdr", [*RUN, "trainer.max_steps=6", f"output.dir={tmp_path}"])
    rows, _, _ = _train(cfg, {"backend": "aot_eager", **({} if dynamic is None else {"dynamic": dynamic})})
    monkeypatch.setattr(dmdr, "generator_loss", original)
    if dynamic is None:  # (and trains as the eager blocks do; dynamic=False is the contrast, not a setting of ours)
        eager, _, _ = _train(load_config("toy-dmdr", [*RUN, "trainer.max_steps=6", f"output.dir={tmp_path / 'eager'}"]), None)
        for row, reference in zip(_losses(rows), _losses(eager)):
            assert row == pytest.approx(reference, rel=1e-5, abs=1e-8)
    scales = [row["schedule/real_scale"] for row in rows]
    assert len(set(scales[2:])) == len(scales[2:]) == 4  # a new scale at each step from the third
    assert graphs[2] > 0
    if dynamic is None:
        assert graphs[2:] == [graphs[2]] * 4  # and no new graph for any of them
    else:
        assert all(later > earlier for earlier, later in zip(graphs[2:], graphs[3:]))


def test_model_compile_reaches_the_backbone_with_its_mode(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(TransformerBackbone, "compile_blocks", lambda self, **options: calls.append(options))
    cfg = load_config("toy-dmdr", [*RUN, "model.compile=true", "model.compile_mode=max-autotune-no-cudagraphs"])
    build_backbone(cfg.model)
    assert calls == [{"mode": "max-autotune-no-cudagraphs"}]
    build_backbone(load_config("toy-dmdr", RUN).model)
    assert len(calls) == 1  # off by default
    with pytest.raises(ConfigError, match="model.compile_mode"):
        load_config("toy-dmdr", ["model.compile_mode=reduce-overhead"])


def test_a_backbone_that_cannot_compile_is_refused_naming_the_field(monkeypatch):
    with pytest.raises(ConfigError, match=r"model.compile: Linear has no repeated blocks .* set model.compile=false"):
        TransformerBackbone(torch.nn.Linear(2, 2), None, lambda x: x).compile_blocks()
    monkeypatch.delattr(TransformerBackbone, "compile_blocks")
    with pytest.raises(ConfigError, match=r"model.compile: the backbone 'toy' \(ToyBackbone\) has no compile_blocks\(\)"):
        build_backbone(load_config("toy-dmdr", [*RUN, "model.compile=true"]).model)


@pytest.mark.slow
def test_model_compile_trains_the_toy_world_with_inductor(tmp_path, capsys, monkeypatch):
    """The config's path end to end, with torch.compile's default backend (inductor; C++ code on a CPU)."""
    import torch._inductor.config

    # compiled in this process, not a pool of compile workers: one clean clone's pytest process crashed as it
    # exited, its tests all passed, and that pool's shutdown at exit is the suspect
    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)
    overrides = [*RUN, "trainer.max_steps=2"]
    eager, _, _ = _train(load_config("toy-dmdr", [*overrides, f"output.dir={tmp_path / 'eager'}"]), None)
    cfg = load_config("toy-dmdr", [*overrides, "model.compile=true", f"output.dir={tmp_path / 'compiled'}"])
    trainer = LocalTrainer(cfg)
    assert all(block._compiled_call_impl is not None for block in repeated_blocks(trainer.backbone.transformer))
    capsys.readouterr()  # (the eager run's bar)
    trainer.train()
    bar = [text for text in capsys.readouterr().err.split("\r") if "train toy-dmdr" in text]
    assert any("the first steps compile the transformer's blocks" in text for text in bar if "0/2" in text)
    assert not any("compile" in text for text in bar if "L_dmd" in text or "2/2" in text)  # (said while they do)
    rows = [json.loads(line) for line in (tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines()]
    assert counters["stats"]["unique_graphs"] > 0 and len(rows) == len(eager) == 2
    for row, reference in zip(_losses(rows), _losses(eager)):
        assert row.keys() == reference.keys()
        for key in row:  # inductor fuses and reorders float32 arithmetic: close, not identical
            assert row[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-7), key


def test_sampling_compiles_only_when_asked(tmp_path, monkeypatch, capsys):
    """A run trained with model.compile is sampled eagerly unless `sample --compile` asks (a few images are not
    worth a compile); asked, the blocks compile and sample the same images."""
    from dmdr_rl import sample
    from dmdr_rl.trainer import load_generator

    cfg = load_config("toy-dmdr", [*RUN, "trainer.max_steps=1", "output.checkpoint_every=1", f"output.dir={tmp_path / 'run'}"])
    LocalTrainer(cfg).train()
    config = tmp_path / "run" / "config.yaml"
    config.write_text(config.read_text().replace("compile: false", "compile: true"))
    assert load_config(config, for_sampling=True).model.compile
    backbone, _, _ = load_generator(tmp_path / "run")
    assert not any(b._compiled_call_impl for b in repeated_blocks(backbone.transformer))
    compiled = []
    original = TransformerBackbone.compile_blocks
    monkeypatch.setattr(TransformerBackbone, "compile_blocks",
                        lambda self, **options: compiled.append(options) or original(self, backend="aot_eager"))
    images = {}
    for flag in ([], ["--compile"]):
        out = tmp_path / f"samples{len(flag)}"
        sample.main(["--run", str(tmp_path / "run"), "--prompt", "a red circle", "--num", "2", "--out", str(out), *flag])
        images[bool(flag)] = (out / "grid.png").read_bytes()
    assert compiled == [{"mode": "default"}] and counters["stats"]["unique_graphs"] > 0
    assert images[True] == images[False]
    assert "compiling the transformer's blocks" in capsys.readouterr().err  # (said: its first batch takes longer)
