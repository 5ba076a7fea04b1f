"""rewards[].relative, SRPO's semantic relative preference: (1 + k) r(x, positive) - r(x, negative), against
the equation; its draws; the embedding form the paper's code computes for HPSv2.1; the generator step and the
trainer with it; its config, presets and prompt check."""

import itertools

import pytest
import torch

from dmdr_rl import dmdr
from dmdr_rl.config import ConfigError, CriticSection, DmdSection, RelativeSpec, RewardSpec, StudentSection, load_config

PROMPTS = ["a small red circle in the center", "a blue square above a green triangle", "a large cyan diamond"]
RELATIVE = RelativeSpec(positive=["good {prompt}", "fine {prompt}!"],
                        negative=["bad {prompt}", "awful {prompt}", "poor: {prompt}"], k=0.25)


class TextReward:
    """A score that depends on the image (non-linearly) and on the text read: each reading its own score."""

    name, differentiable = "text-reward", True

    def __init__(self):
        self.calls = []

    def score(self, images, prompts):
        self.calls.append((images.shape[0], list(prompts)))
        channel = torch.tensor([len(p) % 3 for p in prompts])
        weight = torch.tensor([1 + len(p) / 10 + p.count("o") for p in prompts], dtype=images.dtype)
        return (images[torch.arange(len(prompts)), channel] ** 2).mean(dim=(1, 2)) * weight


def _reward(**spec):
    model = TextReward()
    return dmdr.WeightedReward(model, RewardSpec(name="text-reward", relative=RELATIVE, **spec)), model


def _images(n=len(PROMPTS), seed=0):
    return torch.rand((n, 3, 8, 8), generator=torch.Generator().manual_seed(seed))


def _read(model, image, text):
    return model.score(image[None], [text])[0]


def test_each_image_is_scored_against_its_drawn_readings_in_one_call_with_their_gradient():
    reward, model = _reward(prompt_template="photo of {prompt}")
    words = torch.tensor([[0, 2], [1, 0], [1, 1]])
    images = _images().requires_grad_(True)
    scores = reward.score(images, PROMPTS, words)
    assert model.calls == [(6, ["good photo of " + PROMPTS[0], "fine photo of " + PROMPTS[1] + "!",
                                "fine photo of " + PROMPTS[2] + "!", "poor: photo of " + PROMPTS[0],
                                "bad photo of " + PROMPTS[1], "awful photo of " + PROMPTS[2]])]
    (grad,) = torch.autograd.grad(scores.sum(), images)
    # the equation, one image and one reading at a time
    expected = torch.stack([
        1.25 * _read(model, images[i], RELATIVE.positive[w[0]].replace("{prompt}", "photo of " + prompt))
        - _read(model, images[i], RELATIVE.negative[w[1]].replace("{prompt}", "photo of " + prompt))
        for i, (prompt, w) in enumerate(zip(PROMPTS, words.tolist()))])
    (expected_grad,) = torch.autograd.grad(expected.sum(), images)
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert grad.abs().sum() > 0
    plain = dmdr.WeightedReward(model, RewardSpec(name="text-reward")).score(images, PROMPTS)
    assert not torch.allclose(scores, plain)


def test_without_drawn_words_the_score_is_the_mean_over_every_reading_which_the_draws_estimate_without_bias():
    reward, model = _reward()
    images = _images()
    scores = reward.score(images, PROMPTS)
    assert model.calls == [(15, RELATIVE.readings(PROMPTS))]  # one call: 2 positive + 3 negative readings of each
    positive = torch.stack([torch.stack([_read(model, images[i], t.replace("{prompt}", p)) for t in RELATIVE.positive])
                            for i, p in enumerate(PROMPTS)]).mean(1)
    negative = torch.stack([torch.stack([_read(model, images[i], t.replace("{prompt}", p)) for t in RELATIVE.negative])
                            for i, p in enumerate(PROMPTS)]).mean(1)
    torch.testing.assert_close(scores, 1.25 * positive - negative)
    # every pair of words equally likely: the pairs' mean is the score itself
    pairs = [reward.score(images, PROMPTS, torch.tensor([[i, j]] * len(PROMPTS)))
             for i, j in itertools.product(range(2), range(3))]
    torch.testing.assert_close(torch.stack(pairs).mean(0), scores)


