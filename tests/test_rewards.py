"""The reward protocol, its checks, cross-process gradients, the client's retries, the HTTP codec,
PickScore on a tiny CLIP, and a user's own reward class -- all without Ray (see test_reward_serving)."""

import asyncio
import base64
import io
import json
import sys
import textwrap

import numpy as np
import pytest
import torch

from dmdr_rl import dmdr
from dmdr_rl.config import ConfigError, RewardSpec, load_config
from reward_servers import RewardInputError, RewardServerError, load_reward_model, reward_model
from reward_servers import http
from reward_servers.client import RemoteReward, RewardClient
from reward_servers.gradient import attach_gradient, score_and_grad
from reward_servers.local import InProcessReward
from reward_servers.registry import check_reward
from reward_servers.models.testing import save_tiny_clip
from conftest import tiny_run

PROMPTS = ["a large green diamond in the top left", "a red diamond below a purple circle",
           "a small purple triangle in the top right", "a purple triangle right of a green square"]


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def pickscore(tiny_clip_dir):
    return load_reward_model("pickscore", {"path": str(tiny_clip_dir), "processor_path": str(tiny_clip_dir),
                                           "local_files_only": True})


def _images(n=4, seed=0):
    return torch.rand((n, 3, 32, 32), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("images, prompts, message", [
    (torch.rand(2, 32, 32), ["a", "b"], r"shape \[B, 3, H, W\]"),
    (torch.rand(2, 1, 32, 32), ["a", "b"], r"shape \[B, 3, H, W\]"),
    ((torch.rand(2, 3, 8, 8) * 255).to(torch.uint8), ["a", "b"], "float tensor"),
    (torch.rand(2, 3, 8, 8) * 2 - 1, ["a", "b"], r"values must lie in \[0, 1\]"),
    (torch.rand(3, 3, 8, 8), ["a", "b"], "3 images but 2 prompts"),
    (torch.full((1, 3, 8, 8), float("nan")), ["a"], "NaN"),
    (torch.rand(1, 3, 8, 8), "a", "sequence of strings"),
    (np.zeros((1, 3, 8, 8), np.float32), ["a"], "torch.Tensor"),
])
def test_bad_images_are_rejected_with_the_fix(images, prompts, message):
    model = reward_model(RewardSpec(name="toy-align"))
    with pytest.raises(RewardInputError, match=message):
        model.score(images, prompts)


def test_unknown_import_path_and_incomplete_class_say_why():
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        load_reward_model("no_such_module:Reward")
    with pytest.raises(ValueError, match="unknown reward model 'hpsv9'"):
        load_reward_model("hpsv9")
    with pytest.raises(ConfigError, match="rewards.1.name: .*must set `differentiable"):
        load_reward_model("tests.test_rewards:_NoFlag", where="rewards.1")
    with pytest.raises(ConfigError, match="rewards.0.name: .*OrderedDict without a score"):
        load_reward_model("collections:OrderedDict", where="rewards.0")


class _NoFlag:
    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


class _Refuses(_NoFlag):
    differentiable = True

    def __init__(self, threshold: float = 0.5):
        raise ValueError(f"threshold {threshold} is outside (0, 1)")


def test_a_reward_whose_constructor_raises_is_named_by_its_entry_with_its_own_error_chained():
    from dmdr_rl.trainer import build_rewards
    from reward_servers import RewardBuildError

    cfg = load_config("toy-dmdr", ["rewards=[{name: toy-align}, {name: 'tests.test_rewards:_Refuses', kwargs: {threshold: 2}}]"])
    with pytest.raises(RewardBuildError, match=r"^rewards.1 \(tests.test_rewards:_Refuses\) could not be built: ValueError: "
                                                r"threshold 2 is outside \(0, 1\) .*rewards.1.kwargs\)$") as err:
        build_rewards(cfg)  # (the one place every placement's rewards are built from: load_reward_model)
    assert isinstance(err.value.__cause__, ValueError) and err.value.__cause__.__traceback__ is not None
    # a served reward's replica says the same, for the entry its run deployed it from
    from reward_servers.serve import reward_app

    app = reward_app(cfg.rewards[1].model_copy(update={"placement": "serve"}), "rewards.1")._bound_deployment
    with pytest.raises(RewardBuildError, match=r"^rewards.1 \(tests.test_rewards:_Refuses\) could not be built"):
        _server_class()(*app.init_args, **app.init_kwargs)  # the replica's constructor, without Serve


def test_a_reward_that_cannot_load_here_says_what_to_fix_in_one_line(monkeypatch):
    """Missing toy weights and a package not installed are the user's to fix, not the model's bugs: one-line
    errors (cli.fixable_errors) that say what to do, not a traceback."""
    from dmdr_rl.cli import fixable_errors
    from dmdr_rl.toy.weights import ToyWeightsError
    from reward_servers import RewardLoadError

    with pytest.raises(ToyWeightsError, match="python -m dmdr_rl.toy.build align"):
        load_reward_model("toy-align", {"path": "/no/such/weights"}, "rewards.0")
    monkeypatch.setitem(sys.modules, "open_clip", None)  # (an import of it fails: not installed)
    with pytest.raises(RewardLoadError, match=r"^rewards.1: reward model 'hpsv2.1' needs a package that is not installed "
                                              r"here \(ModuleNotFoundError: .*open_clip.*pip install -e '.\[rewards\]'") as err:
        load_reward_model("hpsv2.1", {}, "rewards.1")
    assert isinstance(err.value, fixable_errors())


class _NotDifferentiable(_NoFlag):
    differentiable = False

    def __init__(self, margin: float = 0.0):
        self.margin = margin


def test_the_dry_run_check_refuses_what_loading_would_without_building():
    check_reward("tests.test_rewards:_NotDifferentiable", {"margin": 1.0}, "rewards.0", weight=0.0)  # a monitor
    with pytest.raises(ConfigError, match=r"rewards.0.kwargs"):
        check_reward("tests.test_rewards:_NotDifferentiable", {"gan": 2.0}, "rewards.0")
    with pytest.raises(ConfigError, match=r"rewards.2 .*not differentiable.*rewards.2.weight=0 rewards.2.monitor=true to only"):
        check_reward("tests.test_rewards:_NotDifferentiable", {}, "rewards.2", weight=0.3)
    with pytest.raises(ConfigError, match=r"rewards.0.name: 'collections:OrderedDict' is a class without a score"):
        check_reward("collections:OrderedDict", {}, "rewards.0")


class _NanForOddPrompts:
    """A reward that returns NaN for some samples (and would poison a naive batch gradient)."""

    name, differentiable = "nan-odd", True

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3)) * 3 + torch.tensor([float("nan") if "odd" in p else 0.0 for p in prompts])


