"""The local trainer on a tiny random toy backbone: update ratio, cold start, outputs, exact resume."""

import json
import os
import time

import pytest
import torch
from PIL import Image

from conftest import tiny_run
from dmdr_rl import dmdr
from dmdr_rl.config import ConfigError, RewardSpec, load_config
from dmdr_rl.toy.teacher import ToyBackbone, create_teacher_transformer
from dmdr_rl.toy.text import ToyTextEncoder
from dmdr_rl.trainer import LocalTrainer, find_run


class CountingReward:
    name, differentiable = "mean-red", True

    def __init__(self):
        self.calls = 0

    def score(self, images, prompts):
        self.calls += 1
        return images[:, 0].mean(dim=(1, 2))


def _trainer(tmp_path, reward=None, **overrides):
    settings = {"trainer.batch_size": 2, "trainer.max_steps": 4, "trainer.cold_start": 2, "dmd.ratio": 3,
                "student.steps": 2, "output.log_every": 1, "output.sample_every": 100, "output.checkpoint_every": 2,
                "output.dir": str(tmp_path), "trainer.lr_generator": 1e-3, "trainer.lr_critic": 1e-3, **overrides}
    cfg = load_config("toy-dmdr", [f"{k}={v}" for k, v in settings.items()])
    torch.manual_seed(0)
    backbone = ToyBackbone(create_teacher_transformer(seed=0), ToyTextEncoder.create(seed=0))
    reward = reward or CountingReward()
    return LocalTrainer(cfg, backbone, [dmdr.WeightedReward(reward, RewardSpec(name="mean-red", shaping="linear"))]), reward


def _snapshot(trainer, adapter):
    return [p.detach().clone() for p in trainer.backbone.trainable_parameters(adapter)]


def _changed(before, after):
    return any(not torch.equal(a, b) for a, b in zip(before, after))


def test_generator_moves_once_per_ratio_iterations_and_reward_waits_for_cold_start(tmp_path):
    trainer, reward = _trainer(tmp_path)
    generator_moved, reward_calls = [], []
    for _ in range(12):
        before = _snapshot(trainer, dmdr.GENERATOR)
        critic_before = _snapshot(trainer, dmdr.CRITIC)
        trainer.train_iteration()
        generator_moved.append(_changed(before, _snapshot(trainer, dmdr.GENERATOR)))
        assert _changed(critic_before, _snapshot(trainer, dmdr.CRITIC))  # every iteration
        reward_calls.append(reward.calls)
    assert generator_moved == [False, False, True] * 4
    assert trainer.generator_step == 4
    # Generator steps 0 and 1 are the cold start; the reward is scored from generator step 2 on.
    assert reward_calls == [0] * 6 + [0, 0, 1, 1, 1, 2]