def test_words_are_drawn_uniformly_per_image_and_a_reward_without_relative_draws_nothing():
    generator = torch.Generator().manual_seed(0)
    plain = dmdr.WeightedReward(TextReward(), RewardSpec(name="text-reward"))
    state = generator.get_state()
    assert plain.draw_words(4, generator) is None
    assert torch.equal(generator.get_state(), state)  # the other draws of a step stay as they were
    words = _reward()[0].draw_words(6000, generator)
    assert words.shape == (6000, 2) and words.dtype == torch.int64
    for column, count in ((0, 2), (1, 3)):
        frequencies = torch.bincount(words[:, column], minlength=count).float() / 6000
        assert frequencies.numel() == count
        sigma = (1 / count * (1 - 1 / count) / 6000) ** 0.5
        assert ((frequencies - 1 / count).abs() < 5 * sigma).all(), frequencies
    assert (words[:, 0] != words[:, 1] % 2).any()  # the two columns are not one draw


def test_relative_hpsv2_is_the_papers_embedding_form(tmp_path):
    """The DMDR paper's code (SRPO): diag(f_img(x) @ ((1 + k) f_txt(positive) - f_txt(negative)).T), normalised
    features. The score difference is that form for a cosine score; checked on a tiny HPSv2 (open_clip)."""
    pytest.importorskip("open_clip")
    from reward_servers import load_reward_model
    from reward_servers.models.testing import save_tiny_open_clip

    hps = load_reward_model("hpsv2.1", save_tiny_open_clip(tmp_path))
    spec = RewardSpec(name="hpsv2.1", relative={})  # the paper's code's words and k
    reward = dmdr.WeightedReward(hps, spec)
    images = torch.rand((len(PROMPTS), 3, 32, 32), generator=torch.Generator().manual_seed(1))
    words = torch.tensor([[0, 1], [2, 0], [1, 2]])
    scores = reward.score(images, PROMPTS, words)

    def text_features(templates, column):
        texts = [templates[i].replace("{prompt}", p) for i, p in zip(words[:, column].tolist(), PROMPTS)]
        return hps.model.encode_text(hps.tokenizer(texts), normalize=True)

    with torch.no_grad():
        image_features = torch.stack([hps.model.encode_image(hps_pixels(hps, image[None]), normalize=True)[0]
                                      for image in images])
        srpo_text = 1.1 * text_features(spec.relative.positive, 0) - text_features(spec.relative.negative, 1)
    torch.testing.assert_close(scores, (image_features @ srpo_text.T).diagonal(), rtol=1e-4, atol=1e-5)
    assert spec.relative.positive == ["Natural-lighting. {prompt}", "Detailed. {prompt}", "Realistic. {prompt}"]
    assert spec.relative.negative == ["Painting. {prompt}", "CG Render. {prompt}", "Oil. {prompt}"]


def hps_pixels(hps, images):
    from reward_servers.models.clip import clip_preprocess

    return clip_preprocess(images, hps.size, hps.size, hps.mean, hps.std, resize=hps.resize)


def test_the_generator_step_draws_each_images_words_once_for_the_batch_and_micro_batches_keep_them(backbone):
    prompts = PROMPTS + PROMPTS[:2]
    cond, student = backbone.encode(prompts), StudentSection(steps=2)
    traj = dmdr.backward_simulation(backbone, cond, student, torch.Generator().manual_seed(0))
    reward, model = _reward(weight=2.0, shaping="linear")

    def step(micro, seed=2):
        model.calls.clear()
        for p in backbone.trainable_parameters(dmdr.GENERATOR):
            p.grad = None
        loss, metrics = dmdr.generator_loss(backbone, traj, cond, prompts, 3, student, CriticSection(), DmdSection(),
                                            [reward], True, torch.Generator().manual_seed(seed), micro_batch_size=micro,
                                            backward=torch.Tensor.backward)
        grads = [p.grad.clone() for p in backbone.trainable_parameters(dmdr.GENERATOR)]
        return loss, metrics, grads, [text for _, texts in model.calls for text in texts]

    whole, whole_metrics, whole_grads, whole_read = step(None)
    assert len(whole_read) == 2 * len(prompts)  # two readings an image: its positive, then its negative
    for prompt, positive, negative in zip(prompts, whole_read[:5], whole_read[5:]):
        assert positive in [t.replace("{prompt}", prompt) for t in RELATIVE.positive]
        assert negative in [t.replace("{prompt}", prompt) for t in RELATIVE.negative]
    micro, micro_metrics, micro_grads, micro_read = step(2)
    assert sorted(micro_read) == sorted(whole_read)  # the same words, whatever the slices
    torch.testing.assert_close(micro, whole, rtol=1e-5, atol=1e-7)
    for name in ("loss/reward/text-reward", "reward/text-reward", "loss/dmd"):
        assert float(micro_metrics[name]) == pytest.approx(float(whole_metrics[name]), rel=1e-5), name
    for a, b in zip(micro_grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in whole_grads)
    others = {tuple(step(None, seed)[3]) for seed in range(3, 8)}
    assert len(others | {tuple(whole_read)}) > 1  # the draws are the step's: another seed, other words


