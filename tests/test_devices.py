"""Placement and precision of the DMDR step: every tensor a step makes lives on the backbone's device,
and a bf16 base trains float32 adapters.

There is no GPU here, so placement is checked on PyTorch's `meta` device: it computes shapes only and,
like CUDA, refuses any operation that mixes its tensors with CPU tensors. A step that runs on `meta`
creates no tensor on the wrong device.
"""

import json

import pytest
import torch

from dmdr_rl import dmdr
from dmdr_rl.config import ConfigError, RewardSpec, load_config
from dmdr_rl.registry import build_backbone, resolve_device
from dmdr_rl.rollout import RolloutBatch
from dmdr_rl.trainer import LocalTrainer
from dmdr_rl.toy.weights import load_align
from conftest import tiny_run

PROMPTS = ["a small red circle in the center", "a blue square left of a green triangle"]
TINY_RUN = tiny_run("student.steps=2")


def test_meta_tensors_refuse_cpu_tensors_so_the_placement_test_can_fail():
    with pytest.raises(RuntimeError, match="device"):
        torch.ones(3, device="meta") + torch.ones(3)


@pytest.mark.parametrize("sampler", ["ode", "sde"])
def test_the_step_functions_keep_every_tensor_on_the_backbones_device(sampler):
    cfg = load_config("toy-dmd", ["student.steps=2", f"student.sampler={sampler}"])
    backbone = build_backbone(cfg.model)
    dmdr.add_adapters(backbone, cfg.student, cfg.critic)
    cond = backbone.encode(PROMPTS)
    backbone.null(1)
    backbone.to("meta")
    assert backbone.device == torch.device("meta") and backbone.null(2).tokens.device == torch.device("meta")
    cond = cond.to("meta")
    rng = torch.Generator().manual_seed(0)

    trajectory = dmdr.backward_simulation(backbone, cond, cfg.student, rng)
    assert {trajectory.x0.device, trajectory.x0_steps.device, trajectory.timesteps.device} == {torch.device("meta")}
    critic = dmdr.critic_loss(backbone, trajectory.x0, cond, 3, cfg.critic, cfg.dmd, rng)
    # the model itself: the in-process wrapper checks image values, which needs data (a host sync)
    align = RewardSpec(name="toy-align", weight=0.3, shaping="hinge", margin=-0.05)
    rewards = [dmdr.WeightedReward(load_align().to("meta"), align)]
    loss, metrics = dmdr.generator_loss(backbone, trajectory, cond, PROMPTS, 3, cfg.student, cfg.critic, cfg.dmd,
                                        rewards, True, rng)
    assert critic.device == loss.device == torch.device("meta")
    assert {metrics[k].device for k in ("loss/dmd", "reward/toy-align", "loss/reward/toy-align")} == {torch.device("meta")}
    assert backbone.sample_conditioned(cond, 2, 4.0, seed=0).device == torch.device("meta")


def test_rollout_batches_move_whole_and_weights_leave_as_cpu_tensors(tmp_path):
    trainer = LocalTrainer(load_config("toy-dmd", [*TINY_RUN, f"output.dir={tmp_path}"]))
    from dmdr_rl.rollout import make_rollout

    batch = make_rollout(trainer.backbone, PROMPTS, trainer.cfg.student, 0, 0, 0)
    batch.reward_scores = {"r": torch.zeros(2)}
    moved = batch.to("meta")
    # the original stays where it was made (the trainer's device: the CPU here, the GPU on a GPU machine)
    assert isinstance(moved, RolloutBatch) and moved.prompts == batch.prompts and batch.x0.device == trainer.backbone.device
    tensors = [moved.x0, moved.x0_steps, moved.timesteps, moved.cond.tokens, moved.cond.pooled, moved.reward_scores["r"]]
    assert {t.device.type for t in tensors} == {"meta"}
    trainer.backbone.to("meta")
    assert {t.device.type for t in trainer.learner.adapter_state(dmdr.GENERATOR).values()} == {"cpu"}