def test_score_and_grad_is_the_per_sample_autograd_gradient(align):
    images = _images()
    scores, grads = score_and_grad(align, images, PROMPTS)
    for i in range(len(PROMPTS)):
        single = images[i : i + 1].clone().requires_grad_(True)
        align.score(single, PROMPTS[i : i + 1]).sum().backward()
        # one image alone vs in a batch: different conv kernels, float32 rounding
        assert (grads[i : i + 1] - single.grad).norm() <= 1e-4 * single.grad.norm()
        assert scores[i].item() == pytest.approx(align.score(images[i : i + 1], PROMPTS[i : i + 1]).item(), rel=1e-5)


def test_a_differentiable_model_whose_scores_carry_no_gradient_is_an_error_not_a_silent_zero():
    class ThroughNumpy:  # e.g. a model that goes through PIL or numpy but says it is differentiable
        name, differentiable = "through-numpy", True

        def score(self, images, prompts):
            return torch.from_numpy(images.detach().numpy().mean(axis=(1, 2, 3)))

    from reward_servers.protocol import RewardOutputError

    with pytest.raises(RewardOutputError, match="'through-numpy' says it is differentiable, but its scores carry no gradient"):
        score_and_grad(ThroughNumpy(), _images(2), ["a", "b"])  # (the model's own: a run's first scoring ends it)


def test_a_sample_whose_gradient_is_not_finite_is_dropped_like_a_non_finite_score():
    class SquareRoot:  # d sqrt(x) / dx is infinite at a pixel that is exactly 0
        name, differentiable = "sqrt", True

        def score(self, images, prompts):
            return images.sqrt().mean(dim=(1, 2, 3))

    images = _images(3)
    images[1, 0, 0, 0] = 0.0
    scores, grads = score_and_grad(SquareRoot(), images, ["a", "b", "c"])
    assert torch.isnan(scores[1]) and (grads[1] == 0).all()  # dropped from the reward term and counted there
    assert torch.isfinite(scores[[0, 2]]).all() and (grads[[0, 2]] != 0).all()


def test_chunked_scoring_gives_the_same_scores_and_gradients(pickscore):
    images = _images(5)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(5)]
    whole, chunked = score_and_grad(pickscore, images, prompts), score_and_grad(pickscore, images, prompts, max_images=2)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    calls = []
    spy = type("Spy", (), {"name": "spy", "differentiable": False,
                           "score": lambda self, x, p: calls.append(len(p)) or pickscore.score(x, p)})()
    local = InProcessReward(spy, max_images_per_call=2)
    torch.testing.assert_close(local.score(images, prompts), whole[0], rtol=1e-5, atol=1e-6)
    assert calls == [2, 2, 1]


def test_a_non_finite_score_gets_a_zero_gradient_and_spares_the_others():
    scores, grads = score_and_grad(_NanForOddPrompts(), _images(3), ["even", "odd", "even"])
    assert torch.isnan(scores[1]) and torch.isfinite(scores[[0, 2]]).all()
    assert (grads[1] == 0).all() and torch.allclose(grads[0], torch.full_like(grads[0], 3 / (3 * 32 * 32)))


class _InProcessTransport:
    """What a reward server does, called directly: the client's logic without Ray."""

    def __init__(self, model, failures=0):
        self.model, self.failures, self.calls = model, failures, 0

    def __call__(self, method, images, prompts, timeout_s):
        self.calls += 1
        if self.calls <= self.failures:
            raise TimeoutError("replica busy")
        if method == "info":
            return {"name": self.model.name, "differentiable": self.model.differentiable}
        if method == "score_with_grad":
            scores, grads = score_and_grad(self.model, images, prompts)
            return {"scores": scores, "grads": grads}
        return {"scores": self.model.score(images, prompts).detach()}


@pytest.mark.parametrize("shaping", ["hinge", "linear"])
def test_remote_gradient_through_the_shaped_loss_equals_the_in_process_one(align, shaping):
    spec = RewardSpec(name="toy-align", weight=0.3, shaping=shaping, margin=-0.05)
    remote = RemoteReward(RewardClient(_InProcessTransport(align), "reward-toy-align"))
    assert (remote.name, remote.differentiable) == ("toy-align", True)
    grads = []
    for model in (align, remote):
        images = _images().requires_grad_(True)
        loss, _ = dmdr.WeightedReward(model, spec).loss(images, PROMPTS)
        loss.backward()
        grads.append(images.grad)
    assert grads[0].abs().max() > 0
    assert (grads[1] - grads[0]).norm() <= 1e-5 * grads[0].norm()


def test_a_relative_rewards_remote_gradient_equals_the_in_process_one_from_one_request(pickscore):
    """rewards[].relative (SRPO) reads each image twice: served, both readings go in one request, and the chain
    rule through the two copies gives the in-process gradient."""
    spec = RewardSpec(name="pickscore", weight=5.0, margin=0.7, relative={})
    transport = _InProcessTransport(pickscore)
    remote = RemoteReward(RewardClient(transport, "reward-pickscore"))
    grads, words = [], torch.tensor([[0, 1], [2, 2], [1, 0], [0, 0]])
    for model in (pickscore, remote):
        images = _images().requires_grad_(True)
        loss, _ = dmdr.WeightedReward(model, spec).loss(images, PROMPTS, words)
        loss.backward()
        grads.append(images.grad)
    assert transport.calls == 2  # its info, then one scoring request
    assert grads[0].abs().max() > 0
    assert (grads[1] - grads[0]).norm() <= 1e-5 * grads[0].norm()


def test_attach_gradient_keeps_the_values_and_chains_the_jacobian():
    images = torch.rand(2, 3, 4, 4, requires_grad=True)
    grads = torch.randn(2, 3, 4, 4)
    scores = attach_gradient(images, torch.tensor([0.5, -1.0]), grads)
    assert scores.tolist() == [0.5, -1.0]
    (scores * torch.tensor([2.0, 3.0])).sum().backward()
    torch.testing.assert_close(images.grad, torch.stack([2 * grads[0], 3 * grads[1]]))