def test_an_ignored_ctrl_c_stays_ignored_while_training_and_a_second_one_stops_at_once(tmp_path):
    """A run started with SIGINT ignored (nohup, a background job) keeps it so: no stop is asked for. Else the
    first Ctrl-C asks for a stop, and a second one stops at once."""
    import signal

    from dmdr_rl.trainer import StopAtStepEnd

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopAtStepEnd() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert not stop.requested
        with_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
        asked = []
        with StopAtStepEnd(on_request=lambda: asked.append(True)) as stop:
            assert signal.getsignal(signal.SIGINT) == stop._request
            stop._request(signal.SIGINT, None)  # the first Ctrl-C asks (and tells the Ray runtime's coordinator)
            assert stop.requested and asked == [True]
            with pytest.raises(KeyboardInterrupt):  # the second stops at once
                stop._request(signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back
    finally:
        signal.signal(signal.SIGINT, previous)
    assert with_handler is signal.SIG_IGN


def test_a_stop_that_arrives_inside_an_import_stops_the_run_with_one_line(monkeypatch, capsys):
    """SIGTERM (`ray job stop`) or Ctrl-C while a library's class body runs reaches the run as a RuntimeError
    ("Error calling __set_name__ ...") whose cause is the KeyboardInterrupt: a stop, not a crash."""
    from dmdr_rl import run

    def interrupted_import(*_, **__):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as err:
            raise RuntimeError("Error calling __set_name__ on 'Field' instance 'rho' in 'EvaConfig'") from err

    monkeypatch.setattr(run, "train", interrupted_import)
    with pytest.raises(SystemExit) as stopped:
        run.main(["--preset", "toy-dmdr"])
    assert stopped.value.code == 130 and "dmdr_rl: stopped" in capsys.readouterr().err
    monkeypatch.setattr(run, "train", lambda *_, **__: (_ for _ in ()).throw(RuntimeError("a bug of its own")))
    with pytest.raises(RuntimeError, match="a bug of its own"):  # (not taken for a stop)
        run.main(["--preset", "toy-dmdr"])


def test_the_cause_chain_walk_follows_explicit_links_implicit_ones_when_asked_and_ends_on_a_loop():
    from dmdr_rl.errors import in_cause_chain

    def is_stop(err):
        return isinstance(err, KeyboardInterrupt)

    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("raised while handling it")  # (an implicit link: __context__)
    except RuntimeError as err:
        implicit = err
    explicit = ValueError("raised from it")
    explicit.__cause__ = implicit
    assert in_cause_chain(explicit, is_stop) and in_cause_chain(implicit, is_stop)
    assert not in_cause_chain(implicit, is_stop, implicit=False) and not in_cause_chain(explicit, is_stop, implicit=False)
    looped_a, looped_b = ValueError("a"), ValueError("b")
    looped_a.__cause__, looped_b.__cause__ = looped_b, looped_a
    assert not in_cause_chain(looped_a, is_stop) and not in_cause_chain(None, is_stop)


def test_the_progress_bar_names_losses_as_losses():
    from dmdr_rl.trainer import loss_postfix

    assert loss_postfix({"loss/dmd": 0.5, "loss/reward/toy-align": 0.25, "reward/toy-align": -1.0}) == {
        "L_dmd": "0.5", "L_toy-align": "0.25"}  # not "toy-align=0.25" beside a reward of -1


def test_train_writes_metrics_grids_and_checkpoints(tmp_path):
    trainer, _ = _trainer(tmp_path, **{"output.sample_every": 2})
    old_mask = os.umask(0o022)
    try:
        summary = trainer.train()
    finally:
        os.umask(old_mask)
    # every checkpoint file readable by the other users a umask of 022 allows (safetensors alone writes 0600)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "checkpoints" / "step_000004").iterdir()}
    assert modes == {"generator.safetensors": 0o644, "critic.safetensors": 0o644, "trainer_state.pt": 0o644}
    assert summary["generator_steps"] == 4 and summary["iterations"] == 12
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert "loss/dmd" in rows[0] and "reward/mean-red" not in rows[1] and "reward/mean-red" in rows[2]
    assert (tmp_path / "samples" / "step_000004.png").exists()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000004"
    assert (tmp_path / "config.yaml").exists()


def test_sample_grids_and_their_mean_scores_reach_tensorboard(tmp_path):
    """Each sample step's grid is a TensorBoard image and each reward's mean score over the grid a scalar,
    the same mean as the step's Parquet file holds."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dmdr_rl.samples import read_samples
    from dmdr_rl.trainer import LocalTrainer

    out = tmp_path / "run"
    LocalTrainer(load_config("toy-dmdr", tiny_run(f"output.dir={out}", "output.sample_every=1"))).train()
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    grids = events.Images("samples/grid")
    assert [g.step for g in grids] == [1, 2]
    with Image.open(out / "samples" / "step_000002.png") as png:
        assert (grids[1].width, grids[1].height) == png.size
    table = read_samples(out / "samples" / "step_000002.parquet").to_pandas()
    scores = events.Scalars("samples/reward/toy-align")
    assert [s.step for s in scores] == [1, 2]
    assert scores[1].value == pytest.approx(table["reward/toy-align"].mean(), rel=1e-6)


def test_the_student_evaluated_during_training_is_the_student_of_that_step_and_changes_no_training_draw(tmp_path):
    """val/ metrics at every output.eval_every steps and the last: the toy evaluation of the weights of that
    step (the same numbers as evaluating its checkpoint afterwards), with the losses of a run without them."""
    from dmdr_rl.evaluation import TrainingEvaluation, evaluate
    from dmdr_rl.toy.weights import load_align, load_judge

    def rows(out):
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    plain, evaluated = tmp_path / "plain", tmp_path / "evaluated"
    LocalTrainer(load_config("toy-dmdr", tiny_run(f"output.dir={plain}", "trainer.max_steps=3"))).train()
    trainer = LocalTrainer(load_config("toy-dmdr", tiny_run(f"output.dir={evaluated}", "trainer.max_steps=3",
                                                             "output.eval_every=2", "output.eval_images=8")))
    trainer.train()
    assert [{k: v for k, v in r.items() if k.startswith("loss/")} for r in rows(evaluated)] == [
        {k: v for k, v in r.items() if k.startswith("loss/")} for r in rows(plain)]
    assert [r["step"] for r in rows(evaluated) if "val/judge_accuracy" in r] == [2, 3]
    last = rows(evaluated)[-1]
    report = evaluate(trainer.sample, TrainingEvaluation.SPLIT, 8, TrainingEvaluation.SEED, load_judge(), [load_align()])
    assert (last["val/judge_accuracy"], last["val/fid"]) == (report["judge_accuracy"], pytest.approx(report["fid"]))
    assert last["val/rewards/toy-align"] == pytest.approx(report["rewards"]["toy-align"])


def test_evaluating_during_training_is_refused_where_the_toy_judge_does_not_apply(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    with pytest.raises(ConfigError, match=r"output.eval_every evaluates with the toy world's judge.*data.prompts="):
        load_config("toy-dmdr", [f"data.prompts={prompts}", "output.eval_every=10"])


@pytest.mark.parametrize("size,tile", [(32, (128, 128)), (300, (300, 300)), (1024, (512, 512)), ((512, 1024), (256, 512))])
def test_a_grid_tile_enlarges_small_images_and_shrinks_large_ones(size, tile, tmp_path):
    """A 1024-px grid of 16 images at 4x would be a 33k-px-wide PNG, written at every sample step."""
    from dmdr_rl.grid import save_grid, tile_size

    height, width = size if isinstance(size, tuple) else (size, size)
    assert tile_size(height, width) == tile
    if height <= 300:
        return
    path = save_grid(torch.rand(2, 3, height, width), ["a", "b"], tmp_path / "grid.png", columns=2)
    with Image.open(path) as png:
        assert png.size[0] < 2 * tile[1] + 20 and png.size[1] < tile[0] + 40


@pytest.fixture()
def ctrl_c():
    """SIGINT as in a terminal: Python's KeyboardInterrupt (a background job, `cmd &`, starts with it ignored)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_ends_the_generator_step_under_way_with_a_checkpoint_and_the_resumed_run_goes_on_exactly(tmp_path, ctrl_c):
    """The first Ctrl-C asks to stop: the step finishes, a checkpoint is written, the run stops, and nothing is
    redone on resuming (no metric row twice); its result is the uninterrupted run's."""
    import signal

    straight, _ = _trainer(tmp_path / "straight", **{"trainer.max_steps": 4, "output.checkpoint_every": 100})
    straight.train()
    stopped, _ = _trainer(tmp_path / "b", **{"trainer.max_steps": 4, "output.checkpoint_every": 100})
    original = stopped.train_iteration

    def interrupted_in_step_2():  # iterations 3-5 make generator step 2 (dmd.ratio=3): asked during iteration 4
        if stopped.iteration == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return original()

    stopped.train_iteration = interrupted_in_step_2
    with pytest.raises(KeyboardInterrupt):
        stopped.train()
    assert stopped.generator_step == 2 and stopped.iteration == 6  # the step under way was finished
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == "step_000002"  # not a checkpoint step
    events = [json.loads(line) for line in (tmp_path / "b" / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "stopped" and events[-1]["generator_step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are given back
    resumed, _ = _trainer(tmp_path / "b", **{"trainer.max_steps": 4, "output.checkpoint_every": 100,
                                             "trainer.resume_from": str(tmp_path / "b")})
    resumed.train()
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    for adapter in (dmdr.GENERATOR, dmdr.CRITIC):
        for a, b in zip(_snapshot(straight, adapter), _snapshot(resumed, adapter)):
            assert torch.allclose(a, b, atol=1e-6)


def test_ctrl_c_in_the_last_step_lets_the_run_finish_and_sigterm_stops_at_once(tmp_path, ctrl_c):
    """Asked to stop in its last generator step, a run has nothing left to stop: it finishes (and is
    evaluated). SIGTERM (`ray job stop`, Kubernetes: a kill follows within seconds) does not wait for the step."""
    import signal

    last, _ = _trainer(tmp_path / "last", **{"trainer.max_steps": 2, "output.checkpoint_every": 100})
    original = last.train_iteration

    def interrupted_in_the_last_step():  # iterations 3-5 make generator step 2, the last
        if last.iteration == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return original()

    last.train_iteration = interrupted_in_the_last_step
    assert last.train()["generator_steps"] == 2
    events = [json.loads(line) for line in (tmp_path / "last" / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "finished"

    def as_run_main_does(signum, frame):  # (dmdr_rl.run's SIGTERM handler)
        raise KeyboardInterrupt

    terminated, _ = _trainer(tmp_path / "term", **{"trainer.max_steps": 4, "output.checkpoint_every": 100})
    original_term = terminated.train_iteration

    def terminated_in_step_2():
        if terminated.iteration == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return original_term()

    terminated.train_iteration = terminated_in_step_2
    previous = signal.signal(signal.SIGTERM, as_run_main_does)
    try:
        with pytest.raises(KeyboardInterrupt):
            terminated.train()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert terminated.iteration == 4 and not (tmp_path / "term" / "checkpoints").exists()  # at once, mid-step


def test_a_resumed_run_says_where_it_resumes_from_and_its_started_event_records_it(tmp_path, capsys):
    first, _ = _trainer(tmp_path, **{"trainer.max_steps": 2})
    first.train()
    assert "resuming" not in capsys.readouterr().out
    resumed, _ = _trainer(tmp_path, **{"trainer.resume_from": str(tmp_path)})  # (max_steps 4: two more steps)
    resumed.train()
    checkpoint = (tmp_path / "checkpoints" / "step_000002").resolve()
    assert f"dmdr_rl: resuming from {checkpoint} (generator step 2 of trainer.max_steps=4)\n" in capsys.readouterr().out
    started = [e for e in map(json.loads, (tmp_path / "events.jsonl").read_text().splitlines()) if e["event"] == "started"]
    assert [(e["resume_from"], e["generator_step"], e["max_steps"]) for e in started] == [(None, 0, 2),
                                                                                          (str(checkpoint), 2, 4)]


@pytest.mark.parametrize("generator", [{}, {"student.lora": "null"}], ids=["lora", "full-fine-tune"])
def test_resume_continues_exactly(tmp_path, generator):
    straight, _ = _trainer(tmp_path / "a", **generator)
    straight.train()
    first, _ = _trainer(tmp_path / "b", **{"trainer.max_steps": 2, **generator})
    first.train()
    resumed, _ = _trainer(tmp_path / "b", **generator)
    resumed.load_checkpoint(tmp_path / "b" / "checkpoints")
    assert resumed.generator_step == 2 and resumed.iteration == 6
    resumed.train()
    for adapter in (dmdr.GENERATOR, dmdr.CRITIC):
        assert _changed(_snapshot(_trainer(tmp_path / "c", **generator)[0], adapter), _snapshot(straight, adapter))
        for a, b in zip(_snapshot(straight, adapter), _snapshot(resumed, adapter)):
            assert torch.allclose(a, b, atol=1e-6)


def test_full_fine_tune_trains_a_copy_and_never_the_base(tmp_path):
    trainer, _ = _trainer(tmp_path, **{"student.lora": "null"})
    base = [p.detach().clone() for n, p in trainer.backbone.transformer.named_parameters() if "lora_" not in n]
    trainer.train()
    after = [p.detach() for n, p in trainer.backbone.transformer.named_parameters() if "lora_" not in n]
    assert all(torch.equal(a, b) for a, b in zip(base, after))
    copy = trainer.backbone.trainable_parameters(dmdr.GENERATOR)
    assert len(copy) == len(base)
    assert _changed(base, copy)
    assert (tmp_path / "checkpoints" / "step_000004" / "generator.safetensors").stat().st_size > 4 * sum(p.numel() for p in base) * 0.9


def test_learning_rates_drop_to_the_rl_stage_values_after_the_cold_start(tmp_path):
    trainer, _ = _trainer(tmp_path, **{"trainer.lr_generator_rl": 2e-4, "trainer.lr_critic_rl": 1e-4})
    logged = []
    for _ in range(12):
        metrics = trainer.train_iteration()
        if metrics is not None:
            logged.append((metrics["stage/reward_active"], metrics["schedule/lr_generator"], metrics["schedule/lr_critic"]))
    # generator steps 0-1: cold start at the base rates; 2-3: the RL stage's
    assert logged == [(0.0, 1e-3, 1e-3), (0.0, 1e-3, 1e-3), (1.0, 2e-4, 1e-4), (1.0, 2e-4, 1e-4)]
    assert trainer.learner.opt_generator.param_groups[0]["lr"] == 2e-4


def test_the_rollout_batch_shrinks_to_batch_size_rl_with_the_rewards(tmp_path):
    trainer, reward = _trainer(tmp_path, **{"trainer.batch_size_rl": 1})  # ratio 3, cold start 2 of 4 steps
    sizes = []
    while trainer.learner.generator_step < 4:
        trainer.train_iteration()
        sizes.append(len(trainer.last_batch.prompts))
    assert sizes == [2] * 6 + [1] * 6  # the iterations of generator steps 0-1, then of steps 2-3


def test_a_reward_reads_each_prompt_through_its_template_where_it_trains_monitors_and_scores_grids(tmp_path):
    class RecordingReward(CountingReward):
        def __init__(self):
            super().__init__()
            self.prompts = []

        def score(self, images, prompts):
            self.prompts.extend(prompts)
            return super().score(images, prompts)

    cfg = load_config("toy-dmdr", [f"output.dir={tmp_path}", "trainer.batch_size=2", "trainer.max_steps=2",
                                   "trainer.cold_start=1", "dmd.ratio=1", "student.steps=2", "output.sample_every=2"])
    reward = RecordingReward()
    spec = RewardSpec(name="mean-red", shaping="linear", monitor=True, prompt_template="a photo: {prompt}!")
    trainer = LocalTrainer(cfg, ToyBackbone(create_teacher_transformer(seed=0), ToyTextEncoder.create(seed=0)),
                           [dmdr.WeightedReward(reward, spec)])
    trainer.train()
    # in order: the start's probe (the grid's first 2 prompts), the monitored rollout of step 0 (2), that of step 1 (2)
    # and its generator update (2, the reward trains from step 1), the grid at step 2 (16)
    grid, batches = trainer.prompts.batch(-1, 16), [trainer.prompts.batch(i, 2) for i in range(2)]
    expected = grid[:2] + batches[0] + batches[1] + batches[1] + grid
    assert reward.prompts == [f"a photo: {prompt}!" for prompt in expected]
    # and the reward's check of the run's prompts before anything starts (the dry run's too) reads them so
    from dmdr_rl.prompts import checked_prompt_source
    from reward_servers.registry import REWARDS

    checked = []
    original_check = REWARDS.check
    REWARDS.check = lambda name, prompts, **kwargs: checked.extend(prompts)
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    try:
        checked_prompt_source(load_config("toy-dmdr", [f"data.prompts={tmp_path / 'prompts.txt'}",
                                                       "rewards.0.prompt_template='a photo: {prompt}!'"]))
    finally:
        REWARDS.check = original_check
    assert checked == ["a photo: a red circle!", "a photo: a blue square!"]


def test_the_learner_gives_the_critic_the_samples_critic_samples_names(tmp_path, monkeypatch):
    given, critic_loss = [], dmdr.critic_loss
    monkeypatch.setattr(dmdr, "critic_loss", lambda backbone, x0, *a, **k: given.append(x0) or critic_loss(backbone, x0, *a, **k))
    for samples in ("final", "step"):
        trainer, _ = _trainer(tmp_path / samples, **{"critic.samples": samples, "student.sampler": "sde"})
        trainer.train_iteration()
        batch = trainer.last_batch
        rows = [[torch.equal(given[-1][i], batch.x0_steps[k, i]) for k in range(2)] for i in range(2)]
        if samples == "final":
            assert torch.equal(given[-1], batch.x0)
        else:  # each sample's x0 at one of its steps (batch 2, 2 steps: this seed draws step 0 for one of them)
            assert all(any(row) for row in rows) and not torch.equal(given[-1], batch.x0)


@pytest.mark.parametrize("failure", ["shape", "raises", "no-gradient", "served-raises", "served-shape",
                                     "served-out-of-memory", "served-unreachable"])
def test_a_reward_that_cannot_score_stops_the_run_before_it_trains(tmp_path, failure):
    """The cold start would otherwise train thousands of steps before the first reward step met it."""
    from reward_servers.protocol import RewardScoreError, RewardServerError

    class Broken(CountingReward):
        def score(self, images, prompts):
            if failure == "raises":
                raise ZeroDivisionError("the model's own bug")
            if failure == "no-gradient":  # (it says it is differentiable: ReFL's scoring asks for the gradient)
                return images.detach().mean(dim=(1, 2, 3))
            return images.mean(dim=(2, 3))  # [B, 3]: one score per image expected

    from reward_servers.client import RemoteReward, RewardClient
    from reward_servers.local import InProcessReward
    from reward_servers.protocol import RewardOutputError, RewardModelError

    def served(cause):
        """An app whose replica raised `cause`, as Ray raises it at the caller."""
        def transport(method, images, prompts, timeout_s):
            if method == "info":
                return {"name": "mean-red", "differentiable": True}
            if isinstance(cause, ray.exceptions.RayError):  # (Ray's own: the app was not reached)
                raise cause
            raise ray.exceptions.RayTaskError(method, "traceback", cause).as_instanceof_cause()
        return RemoteReward(RewardClient(transport, "reward-mean-red", retries=1, backoff_s=0.0))

    ray = pytest.importorskip("ray")
    reward, error, message, final = {
        "shape": (InProcessReward(Broken()), RewardOutputError, r"returned scores of shape \[2, 3\], expected \[2\]", True),
        "raises": (InProcessReward(Broken()), RewardScoreError,
                   r"raised while scoring 2 images: ZeroDivisionError: the model's own bug", True),
        "no-gradient": (InProcessReward(Broken()), RewardOutputError, r"says it is differentiable, but its scores carry no "
                        r"gradient", True),
        "served-raises": (served(ZeroDivisionError("the model's own bug")), RewardModelError,
                          r"reward app 'reward-mean-red' failed in score_with_grad\(\): ZeroDivisionError: the model's own bug",
                          True),
        "served-shape": (served(RewardOutputError("reward model 'mean-red' returned scores of shape [2, 3], expected [2]")),
                         RewardOutputError, r"failed in score_with_grad\(\): RewardOutputError: .* shape \[2, 3\]", True),
        "served-out-of-memory": (served(torch.OutOfMemoryError("CUDA out of memory")), RewardServerError,
                                 r"failed in score_with_grad\(\): OutOfMemoryError", False),  # (another try may fit)
        "served-unreachable": (served(ray.exceptions.ActorDiedError()), RewardServerError,
                               r"did not answer score_with_grad\(\) after 2 attempt", False),  # (it may answer next time)
    }[failure]
    trainer, _ = _trainer(tmp_path / "run", reward=reward, **{"trainer.cold_start": 4})
    with pytest.raises(error, match=r"^rewards.0 \(mean-red\), scoring two samples before training: .*" + message) as caught:
        trainer.train()
    assert trainer.learner.iteration == 0 and not (tmp_path / "run" / "metrics.jsonl").exists()
    assert caught.value.ends_the_run is final  # the model's own failure: a Ray run ends at its first try
    assert final or not isinstance(caught.value, RewardModelError)
    if failure == "raises":  # the model's own traceback is chained
        assert isinstance(caught.value.__cause__.__cause__, ZeroDivisionError)


def test_each_optimiser_decays_its_weights_by_the_config_also_after_loading_another_runs_state(tmp_path):
    def decays(learner):
        return [group["weight_decay"] for opt in (learner.opt_generator, learner.opt_critic) for group in opt.param_groups]

    paper = _trainer(tmp_path / "a", **{"trainer.weight_decay_critic": 0.0})[0].learner
    assert decays(paper) == [0.01, 0.0]
    other = _trainer(tmp_path / "b", **{"trainer.weight_decay_generator": 0.2, "trainer.weight_decay_critic": 0.1})[0].learner
    assert decays(other) == [0.2, 0.1]
    other.load_training_state(paper.training_state())  # a state dict carries its own: the config's holds
    assert decays(other) == [0.2, 0.1]


def test_the_8bit_optimizer_and_unknown_backbone_options_say_what_they_need(tmp_path):
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed here")
    except ImportError:
        pass
    from dmdr_rl.config import ConfigError

    with pytest.raises(ConfigError, match="trainer.optimizer=adamw8bit needs bitsandbytes"):
        _trainer(tmp_path, **{"trainer.optimizer": "adamw8bit"})

    cfg = load_config("toy-dmdr", ["model.kwargs={colour: red}", f"output.dir={tmp_path}"])
    with pytest.raises(ConfigError, match="backbone .toy. cannot be built with these options .* fix model.kwargs"):
        LocalTrainer(cfg)


def test_a_fresh_run_in_a_reused_directory_keeps_its_records_apart_from_the_earlier_runs(tmp_path):
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a red circle"}\n')  # a user's file, not the run's
    first, _ = _trainer(tmp_path, **{"trainer.max_steps": 2})
    first.train()
    earlier_metrics = (tmp_path / "metrics.jsonl").read_text()
    second, _ = _trainer(tmp_path, **{"trainer.max_steps": 2})
    second.train()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # not [1, 2, 1, 2]
    (previous,) = (tmp_path / "previous").iterdir()
    assert (previous / "metrics.jsonl").read_text() == earlier_metrics
    assert (previous / "checkpoints" / "latest").exists() and (tmp_path / "checkpoints" / "latest").exists()
    assert (previous / "config.yaml").exists() and find_run(previous)[1].parent == previous / "checkpoints"
    assert not (tmp_path / "previous" / "previous").exists() and (tmp_path / "prompts.jsonl").exists()


def test_the_schedules_run_on_generator_steps_not_iterations(tmp_path, monkeypatch):
    """DynaDG and DynaRS are functions of the generator step s (DESIGN section 2, item 4); with ratio 3
    the iteration runs three times faster."""
    seen = {"critic": [], "generator": []}
    for name, index in (("critic_loss", 3), ("generator_loss", 4)):
        original = getattr(dmdr, name)

        def spy(*args, _original=original, _key=name.split("_")[0], _index=index, **kwargs):
            seen[_key].append(args[_index])
            return _original(*args, **kwargs)

        monkeypatch.setattr(dmdr, name, spy)
    trainer, _ = _trainer(tmp_path, **{"trainer.max_steps": 2, "dmd.ratio": 3, "output.checkpoint_every": 100})
    trainer.train()
    assert seen == {"critic": [0, 0, 0, 1, 1, 1], "generator": [0, 1]}


def test_a_non_finite_gradient_skips_the_optimizer_step_and_is_counted(tmp_path):
    trainer, _ = _trainer(tmp_path)
    learner = trainer.learner
    before = _snapshot(trainer, dmdr.GENERATOR)
    params = trainer.backbone.trainable_parameters(dmdr.GENERATOR)
    (params[0].sum() * float("inf")).backward()
    learner._step(learner.opt_generator)
    assert learner.skipped_updates == 1 and all(torch.equal(a, b) for a, b in zip(before, _snapshot(trainer, dmdr.GENERATOR)))
    learner.opt_generator.zero_grad()
    sum(p.sum() for p in params).backward()  # a finite one still steps
    learner._step(learner.opt_generator)
    assert learner.skipped_updates == 1 and not all(torch.equal(a, b) for a, b in zip(before, _snapshot(trainer, dmdr.GENERATOR)))
    assert learner.training_state()["skipped_updates"] == 1


def test_updates_are_clipped_adamw_steps(tmp_path):
    trainer, _ = _trainer(tmp_path)
    learner = trainer.learner
    assert isinstance(learner.opt_generator, torch.optim.AdamW) and isinstance(learner.opt_critic, torch.optim.AdamW)
    params = trainer.backbone.trainable_parameters(dmdr.GENERATOR)

    def global_norm():
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])).item()

    at_step = []  # the gradient norm AdamW steps with (clipping after the step would clip nothing that counts)
    learner.opt_generator.register_step_pre_hook(lambda optimizer, args, kwargs: at_step.append(global_norm()))
    (1e6 * sum(p.sum() for p in params)).backward()
    assert global_norm() > 1e5
    learner._step(learner.opt_generator)
    assert at_step == [pytest.approx(learner.cfg.trainer.grad_clip, rel=1e-4)]  # clipped from about 1e6 x sqrt(n)


def test_resume_from_takes_a_run_directory_and_names_the_field_when_there_is_no_checkpoint(tmp_path):
    from dmdr_rl.config import ConfigError
    from dmdr_rl.trainer import resume_checkpoint

    first, _ = _trainer(tmp_path / "a", **{"trainer.max_steps": 2})
    first.train()
    latest = (tmp_path / "a" / "checkpoints" / "latest").read_text().strip()
    for given in (tmp_path / "a", tmp_path / "a" / "checkpoints", tmp_path / "a" / "checkpoints" / latest):
        assert resume_checkpoint(given) == tmp_path / "a" / "checkpoints" / latest
    with pytest.raises(ConfigError, match=r"trainer.resume_from=.*nowhere: no trainer checkpoint there"):
        _trainer(tmp_path / "b", **{"trainer.resume_from": str(tmp_path / "nowhere")})
    # a Ray run stopped before its end has only Ray Train's checkpoints: the newest one is the run's
    import shutil

    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copy(tmp_path / "a" / "config.yaml", stopped / "config.yaml")
    older = stopped / "ray_train" / "toy-dmdr-20261129-x" / "checkpoint_2026-11-29_05-37-30.1"
    newer = older.with_name("checkpoint_2026-11-29_05-37-32.2")
    for checkpoint in (older, newer):
        shutil.copytree(tmp_path / "a" / "checkpoints" / latest, checkpoint)
    os.utime(older, (1, 1))
    assert resume_checkpoint(stopped) == newer and find_run(stopped) == (stopped, newer)
    assert find_run(older) == (stopped, older)  # three levels below its config.yaml
    # a launch that finished keeps checkpoints/; a later Ray launch in the same directory that stopped before its
    # end left newer Ray Train checkpoints: the run's checkpoint is the one furthest on, not the finished one
    one_step, _ = _trainer(tmp_path / "one", **{"trainer.max_steps": 1})
    one_step.train()
    (step_1,) = (tmp_path / "one" / "checkpoints").glob("step_*")
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "one", crashed)
    later = crashed / "ray_train" / "toy-dmdr-launch-2" / "checkpoint_2026-11-29_06-00-00.1"
    shutil.copytree(tmp_path / "a" / "checkpoints" / latest, later)  # generator step 2
    os.utime(later, (1, 1))  # older on disk than checkpoints/: the step decides
    assert resume_checkpoint(crashed) == later
    shutil.rmtree(later)
    shutil.copytree(step_1, later)  # the same step as checkpoints/: the finished launch's
    assert resume_checkpoint(crashed) == crashed / "checkpoints" / step_1.name


def test_resume_from_into_another_runs_directory_sets_that_run_aside_and_a_wrong_adapter_names_the_field(tmp_path, capsys):
    from dmdr_rl.config import ConfigError

    source, _ = _trainer(tmp_path / "a", **{"trainer.max_steps": 2})
    source.train()
    other, _ = _trainer(tmp_path / "b", **{"trainer.max_steps": 2, "trainer.seed": 7})
    other.train()
    from dmdr_rl.trainer import resume_changes

    changed, _ = _trainer(tmp_path / "b", **{"trainer.max_steps": 3, "trainer.resume_from": str(tmp_path / "a"),
                                             "trainer.seed": 7})
    assert resume_changes(changed.cfg) == ["trainer.seed: 0 -> 7"]  # where it writes and how long it runs may change
    resumed, _ = _trainer(tmp_path / "b", **{"trainer.max_steps": 3, "trainer.resume_from": str(tmp_path / "a")})
    resumed.train()
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3] and sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["latest", "step_000003"]
    (previous,) = (tmp_path / "b" / "previous").iterdir()
    assert [json.loads(line)["step"] for line in (previous / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # that set-aside run resumed into its old directory: the run there now is another, set aside in its turn
    back, _ = _trainer(tmp_path / "b", **{"trainer.max_steps": 3, "trainer.resume_from": str(previous), "trainer.seed": 7})
    back.train()
    assert [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()] == [3]
    assert len(list((tmp_path / "b" / "previous").iterdir())) == 2
    wrong, _ = _trainer(tmp_path / "c", **{"trainer.resume_from": str(tmp_path / "a"), "student.lora.rank": 8})
    with pytest.raises(ConfigError, match=r"trainer.resume_from=.*other shapes"):
        wrong.train()
    with pytest.raises(ConfigError, match=r"adapters have other shapes \(student.lora.rank: 16 -> 8\)"):
        resume_changes(wrong.cfg)  # what run.py asks before building anything
    finished, _ = _trainer(tmp_path / "d", **{"trainer.max_steps": 2, "trainer.resume_from": str(tmp_path / "a")})
    with pytest.raises(ConfigError, match=r"at generator step 2, and trainer.max_steps=2: nothing is left to train"):
        finished.train()
    assert not (tmp_path / "d").exists()
    from dmdr_rl import run

    for backend in ("local", "ray"):  # the dry run refuses it too (a Ray job's checkpoint, when it is on this machine)
        argv = ["--preset", "toy-dmdr", "--dry-run", f"trainer.backend={backend}", "trainer.max_steps=2",
                f"trainer.resume_from={tmp_path / 'a'}"]
        with pytest.raises(SystemExit):
            run.main(argv)
        assert "at generator step 2, and trainer.max_steps=2: nothing is left to train" in capsys.readouterr().err
        run.main(argv[:-2] + ["trainer.max_steps=3", argv[-1]])
        assert "the config is valid" in capsys.readouterr().out


def test_a_metrics_log_that_cannot_start_closes_the_store_it_was_given(tmp_path):
    from dmdr_rl.trainer import MetricsLog

    class Store:
        closed = False

        def close(self):
            self.closed = True

    (tmp_path / "a-file").write_text("")
    store = Store()
    with pytest.raises(OSError):
        MetricsLog(tmp_path / "a-file" / "run", store)  # no directory can be made inside a file
    assert store.closed  # (else the run's lock would hold the directory until the process ends)


def test_a_changed_setting_is_named_by_its_field_and_serving_settings_are_not_changes(tmp_path):
    """A list is compared item by item (`rewards.0.margin`, not the whole rewards list), and how a reward is
    served (its Serve app's settings, its placement, its images per call) changes no number of the run."""
    from dmdr_rl.trainer import ADAPTER_SHAPES, changed_settings, write_run_config

    write_run_config(load_config("toy-dmdr", [f"output.dir={tmp_path}"]), tmp_path)

    def changes(*overrides):
        return changed_settings(load_config("toy-dmdr", [f"output.dir={tmp_path}", *overrides]), tmp_path)

    assert changes("rewards.0.margin=0.5") == ["rewards.0.margin: -0.05 -> 0.5"]
    assert changes("rewards.0.serve.http_max_pixels=1024", "rewards.0.placement=serve", "rewards.0.max_images_per_call=8",
                   "rewards.0.serve.max_batch_size=4", "rewards.0.serve.autoscaling={max_replicas: 4}") == []
    # ... but which app scores, and its environment, can change the model: those count
    assert changes("rewards.0.serve.attach=true", "rewards.0.serve.app=other") == [
        "rewards.0.serve.app: None -> 'other'", "rewards.0.serve.attach: False -> True"]
    assert changes("rewards=[]") == [f"rewards: {load_config('toy-dmdr').model_dump(mode='json')['rewards']!r} -> []"]
    assert changes("dmd.renoise_beta=[3.0, 1.5]") == ["dmd.renoise_beta.0: 4.0 -> 3.0"]
    # an adapter on other modules (one item of the list changed) cannot load the checkpoint: still seen as such
    targets = "student.lora.targets=[to_q, to_k, to_v, {}]"
    write_run_config(load_config("toy-dmdr", [f"output.dir={tmp_path / 't'}", targets.format("to_out.0")]), tmp_path / "t")
    [change] = changed_settings(load_config("toy-dmdr", [targets.format("to_add_out")]), tmp_path / "t", ("output.",))
    assert change == "student.lora.targets.3: 'to_out.0' -> 'to_add_out'" and change.startswith(ADAPTER_SHAPES)


def test_a_bf16_bases_lora_goes_to_the_rollouts_in_bf16_and_samples_exactly_as_its_float32_weights(tmp_path):
    """The weights a Ray learner publishes each generator step: a LoRA that computes in a bf16 base's precision
    is sent in bf16 (half the bytes), and a rollout actor that loads them predicts bit for bit what the learner's
    float32 weights predict. Checkpoints, and a float32 base's weights, keep float32."""
    from dmdr_rl.learning import load_adapter_state
    from dmdr_rl.registry import build_backbone

    cfg = load_config("toy-dmdr", tiny_run("trainer.precision=bf16", "trainer.lr_generator=1e-2", f"output.dir={tmp_path}"))
    trainer = LocalTrainer(cfg)
    trainer.train()  # (two steps: the LoRA is trained, no longer zero)
    state, published = trainer.learner.adapter_state(dmdr.GENERATOR), trainer.learner.published_state(dmdr.GENERATOR)
    assert {v.dtype for v in state.values()} == {torch.float32} and {v.dtype for v in published.values()} == {torch.bfloat16}
    assert 2 * sum(v.nbytes for v in published.values()) == sum(v.nbytes for v in state.values())
    assert any(not torch.equal(v, published[k].float()) for k, v in state.items())  # (its weights do round)
    rollout = build_backbone(cfg.model, precision="bf16")  # as a rollout actor builds it, and loads the weights
    dmdr.add_generator(rollout, cfg.student)
    load_adapter_state(rollout, dmdr.GENERATOR, published)
    generator = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 3, 32, 32, generator=generator), torch.tensor([0.9, 0.7, 0.4, 0.1])
    cond = trainer.backbone.encode(["a red circle", "a blue square", "a green diamond", "a small circle"])
    with torch.no_grad():
        ours, theirs = (b.velocity(x, t, cond, adapter=dmdr.GENERATOR) for b in (trainer.backbone, rollout))
        base = trainer.backbone.velocity(x, t, cond)
    assert (ours - base).abs().max() > 1e-3 and torch.equal(ours, theirs)
    fp32 = LocalTrainer(load_config("toy-dmdr", tiny_run(f"output.dir={tmp_path / 'fp32'}")))
    assert {v.dtype for v in fp32.learner.published_state(dmdr.GENERATOR).values()} == {torch.float32}


def test_a_reward_none_of_whose_scores_is_finite_at_a_step_is_warned_of_once(tmp_path, capsys):
    """Non-finite samples are dropped from the reward term by design; all of them at a step is a bug in the reward
    model (a trial's NaN gradient everywhere trained DMD alone, without a word)."""
    from dmdr_rl.store import FileStore
    from dmdr_rl.trainer import MetricsLog

    log = MetricsLog(tmp_path, FileStore(tmp_path))
    try:
        log.write(1, {"reward/some": 0.5, "reward/some/non_finite": 3.0})  # some dropped: as designed, quiet
        assert "WARNING" not in capsys.readouterr().err
        log.write(2, {"reward/all": float("nan"), "reward/all/non_finite": 8.0, "reward/some": 0.5})
        warned = capsys.readouterr().err
        assert ("WARNING: at generator step 2 not one of the 8 scores of reward 'all' was finite" in warned
                and "trained nothing at that step" in warned)
        log.write(3, {"reward/all": float("nan"), "reward/all/non_finite": 8.0})
        assert "WARNING" not in capsys.readouterr().err  # once per reward
    finally:
        log.close()