@pytest.mark.parametrize("backbone", ["toy", "sd3"])
def test_a_bf16_base_trains_float32_adapters_close_to_the_fp32_run(tmp_path, tiny_sd3_overrides, backbone):
    extra = tiny_sd3_overrides if backbone == "sd3" else []
    runs = {}
    for precision in ("fp32", "bf16"):
        # CFG at every tau: with the preset's guidance interval, a sample drawn above it has a real and a fake
        # score that agree before any training, and its DMD term is bf16 rounding alone.
        cfg = load_config("toy-dmdr", [*TINY_RUN, *extra, f"trainer.precision={precision}", "dmd.cfg_max_tau=1.0",
                                       f"output.dir={tmp_path / precision}"])
        trainer = LocalTrainer(cfg)
        before = [p.detach().clone() for p in trainer.backbone.trainable_parameters(dmdr.GENERATOR)]
        runs[precision] = trainer.train_iteration()  # ratio 1: a critic and a generator update
        after = trainer.backbone.trainable_parameters(dmdr.GENERATOR)
        assert any(not torch.equal(b, a) for b, a in zip(before, after))
        base = {p.dtype for n, p in trainer.backbone.transformer.named_parameters() if "lora_" not in n}
        assert base == {torch.float32 if precision == "fp32" else torch.bfloat16}
        assert {p.dtype for a in (dmdr.GENERATOR, dmdr.CRITIC) for p in trainer.backbone.trainable_parameters(a)} == {torch.float32}
    # bf16 keeps ~3 significant digits; the DMD loss is a normalised difference of two close scores, so
    # its relative error is the larger one.
    assert runs["bf16"]["loss/critic"] == pytest.approx(runs["fp32"]["loss/critic"], rel=0.03)
    assert runs["bf16"]["loss/dmd"] == pytest.approx(runs["fp32"]["loss/dmd"], rel=0.15)


def test_devices_are_chosen_by_config_with_clear_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="trainer.device=cuda but torch sees no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="trainer.device"):
        load_config("toy-dmd", ["trainer.device=gpu"])
    with pytest.raises(ConfigError, match="applies to trainer.backend=local only"):
        load_config("toy-dmd", ["trainer.backend=ray", "trainer.device=cpu"])


def test_the_gpu_step_benchmark_runs_the_learner_step_on_a_tiny_shape(tmp_path):
    gpu_step = _gpu_step_module()
    tiny = ["--shape", "tiny", "--device", "cpu", "--resolution", "32", "--warmup", "0", "--repeats", "1"]
    report = gpu_step.main([*tiny, "--json", str(tmp_path / "step.json")])
    assert set(report["losses"]) == {"loss/critic", "loss/dmd", "loss/reward/sharpness", "loss/generator"}
    assert all(torch.isfinite(torch.tensor(v)) for v in report["losses"].values())
    assert report["tflop_per_step"] > 0 and report["fraction_of_peak"] is None  # no peak known for a CPU
    assert "flop_count_error" not in report  # counted on the step's own device, not the meta fallback
    assert (tmp_path / "step.json").exists()
    checkpointed = gpu_step.main([*tiny, "--gradient-checkpointing"])  # its useful work, without the recomputation
    assert checkpointed["model_tflop_per_step"] > 0 and "model_fraction_of_peak" in checkpointed
    counted = gpu_step.main(["--shape", "tiny", "--resolution", "32", "--count-only"])
    # the CPU's fused attention is counted (as CUDA's is): a little more than the meta device's plain matmuls, as
    # the fused backward computes the attention scores again
    assert counted["tflop_per_step"] <= report["tflop_per_step"] <= 1.05 * counted["tflop_per_step"]
    assert counted["tflop_per_step"] == pytest.approx(counted["tflop_critic_update"] + counted["tflop_generator_update"],
                                                      rel=1e-3)
    # one image at a time, blocks recomputed in the backward pass: the same step (losses), more FLOPs
    sliced = gpu_step.main([*tiny, "--micro-batch", "1", "--gradient-checkpointing"])
    assert sliced["micro_batch"] == 1 and sliced["gradient_checkpointing"]
    assert sliced["losses"] == pytest.approx(report["losses"], rel=2e-2, abs=1e-4)  # a bf16 base: slices round apart
    assert sliced["tflop_per_step"] > report["tflop_per_step"]
    # the policy-gradient step: DMD plus the policy term over the 3 random transitions of 4 steps, no decode
    grpo = gpu_step.main([*tiny, "--rl", "grpo", "--transitions", "all"])
    assert set(grpo["losses"]) == {"loss/critic", "loss/dmd", "loss/policy", "loss/generator"} and grpo["rl"] == "grpo"
    assert grpo["skipped_updates"] == 0 and grpo["tflop_per_step"] > 0
    one, every = (gpu_step.main(["--shape", "tiny", "--resolution", "32", "--count-only", "--rl", "grpo", "--transitions", t])
                  for t in ("one", "all"))
    assert every["tflop_generator_update"] > one["tflop_generator_update"] and every["tflop_critic_update"] == one["tflop_critic_update"]
    with pytest.raises(SystemExit):
        gpu_step.main([*tiny, "--rl", "grpo", "--batch", "3"])