def test_client_retries_transient_failures_then_gives_up_naming_the_app(align):
    transport = _InProcessTransport(align, failures=2)
    client = RewardClient(transport, "reward-toy-align", retries=2, backoff_s=0.0)
    assert client.score(_images(), PROMPTS).shape == (4,)
    assert client.failed_attempts == 2 and transport.calls == 3
    client = RewardClient(_InProcessTransport(align, failures=10), "reward-toy-align", retries=1, backoff_s=0.0)
    with pytest.raises(RewardServerError, match="reward app 'reward-toy-align' did not answer score\\(\\) after 2"):
        client.score(_images(), PROMPTS)
    # the advice deploys an app of the missing name, not the example config's app whatever the name
    client = RewardClient(_InProcessTransport(align, failures=10), "reward-mine", retries=0, backoff_s=0.0)
    with pytest.raises(RewardServerError, match=r"deploy a Serve config with an application named 'reward-mine' "
                                                r"\(`serve deploy CONFIG.yaml`; deploy/serve-rewards.yaml is an example"):
        client.score(_images(), PROMPTS)


def test_a_request_that_met_a_dead_restarting_or_busy_replica_is_tried_again_and_a_models_error_is_not():
    """What RewardClient retries when Ray says it (a replica stopped as its app scaled down, or one busy)."""
    import ray.exceptions
    from ray.serve.exceptions import BackPressureError

    from reward_servers.client import _transient

    assert _transient(ray.exceptions.ActorDiedError()) and _transient(ray.exceptions.ActorUnavailableError("restarting", None))
    assert _transient(BackPressureError(num_queued_requests=3, max_queued_requests=2))
    assert not _transient(ray.exceptions.RayTaskError("score", "traceback", ValueError("the model's own")))


def test_client_does_not_retry_bad_requests_and_checks_answers(align):
    transport = _InProcessTransport(align)
    client = RewardClient(transport, "reward-toy-align", retries=3, backoff_s=0.0)
    with pytest.raises(RewardInputError, match="reward app 'reward-toy-align': got 2 images but 4 prompts"):
        client.score(_images(2), PROMPTS)
    assert transport.calls == 0  # rejected before anything was sent

    def rejects(method, images, prompts, timeout_s):  # the replica's own input check said no
        rejects.calls += 1
        raise RewardInputError("image values must lie in [0, 1]")

    rejects.calls = 0
    with pytest.raises(RewardInputError, match=r"^reward app 'reward-x' refused score\(\): image values must lie in \[0, 1\]$"):
        RewardClient(rejects, "reward-x", retries=3, backoff_s=0.0).score(_images(), PROMPTS)
    assert rejects.calls == 1  # not retried

    def model_error(method, images, prompts, timeout_s):  # the model raised: an answer, not an outage
        model_error.calls += 1
        raise ValueError("prompt is not in the toy grammar")

    model_error.calls = 0
    client = RewardClient(model_error, "reward-x", retries=3, backoff_s=0.0)
    with pytest.raises(RewardServerError, match=r"reward app 'reward-x' failed in score\(\): ValueError: prompt is not"):
        client.score(_images(), PROMPTS)
    assert model_error.calls == 1 and client.failed_attempts == 0

    def wrong_shape(method, images, prompts, timeout_s):
        return {"scores": torch.zeros(images.shape[0] + 1)}

    with pytest.raises(RewardServerError, match=r"shape \[5\], expected \[4\]"):
        RewardClient(wrong_shape, "reward-x", backoff_s=0.0).score(_images(), PROMPTS)

    with pytest.raises(RewardServerError, match=r"score\(\) returned a list, expected a dict"):
        RewardClient(lambda *args: [1.0] * 4, "reward-x", backoff_s=0.0).score(_images(), PROMPTS)

    def integer_grads(method, images, prompts, timeout_s):
        return {"scores": torch.zeros(images.shape[0]), "grads": torch.zeros(images.shape, dtype=torch.int64)}

    with pytest.raises(RewardServerError, match="gradients torch.int64 .* expected float"):
        RewardClient(integer_grads, "reward-x", backoff_s=0.0).score_with_grad(_images(), PROMPTS)


def test_a_replicas_own_error_is_reported_not_rays_header():
    """Through a Serve handle a replica's exception arrives inside Ray's, whose first line is the replica
    process's name (`ray::ServeReplica:...`): the message gives the replica's exception instead."""
    exceptions = pytest.importorskip("ray.exceptions")

    def replica_failed(method, images, prompts, timeout_s):
        try:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\n(the rest of torch's message)")
        except RuntimeError as err:
            raise exceptions.RayTaskError("ServeReplica:reward-x:reward-x", "Traceback ...", err, pid=1,
                                          ip="10.0.0.1").as_instanceof_cause() from None

    with pytest.raises(RewardServerError, match=r"^reward app 'reward-x' failed in score\(\): RuntimeError: CUDA out "
                                                r"of memory\. Tried to allocate 2\.00 GiB$"):
        RewardClient(replica_failed, "reward-x", retries=3, backoff_s=0.0).score(_images(), PROMPTS)


def test_a_sample_with_a_non_finite_served_gradient_is_dropped_and_counted_like_a_non_finite_score():
    def nan_grad_for_the_second(method, images, prompts, timeout_s):
        grads = torch.ones_like(images)
        grads[1, 0, 0, 0] = float("nan")
        return {"scores": images.mean(dim=(1, 2, 3)), "grads": grads}

    remote = RemoteReward(RewardClient(nan_grad_for_the_second, "reward-x"), name="x", differentiable=True)
    images = _images(3).requires_grad_(True)
    loss, metrics = dmdr.WeightedReward(remote, RewardSpec(name="x", shaping="linear")).loss(images, PROMPTS[:3])
    loss.backward()
    assert metrics["reward/x/non_finite"] == 1.0
    assert (images.grad[1] == 0).all() and (images.grad[[0, 2]] == -1 / 3).all()  # d(-sum of 2 scores / 3)/d score


def test_retries_back_off_exponentially_up_to_the_cap(monkeypatch):
    from reward_servers import client as client_module

    waits = []
    monkeypatch.setattr(client_module.time, "sleep", waits.append)
    transport = _InProcessTransport(load_reward_model("toy-align"), failures=6)
    client = RewardClient(transport, "reward-toy-align", retries=6, backoff_s=0.5, max_backoff_s=4.0)
    assert client.score(_images(), PROMPTS).shape == (4,)
    assert waits == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0] and client.failed_attempts == 6
    transport.calls, transport.failures = 0, 10
    with pytest.raises(RewardServerError, match=r"reward app 'reward-toy-align' did not answer score\(\) after 3 attempt"):
        RewardClient(transport, "reward-toy-align", retries=2, backoff_s=0.5).score(_images(), PROMPTS)