def test_a_trainer_trains_on_drawn_readings_and_monitors_with_every_reading(tmp_path):
    from dmdr_rl.toy.teacher import ToyBackbone, create_teacher_transformer
    from dmdr_rl.toy.text import ToyTextEncoder
    from dmdr_rl.trainer import LocalTrainer

    cfg = load_config("toy-dmdr", [f"output.dir={tmp_path}", "trainer.batch_size=2", "trainer.max_steps=1",
                                   "trainer.cold_start=0", "dmd.ratio=1", "student.steps=2", "output.sample_every=100"])
    model = TextReward()
    spec = RewardSpec(name="text-reward", shaping="linear", monitor=True, relative=RELATIVE)
    trainer = LocalTrainer(cfg, ToyBackbone(create_teacher_transformer(seed=0), ToyTextEncoder.create(seed=0)),
                           [dmdr.WeightedReward(model, spec)])
    trainer.train()
    batch = trainer.prompts.batch(0, 2)
    # the start's check (2 images), the rollout's monitoring, the generator update, the closing sample grid (16)
    probe, monitor, train, grid = model.calls
    assert monitor == (10, RELATIVE.readings(batch)) and probe[0] == 10
    assert grid == (80, RELATIVE.readings(trainer.prompts.batch(-1, 16)))
    assert train[0] == 4 and all(
        text in [t.replace("{prompt}", prompt) for t in templates]
        for text, prompt, templates in zip(train[1], batch * 2, [RELATIVE.positive] * 2 + [RELATIVE.negative] * 2))


def test_relative_is_validated_and_set_by_override(tmp_path):
    cfg = load_config("toy-dmdr", ["rewards.0.relative={}"])
    assert cfg.rewards[0].relative == RelativeSpec()
    cfg = load_config("toy-dmdr", ["rewards.0.relative={k: 0, positive: ['{prompt}, by day']}"])
    assert (cfg.rewards[0].relative.k, cfg.rewards[0].relative.positive) == (0, ["{prompt}, by day"])
    for override, message in (("rewards.0.relative={positive: ['{prompt}', Realistic]}", r"item 1 \('Realistic'\) must hold '\{prompt\}' once"),
                              ("rewards.0.relative={negative: []}", "at least 1 item"),
                              ("rewards.0.relative={k: -1}", "greater than or equal to 0"),
                              ("rewards.0.relative={words: [a]}", "words")):
        with pytest.raises(ConfigError, match=message):
            load_config("toy-dmdr", [override])
    # the reward's check of the run's prompts reads every reading: toy-align cannot read a style word
    from dmdr_rl.prompts import checked_prompt_source

    (tmp_path / "prompts.txt").write_text("a red circle left of a cyan diamond\n")
    checked_prompt_source(load_config("toy-dmdr", [f"data.prompts={tmp_path / 'prompts.txt'}"]))
    with pytest.raises(ConfigError, match=r"cannot read this prompt: unknown word\(s\) \['natural-lighting.'\] in "
                                          r"prompt 'Natural-lighting. a red circle left of a cyan diamond'"):
        checked_prompt_source(load_config("toy-dmdr", [f"data.prompts={tmp_path / 'prompts.txt'}",
                                                       "rewards.0.relative={}"]))


@pytest.mark.parametrize("preset, base", [("sd3-medium-dmdr-srpo", "sd3-medium-dmdr"),
                                          ("sd35-large-dmdr-srpo", "sd35-large-dmdr")])
def test_the_srpo_presets_are_the_papers_srpo_scripts_over_their_refl_recipe(preset, base):
    srpo, refl = load_config(preset), load_config(base)
    clip, hps = srpo.rewards
    assert (clip.name, clip.weight, clip.relative, clip.prompt_template) == ("open-clip-score", 0.1, None, "{prompt}")
    assert (hps.name, hps.weight, hps.shaping, hps.margin) == ("hpsv2.1", 5.0, "hinge", 0.7)
    assert hps.relative == RelativeSpec() and hps.relative.k == 0.1
    assert hps.prompt_template == "{prompt}"  # the SRPO script reads the prompt itself, not "Realistic photo ..."
    assert (srpo.trainer.max_steps, srpo.trainer.cold_start, srpo.output.sample_every, srpo.output.checkpoint_every) == (
        2300, 2000, 20, 50)
    # everything else is the ReFL recipe's
    for section in ("model", "student", "critic", "dmd", "ray", "data"):
        assert getattr(srpo, section) == getattr(refl, section), section
    same = {k: v for k, v in srpo.trainer.model_dump().items() if k != "max_steps"}
    assert same == {k: v for k, v in refl.trainer.model_dump().items() if k != "max_steps"}
    for ours, theirs in zip(srpo.rewards, refl.rewards):
        assert ours.serve == theirs.serve and ours.placement == theirs.placement == "serve"