def test_the_gpu_step_benchmark_compiles_the_blocks_with_compile(monkeypatch):
    """--compile: the blocks compiled (aot_eager here, for time), the warm-up that compiles them timed apart, and
    the FLOPs counted on the step's device with the compiled code run eagerly (FlopCounterMode does not see
    inductor's kernels): the same count as the eager step's."""
    from dmdr_rl.backbone import TransformerBackbone

    compiled = []
    original = TransformerBackbone.compile_blocks

    def compile_blocks(self, **options):
        compiled.append(options)
        original(self, backend="aot_eager")

    monkeypatch.setattr(TransformerBackbone, "compile_blocks", compile_blocks)
    gpu_step = _gpu_step_module()
    tiny = ["--shape", "tiny", "--device", "cpu", "--resolution", "32", "--repeats", "1"]
    report = gpu_step.main([*tiny, "--compile"])
    assert compiled == [{"mode": "default"}] and report["compile"] == "default" and report["warmup_steps"] == 3
    assert report["warmup_s"] > 0 and report["flops_counted_on"] == "cpu" and "flop_count_error" not in report
    compiled_graphs = report["graphs_compiled"]
    assert compiled_graphs["warmup"] > 0 and compiled_graphs["timed_steps"] == 0 and compiled_graphs["graph_breaks"] == 0
    eager = gpu_step.main([*tiny, "--warmup", "3"])
    assert eager["compile"] is None and eager["flops_counted_on"] == "cpu"
    assert report["tflop_per_step"] == pytest.approx(eager["tflop_per_step"], rel=1e-6)  # the same step's work
    assert report["losses"].keys() == eager["losses"].keys()


def test_the_gpu_step_benchmark_runs_a_flux_shaped_step():
    """FLUX.1's tiny shape through the same learner step (the flux-dev-dmdr preset), and its FLOP count."""
    gpu_step = _gpu_step_module()
    tiny = ["--shape", "flux-tiny", "--device", "cpu", "--resolution", "32", "--warmup", "0", "--repeats", "1"]
    report = gpu_step.main(tiny)
    assert set(report["losses"]) == {"loss/critic", "loss/dmd", "loss/reward/sharpness", "loss/generator"}
    assert all(torch.isfinite(torch.tensor(v)) for v in report["losses"].values()) and report["tflop_per_step"] > 0
    counted = gpu_step.main(["--shape", "flux-tiny", "--resolution", "32", "--count-only"])
    assert counted["tflop_per_step"] <= report["tflop_per_step"] <= 1.05 * counted["tflop_per_step"]


def _gpu_step_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_step.py"
    spec = importlib.util.spec_from_file_location("gpu_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_step_benchmark_keeps_its_timings_when_counting_fails_and_halves_the_batch_on_oom(tmp_path, monkeypatch):
    gpu_step = _gpu_step_module()
    real, calls = gpu_step.FlopCounterMode, []

    def flaky_counter(*args, **kwargs):  # the timed device's count fails; the meta count still works
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a counter hook failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(gpu_step, "FlopCounterMode", flaky_counter)
    report = gpu_step.main(["--shape", "tiny", "--device", "cpu", "--resolution", "32", "--warmup", "0", "--repeats", "1",
                            "--json", str(tmp_path / "step.json")])
    assert report["flop_count_error"] == "RuntimeError: a counter hook failed" and report["flops_counted_on"] == "meta"
    assert report["tflop_per_step"] > 0 and report["step_s_median"] > 0
    assert json.loads((tmp_path / "step.json").read_text())["flops_counted_on"] == "meta"

    batches = []

    def run_out_of_memory_above_one(args, write):
        batches.append(args.batch)
        if args.batch > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return {"batch": args.batch}

    monkeypatch.setattr(gpu_step, "run", run_out_of_memory_above_one)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    report = gpu_step.main(["--batch", "4"])
    assert batches == [4, 2, 1] and report == {"batch": 1, "out_of_memory_at_batch": 4}


def test_the_memory_benchmark_counts_one_shared_base_against_two_copies():
    import copy
    import importlib.util
    from pathlib import Path

    from dmdr_rl.tiny import tiny_sd3_pipeline

    spec = importlib.util.spec_from_file_location("memory", Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py")
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    tiny = tiny_sd3_pipeline().transformer
    row = memory.measure(lambda: copy.deepcopy(tiny), 4, 4, torch.float32)
    base = row["base_weights"]
    assert base == sum(p.numel() * 4 for p in tiny.parameters())
    assert base < row["shared_base_two_loras"] < 1.5 * base  # the base once, plus two small adapters
    assert row["two_copies_one_lora_each"] > 2 * base and row["full_generator_copy_plus_critic_lora"] > 2 * base
    assert row["adamw_state_full_generator"] > row["adamw_state_loras"] > 0