def test_non_finite_scores_are_dropped_from_the_loss_and_counted():
    spec = RewardSpec(name="nan-odd", weight=1.0, shaping="linear")
    remote = RemoteReward(RewardClient(_InProcessTransport(_NanForOddPrompts()), "reward-nan-odd"))
    images = _images(3).requires_grad_(True)
    loss, metrics = dmdr.WeightedReward(remote, spec).loss(images, ["even", "odd", "even"])
    loss.backward()
    assert metrics["reward/nan-odd/non_finite"] == 1.0
    assert torch.isfinite(loss) and torch.isfinite(images.grad).all()
    assert (images.grad[1] == 0).all() and (images.grad[0] != 0).all()
    assert loss.item() == pytest.approx(-(images[[0, 2]].mean(dim=(1, 2, 3)) * 3).sum().item() / 3, rel=1e-6)  # NaN adds 0


class _LogBrightness:
    """log(mean pixel): -inf with an infinite derivative on an all-black image."""

    name, differentiable = "log-brightness", True

    def score(self, images, prompts):
        return torch.log(images.mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("placement", ["in-process", "served"])
def test_a_non_finite_score_leaves_the_generators_gradient_finite(placement):
    from reward_servers.local import InProcessReward

    model = _LogBrightness()
    reward = (InProcessReward(model) if placement == "in-process"
              else RemoteReward(RewardClient(_InProcessTransport(model), "reward-log-brightness")))
    gain = torch.tensor(1.0, requires_grad=True)  # stands in for a generator parameter
    images = _images(2) * gain * torch.tensor([1.0, 0.0]).view(2, 1, 1, 1)  # the second image is black
    loss, metrics = dmdr.WeightedReward(reward, RewardSpec(name="log-brightness", shaping="linear")).loss(images, ["a", "b"])
    loss.backward()
    assert metrics["reward/log-brightness/non_finite"] == 1.0
    # only the first image counts, over the batch of 2: d/d gain of -log(gain * m) / 2 = -1 / (2 gain)
    assert gain.grad.item() == pytest.approx(-0.5, rel=1e-5)


@pytest.mark.parametrize("placement", ["in-process", "served"])
def test_a_reward_without_a_gradient_refuses_images_that_ask_for_one_in_either_placement(placement):
    class Blackbox(_LogBrightness):
        name, differentiable = "blackbox", False

    model = Blackbox()
    reward = (InProcessReward(model) if placement == "in-process"
              else RemoteReward(RewardClient(_InProcessTransport(model), "reward-blackbox")))
    images = _images(2).requires_grad_(True)
    with pytest.raises(RewardInputError, match="reward 'blackbox'.* is not differentiable, so it cannot give a ReFL gradient"):
        reward.score(images, ["a", "b"])
    assert reward.score(images.detach(), ["a", "b"]).shape == (2,)  # scored without one
    with torch.no_grad():
        assert reward.score(images, ["a", "b"]).shape == (2,)


def test_pickscore_matches_clip_with_its_own_processor(tiny_clip_dir, pickscore):
    pytest.importorskip("torchvision")  # (without it transformers falls back to a PIL processor, which resizes otherwise)
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    images = _images()
    scores = pickscore.score(images, PROMPTS)
    processor = CLIPImageProcessor.from_pretrained(tiny_clip_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    pixels = processor(images=list(images.permute(0, 2, 3, 1).numpy()), do_rescale=False, return_tensors="pt")
    tokens = tokenizer(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        reference = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                          pixel_values=pixels["pixel_values"]).logits_per_image.diagonal()
    torch.testing.assert_close(scores, reference, rtol=1e-4, atol=1e-4)
    x = images.clone().requires_grad_(True)
    pickscore.score(x, PROMPTS).sum().backward()
    assert x.grad.abs().sum() > 0  # the differentiable path reaches the pixels


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_the_aesthetic_predictor_matches_clip_with_its_own_processor_and_an_mlp_on_the_normalised_embedding(
        tmp_path, tiny_clip_dir, suffix):
    """The LAION predictor: its MLP (no activations) on CLIP's L2-normalised image embedding, from the predictor's
    state dict (.pth read with weights_only, or safetensors); the prompt plays no part; differentiable."""
    pytest.importorskip("torchvision")
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor, CLIPModel

    from reward_servers import RewardBuildError
    from reward_servers.models.testing import save_tiny_aesthetic_head

    head = save_tiny_aesthetic_head(tmp_path / f"head{suffix}")
    reward = load_reward_model("aesthetic", {"path": str(tiny_clip_dir), "head": str(head), "local_files_only": True},
                               "rewards.0")
    assert reward.name == "aesthetic" and reward.differentiable
    images = _images()
    scores = reward.score(images, PROMPTS)
    assert reward.score(torch.rand(2, 3, 48, 64), PROMPTS[:2]).shape == (2,)  # (any size: resized and cropped)
    processor = CLIPImageProcessor.from_pretrained(tiny_clip_dir)
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    pixels = processor(images=list(images.permute(0, 2, 3, 1).numpy()), do_rescale=False, return_tensors="pt")
    state = torch.load(head, weights_only=True) if suffix == ".pth" else load_file(str(head))
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels["pixel_values"])
        features = features if isinstance(features, torch.Tensor) else features.pooler_output
        x = features / features.norm(dim=-1, keepdim=True)
        for index in (0, 2, 4, 6, 7):  # the predictor's linear layers, nothing between them at inference
            x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    torch.testing.assert_close(scores, x.squeeze(-1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(reward.score(images, ["other"] * 4), scores)  # the prompt plays no part
    grad_input = images.clone().requires_grad_(True)
    reward.score(grad_input, ["x"] * 4).sum().backward()
    assert grad_input.grad.abs().sum() > 0
    # a head for another embedding width, and a directory holding the head under its file name
    wide = save_tiny_aesthetic_head(tmp_path / "wide.pth", width=768)
    with pytest.raises(RewardBuildError, match=r"rewards.0 \(aesthetic\) could not be built: ValueError: the aesthetic "
                                               r"head's weights do not fit its MLP on this CLIP's 16-wide embedding"):
        load_reward_model("aesthetic", {"path": str(tiny_clip_dir), "head": str(wide), "local_files_only": True}, "rewards.0")
    (tmp_path / "repo").mkdir()
    save_tiny_aesthetic_head(tmp_path / "repo" / "aesthetic-model.pth")
    again = load_reward_model("aesthetic", {"path": str(tiny_clip_dir), "head": str(tmp_path / "repo"), "local_files_only": True})
    torch.testing.assert_close(again.score(images, ["x"] * 4), scores)


def test_pickscore_resizes_and_crops_larger_images(pickscore):
    big = torch.rand(2, 3, 48, 64)
    assert pickscore.score(big, PROMPTS[:2]).shape == (2,)


def test_http_codec_round_trips_npy_and_png_and_never_unpickles(monkeypatch):
    from PIL import Image

    images = _images(2)
    decoded = http.decode_images(http.ScoreRequest(**http.encode_request(images, PROMPTS[:2])))
    torch.testing.assert_close(decoded, images)
    as_uint8 = (images * 255).round().to(torch.uint8)
    pngs = []
    for image in as_uint8:
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    decoded = http.decode_images(http.ScoreRequest(**http.encode_request(None, PROMPTS[:2], png=pngs)))
    torch.testing.assert_close(decoded, as_uint8.float() / 255)
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    request = http.ScoreRequest(prompts=["a"], images_npy=base64.b64encode(buffer.getvalue()).decode())
    with pytest.raises(RewardInputError, match="not a base64 .npy"):
        http.decode_images(request)
    with pytest.raises(RewardInputError, match="exactly one"):
        http.decode_images(http.ScoreRequest(prompts=["a"]))
    import pydantic  # a field of another type, or one the request does not have: refused, not read loosely or dropped

    body = http.encode_request(images, PROMPTS[:2])
    for wrong in ({"grad": "yes"}, {"grad": 1}, {"grads": True}):
        with pytest.raises(pydantic.ValidationError):
            http.ScoreRequest.model_validate_json(json.dumps({**body, **wrong}))
    assert http.ScoreRequest.model_validate_json(json.dumps({**body, "grad": True})).grad is True
    # a header claiming 4 x 3 x 8192 x 8192 float64 (6.4 GB) over a few bytes: refused before numpy allocates it
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f8", "fortran_order": False, "shape": (4, 3, 8192, 8192)})
    forged = http.ScoreRequest(prompts=["a"] * 4, images_npy=base64.b64encode(buffer.getvalue() + bytes(64)).decode())
    allocations = []
    real_empty = np.ndarray
    monkeypatch.setattr(np, "ndarray", lambda *args, **kwargs: allocations.append(args) or real_empty(*args, **kwargs))
    with pytest.raises(RewardInputError, match=r"claims \(4, 3, 8192, 8192\) float64 values, more than the 192 bytes"):
        http.decode_images(forged)
    assert allocations == []
    monkeypatch.undo()
    answer = http.decode_answer(http.encode_answer({"scores": torch.tensor([1.0, float("nan")]),
                                                    "grads": torch.ones(2, 3, 2, 2)}))
    assert answer["scores"][0] == 1.0 and torch.isnan(answer["scores"][1]) and answer["grads"].shape == (2, 3, 2, 2)


def test_http_requests_carry_half_precision_images():
    """A generator's images are often bfloat16, which numpy lacks: sent as float32; float16 goes as it is."""
    images = _images(2)
    for dtype, sent in ((torch.bfloat16, np.float32), (torch.float16, np.float16)):
        body = http.encode_request(images.to(dtype), PROMPTS[:2])
        assert http.load_npy(base64.b64decode(body["images_npy"])).dtype == sent
        decoded = http.decode_images(http.ScoreRequest(**body))
        assert decoded.dtype == torch.float32
        torch.testing.assert_close(decoded, images.to(dtype).float(), rtol=0, atol=0)


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def test_http_decoding_takes_only_8_bit_pngs_and_bounds_the_pixels_before_decoding(monkeypatch):
    rgb = (np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)

    def decode(*pngs, **kwargs):
        return http.decode_images(http.ScoreRequest(**http.encode_request(None, ["a"] * len(pngs), png=pngs)), **kwargs)

    assert decode(_encoded(rgb, "PNG")).shape == (1, 3, 8, 8)
    for fmt in ("JPEG", "BMP", "TIFF"):  # never handed to another decoder
        with pytest.raises(RewardInputError, match=r"images_png\[0\] is not a PNG image"):
            decode(_encoded(rgb, fmt))
    sixteen_bit = _encoded((np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000), "PNG")
    with pytest.raises(RewardInputError, match=r"mode 'I;16'.*8-bit PNGs"):
        decode(sixteen_bit)
    # a 4000 x 4000 black PNG is a few kB; it is refused from its header, before 183 MB are decoded
    big = _encoded(np.zeros((4000, 4000), dtype=np.uint8), "PNG")
    assert len(big) < 100_000
    from PIL import PngImagePlugin

    loads = []
    original_load = PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: loads.append(self.size) or original_load(self))
    with pytest.raises(RewardInputError, match="more than 1,000,000 pixels .* rewards\\[\\]\\.serve\\.http_max_pixels"):
        decode(big, max_pixels=1_000_000)
    assert loads == []  # refused from the header: the 16 M pixels were never decoded
    assert decode(_encoded(rgb, "PNG")).shape == (1, 3, 8, 8) and set(loads) == {(8, 8)}  # the spy sees decodes
    assert decode(_encoded(rgb[..., 0] > 128, "PNG")).shape == (1, 3, 8, 8)  # 1-bit
    with pytest.raises(RewardInputError, match="more than 100 pixels"):  # counted over the request's images
        decode(_encoded(rgb, "PNG"), _encoded(rgb, "PNG"), max_pixels=100)
    npy = http.ScoreRequest(**http.encode_request(torch.rand(2, 3, 8, 8), ["a", "b"]))
    with pytest.raises(RewardInputError, match="more than 100 pixels"):
        http.decode_images(npy, max_pixels=100)
    odd_shape = http.ScoreRequest(**http.encode_request(torch.rand(1, 300, 10, 10), ["a"]))
    with pytest.raises(RewardInputError, match="more than 1,000 pixels"):  # counted by values, whatever the shape
        http.decode_images(odd_shape, max_pixels=1000)


USER_REWARD = textwrap.dedent('''
    import torch

    class Brightness:
        """A user's own reward: mean brightness of the image (differentiable)."""
        differentiable = True

        def __init__(self, gain=1.0):
            self.gain = gain

        def score(self, images, prompts):
            return self.gain * images.mean(dim=(1, 2, 3))

    class Blackbox:
        differentiable = False

        def score(self, images, prompts):
            return images.detach().mean(dim=(1, 2, 3))
''')


def test_a_custom_reward_named_only_in_the_config_trains(tmp_path, monkeypatch):
    """Built with its kwargs and trained at its weight and shaping: each logged step's loss has the term
    lambda * (-r) of the logged score, added to L_dmd (a dropped weight or gain would show)."""
    from dmdr_rl.trainer import LocalTrainer

    (tmp_path / "user_rewards_mod.py").write_text(USER_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    overrides = tiny_run("trainer.cold_start=0", f"output.dir={tmp_path / 'run'}")
    cfg = load_config("toy-dmdr", overrides)
    cfg.rewards = [RewardSpec(name="user_rewards_mod:Brightness", weight=0.5, shaping="linear", kwargs={"gain": 2.0})]
    trainer = LocalTrainer(cfg)
    (reward,) = trainer.learner.rewards  # built from the config with its kwargs
    assert reward.model.model.gain == 2.0 and reward.spec.weight == 0.5  # (in-process: the user's model inside)
    summary = trainer.train()
    assert summary["generator_steps"] == 2
    rows = [json.loads(row) for row in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    key = "user_rewards_mod:Brightness"
    assert len(rows) == 2
    for row in rows:  # the reward in the loss at its weight and shaping: lambda * (-r), added to L_dmd
        assert row[f"loss/reward/{key}"] == pytest.approx(-0.5 * row[f"reward/{key}"], rel=1e-5)
        assert row["loss/generator"] == pytest.approx(row["loss/dmd"] + row[f"loss/reward/{key}"], rel=1e-5, abs=1e-7)
        assert 0 < row[f"reward/{key}"] < 2.0  # gain 2 x mean brightness
    cfg.rewards = [RewardSpec(name="user_rewards_mod:Blackbox", weight=0.5)]
    with pytest.raises(ConfigError, match="rewards.0 \\(user_rewards_mod:Blackbox\\) is not differentiable"):
        LocalTrainer(cfg)


def test_hpsv2_matches_open_clip_with_its_own_transforms(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from PIL import Image

    from reward_servers.models.testing import save_tiny_open_clip

    kwargs = save_tiny_open_clip(tmp_path)
    hps = load_reward_model("hpsv2.1", kwargs)
    assert (hps.name, hps.differentiable) == ("hpsv2.1", True)
    images = (_images() * 255).round() / 255  # exact in 8-bit, so the PIL path sees the same pixels
    scores = hps.score(images, PROMPTS)
    # What `hpsv2.score` does: open_clip's eval transform with the longest side resized and the rest padded
    # (its `resize_longest_max`) on PIL images, normalised features, diagonal.
    model, _, preprocess = open_clip.create_model_and_transforms(kwargs["architecture"], pretrained=None,
                                                                 load_weights=False, image_resize_mode="longest")
    model.load_state_dict(torch.load(kwargs["checkpoint"], weights_only=True)["state_dict"])
    model.eval()
    pil = [Image.fromarray((im.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()) for im in images]
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([preprocess(p) for p in pil]), normalize=True)
        text_features = model.encode_text(open_clip.get_tokenizer(kwargs["architecture"])(PROMPTS), normalize=True)
    torch.testing.assert_close(scores, (image_features @ text_features.T).diagonal(), rtol=1e-4, atol=1e-5)
    # not square: the longest side resized and the rest padded, neither squashed nor cropped
    wide = (torch.rand(len(PROMPTS), 3, 24, 40, generator=torch.Generator().manual_seed(0)) * 255).round() / 255
    with torch.no_grad():
        theirs = (model.encode_image(torch.stack([preprocess(_pil(im)) for im in wide]), normalize=True)
                  @ text_features.T).diagonal()
    from reward_servers.models.open_clip_score import OpenClipScore

    squashed = OpenClipScore(**kwargs, resize="squash").score(wide, PROMPTS)
    ours = hps.score(wide, PROMPTS)
    assert (ours - theirs).abs().max() < 0.5 * (squashed - theirs).abs().max()  # (tensor vs PIL bicubic resizing)
    x = images.clone().requires_grad_(True)
    hps.score(x, PROMPTS).sum().backward()
    assert x.grad.abs().sum() > 0
    from reward_servers.models.hps import HPSv2

    with pytest.raises(ValueError, match="HPS version 'v3' is unknown"):
        HPSv2(version="v3", **kwargs)


def test_open_clip_score_matches_open_clip_with_its_own_squash_transform_from_a_safetensors_file(tmp_path):
    open_clip = pytest.importorskip("open_clip")

    from reward_servers.models.testing import save_tiny_open_clip

    kwargs = save_tiny_open_clip(tmp_path, quick_gelu=True)  # DFN5B CLIP-H's activation
    kwargs["checkpoint"] = str(tmp_path / "open_clip_model.safetensors")  # (a bare state dict, as a hub model's)
    reward = load_reward_model("open-clip-score", kwargs)
    assert (reward.name, reward.differentiable) == ("open-clip-score", True)
    images = (torch.rand(3, 3, 24, 40, generator=torch.Generator().manual_seed(0)) * 255).round() / 255  # not square:
    scores = reward.score(images, PROMPTS[:3])  # squashed, neither cropped nor padded
    for other in ("shortest", "longest"):  # (the default matters at this shape)
        assert not torch.allclose(load_reward_model("open-clip-score", {**kwargs, "resize": other}).score(images, PROMPTS[:3]),
                                  scores, atol=1e-3)
    # open_clip's own model and eval transform (resize_mode="squash", DFN5B's), on PIL images
    model, _, preprocess = open_clip.create_model_and_transforms(kwargs["architecture"], pretrained=None,
                                                                 load_weights=False, image_resize_mode="squash")
    from safetensors.torch import load_file

    model.load_state_dict(load_file(kwargs["checkpoint"]))
    model.eval()
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([preprocess(_pil(im)) for im in images]), normalize=True)
        text_features = model.encode_text(open_clip.get_tokenizer(kwargs["architecture"])(PROMPTS[:3]), normalize=True)
    theirs = (image_features @ text_features.T).diagonal()
    torch.testing.assert_close(scores, theirs, rtol=0, atol=0.02)  # (tensor vs PIL bicubic resizing)
    assert (scores - theirs).abs().max() < 0.1 * (theirs.max() - theirs.min())  # closer than the images are apart
    x = images.clone().requires_grad_(True)
    reward.score(x, PROMPTS[:3]).sum().backward()
    assert x.grad.abs().sum() > 0
    import inspect

    from reward_servers.models.open_clip_score import OpenClipScore

    defaults = {k: p.default for k, p in inspect.signature(OpenClipScore).parameters.items()}
    assert (defaults["architecture"], defaults["hub_repo"], defaults["resize"]) == (
        "ViT-H-14-quickgelu", "apple/DFN5B-CLIP-ViT-H-14", "squash")  # the paper's "CLIP": DFN5B CLIP-H, as trained
    plain_gelu = save_tiny_open_clip(tmp_path / "gelu")  # the same seed's weights under GELU: other scores
    assert not torch.allclose(load_reward_model("open-clip-score", plain_gelu).score(images, PROMPTS[:3]), scores)
    from reward_servers import RewardBuildError

    with pytest.raises(RewardBuildError, match="resize='crop' is unknown; allowed: squash, shortest, longest"):
        load_reward_model("open-clip-score", {**kwargs, "resize": "crop"})


@pytest.mark.parametrize("size", [(48, 64), (512, 683), (683, 512), (37, 41)])
def test_clip_preprocess_crops_like_torchvision(size):
    transforms = pytest.importorskip("torchvision.transforms.v2")
    from reward_servers.models.clip import clip_preprocess

    images = torch.rand(1, 3, *size)
    ours = clip_preprocess(images, 32, 32, [0.0] * 3, [1.0] * 3)
    resize = transforms.Resize(32, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True)
    theirs = transforms.CenterCrop(32)(resize(images))
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    # same geometry (resize size, crop offset); tensor bicubic vs torchvision's kernels agree closely
    assert (ours - theirs).abs().mean() < 1e-3


def _pil(image):
    from PIL import Image

    return Image.fromarray((image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


@pytest.mark.parametrize("size", [(40, 59), (59, 40), (64, 94)])  # resized to 47 px: an odd margin of 15
def test_clip_preprocess_has_the_geometry_of_each_models_own_processor(size):
    from transformers import CLIPImageProcessor

    from reward_servers.models.clip import clip_preprocess

    image = (torch.rand(1, 3, *size) * 255).round() / 255
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    # PickScore / CLIP score: transformers' processor floors the crop offset (torchvision rounds it)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=mean,
                                   image_std=std, do_convert_rgb=False)
    theirs = processor(images=_pil(image[0]), return_tensors="pt")["pixel_values"]
    floor = clip_preprocess(image, 32, 32, mean, std, crop_offset="floor")
    rounded = clip_preprocess(image, 32, 32, mean, std, crop_offset="round")
    assert floor.shape == theirs.shape == (1, 3, 32, 32)
    assert (floor - theirs).abs().mean() < 0.03 < (rounded - theirs).abs().mean()  # PIL vs tensor bicubic; a pixel off
    # HPSv2: the longest side resized, black padding around it (open_clip's resize_mode="longest")
    open_clip = pytest.importorskip("open_clip")
    hps_theirs = open_clip.image_transform(32, is_train=False, mean=mean, std=std, resize_mode="longest")(_pil(image[0]))
    ours = clip_preprocess(image, 32, 32, mean, std, resize="longest")
    black = (torch.zeros(3) - torch.tensor(mean)) / torch.tensor(std)
    assert ours.shape == (1, 3, 32, 32) and (ours[0] - hps_theirs).abs().mean() < 0.03
    padded = ours[0, :, :, 0] if size[0] > size[1] else ours[0, :, 0, :]  # a padded edge is black, normalised
    torch.testing.assert_close(padded, black.view(3, 1).expand_as(padded))


def test_a_bf16_model_preprocesses_in_float32():
    from reward_servers.models.clip import clip_preprocess

    image = torch.rand(2, 3, 40, 59)
    pixels = clip_preprocess(image.bfloat16(), 32, 32, [0.5] * 3, [0.25] * 3, dtype=torch.bfloat16)  # resizes on CPU
    assert pixels.dtype == torch.bfloat16
    torch.testing.assert_close(pixels.float(), clip_preprocess(image, 32, 32, [0.5] * 3, [0.25] * 3), atol=0.05, rtol=0)


def test_clip_score_is_pickscores_cosine_without_the_logit_scale(tiny_clip_dir, pickscore):
    clip = load_reward_model("clip-score", {"path": str(tiny_clip_dir), "local_files_only": True})
    assert clip.name == "clip-score" and pickscore.name == "pickscore"
    images = _images()
    scale = pickscore.model.logit_scale.exp().item()
    assert scale != 1.0
    torch.testing.assert_close(clip.score(images, PROMPTS) * scale, pickscore.score(images, PROMPTS))


def test_a_replica_scores_gradient_and_score_only_requests_apart_and_in_chunks(pickscore):
    server = object.__new__(_server_class())  # the replica's logic, without Serve
    server.model, server.max_images, server.calls, server.images = pickscore, 2, 0, 0
    images = [_images(3, seed) for seed in range(3)]
    prompts = [PROMPTS[:3]] * 3
    answers = server._run([(images[0], prompts[0], False), (images[1], prompts[1], True), (images[2], prompts[2], False)])
    assert [sorted(a) for a in answers] == [["scores"], ["grads", "scores"], ["scores"]]
    assert server.calls == 2 and server.images == 9  # one call per group (each scored in chunks of 2)
    for answer, batch in zip(answers, images):
        torch.testing.assert_close(answer["scores"], pickscore.score(batch, PROMPTS[:3]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(answers[1]["grads"], score_and_grad(pickscore, images[1], PROMPTS[:3])[1],
                               rtol=1e-5, atol=1e-7)


class _FailingModel:
    name, differentiable = "failing", True

    def score(self, images, prompts):
        raise RuntimeError("CUDA out of memory (raised on purpose)\nTried to allocate 2.00 GiB")


def test_a_model_that_fails_over_http_is_a_500_naming_the_model_and_its_error():
    from fastapi import HTTPException

    server = _replica_without_serve(_FailingModel())

    async def unbatched(request):  # serve.batch needs a replica's context: the merged call of one request
        return server._score_requests([request])[0]

    server._score_batch = unbatched
    with pytest.raises(HTTPException) as err:
        asyncio.run(_post(server, json.dumps(http.encode_request(_images(2), PROMPTS[:2])).encode()))
    assert err.value.status_code == 500
    assert err.value.detail == "reward model 'failing' failed: RuntimeError: CUDA out of memory (raised on purpose)"


def _server_class():
    """The replica's class under Serve's HTTP ingress wrapper (whose constructor and __del__ are coroutines,
    which only Serve runs)."""
    from reward_servers.serve import RewardServer

    return RewardServer.func_or_class.__mro__[1]


def _replica_without_serve(model):
    """The replica's logic, without Serve."""
    from reward_servers import serve as serve_module

    server = object.__new__(_server_class())
    server.model, server.max_images, server.http_max_pixels = model, None, 2**20
    server.http_slots = asyncio.Semaphore(serve_module.HTTP_REQUESTS_AT_ONCE)
    server.http_body_deadline_s = serve_module.HTTP_BODY_DEADLINE_S
    server.calls = server.images = server.max_batch_images = 0
    return server


async def _post(server, body: bytes, receive=None, declared: int | None = None):
    from starlette.requests import Request

    async def whole_body():
        return {"type": "http.request", "body": body, "more_body": False}

    length = str(len(body) if declared is None else declared).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", length)]
    return await server.score_http(Request({"type": "http", "method": "POST", "headers": headers}, receive or whole_body))


def test_a_replica_reads_decodes_and_scores_a_bounded_number_of_http_requests_at_once():
    """Each request may hold a body of hundreds of MB and its decoded images. One more is answered 503 at once,
    not left waiting in one of the replica's max_ongoing_requests, which the trainer's handle calls need too;
    and a body too large for the pixel limit is a 413 from its Content-Length, busy or not."""
    from fastapi import HTTPException

    from reward_servers import serve as serve_module

    at_once, most, release = 0, 0, asyncio.Event()
    server = _replica_without_serve(load_reward_model("toy-align"))

    async def held(request):  # scoring, held until released
        nonlocal at_once, most
        at_once += 1
        most = max(most, at_once)
        await release.wait()
        at_once -= 1
        return server._score_requests([request])[0]

    server._score_batch = held
    body = json.dumps(http.encode_request(_images(2), PROMPTS[:2])).encode()
    slots = serve_module.HTTP_REQUESTS_AT_ONCE

    async def many():
        admitted = [asyncio.create_task(_post(server, body)) for _ in range(slots)]
        for _ in range(200):  # until every admitted request has reached the model
            await asyncio.sleep(0.01)
            if at_once == slots:
                break
        refused = await asyncio.gather(*(_post(server, body) for _ in range(2 * slots)), return_exceptions=True)
        too_large = await asyncio.gather(_post(server, b"", declared=http.max_body_bytes(server.http_max_pixels) + 1),
                                         return_exceptions=True)
        release.set()
        return await asyncio.gather(*admitted), refused, too_large[0]

    answers, refused, too_large = asyncio.run(asyncio.wait_for(many(), 60))
    assert most == slots and len(answers) == slots and all(len(a["scores"]) == 2 for a in answers)
    assert all(isinstance(r, HTTPException) and r.status_code == 503 and r.headers == {"Retry-After": "1"}
               and "retry after Retry-After seconds" in r.detail for r in refused)
    assert isinstance(too_large, HTTPException) and too_large.status_code == 413
    assert asyncio.run(_post(server, body))["scores"] is not None  # the slots are free again


def test_a_body_that_does_not_arrive_in_time_is_a_408_and_frees_its_slot():
    from fastapi import HTTPException

    from reward_servers import serve as serve_module

    server = _replica_without_serve(load_reward_model("toy-align"))
    server.http_body_deadline_s = 0.2

    async def trickle():  # a first chunk, then nothing more
        trickle.calls += 1
        if trickle.calls == 1:
            return {"type": "http.request", "body": b'{"prompts": ', "more_body": True}
        await asyncio.sleep(3600)

    trickle.calls = 0
    with pytest.raises(HTTPException) as err:
        asyncio.run(asyncio.wait_for(_post(server, b"", receive=trickle, declared=1000), 30))
    assert err.value.status_code == 408 and "did not arrive within 0.2 s" in err.value.detail
    assert not server.http_slots.locked() and server.http_slots._value == serve_module.HTTP_REQUESTS_AT_ONCE


def test_an_image_without_pixels_is_a_clear_input_error():
    with pytest.raises(RewardInputError, match="height and width of at least 1 pixel"):
        reward_model(RewardSpec(name="toy-align")).score(torch.zeros(1, 3, 0, 32), ["a red circle"])


@pytest.mark.parametrize("grad", [False, True])
def test_a_model_that_raises_is_named_with_its_own_error_chained_and_out_of_memory_passes_as_it_is(grad):
    from reward_servers.protocol import RewardScoreError

    class Raising:
        name, differentiable = "raising", True

        def __init__(self, error):
            self.error = error

        def score(self, images, prompts):
            raise self.error

    images = _images()[:2].requires_grad_(grad)
    with pytest.raises(RewardScoreError, match=r"^reward model 'raising' raised while scoring 2 images: KeyError: 'x' "
                                               r"\(the traceback above is the model's own\)$") as caught:
        InProcessReward(Raising(KeyError("x"))).score(images, PROMPTS[:2])
    assert isinstance(caught.value.__cause__, KeyError)
    with pytest.raises(torch.OutOfMemoryError):  # (the device's: a caller may retry with fewer images)
        InProcessReward(Raising(torch.OutOfMemoryError("CUDA out of memory"))).score(images, PROMPTS[:2])


def test_a_score_function_named_as_a_reward_is_told_to_name_a_class(tmp_path, monkeypatch):
    (tmp_path / "fn_rewards.py").write_text("def brightness(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from reward_servers.registry import check_reward

    refused = r"^rewards.0.name: 'fn_rewards:brightness' is a function of images and prompts, a score function itself; name a"
    with pytest.raises(ConfigError, match=refused):
        check_reward("fn_rewards:brightness", {}, "rewards.0")  # the dry run's check
    with pytest.raises(ConfigError, match=refused):
        load_reward_model("fn_rewards:brightness", {}, "rewards.0")  # and the build's (sample --reward, a replica)
