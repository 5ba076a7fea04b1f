import pytest
import torch

from dmdr_rl.toy.classifier import HEADS, IGNORE, AlignReward, AttributeClassifier, attribute_loss, augment, scene_labels
from dmdr_rl.toy.grammar import prompt_to_scene
from dmdr_rl.toy.metrics import judge_verdicts, summarise_verdicts
from dmdr_rl.toy.scene import PairScene, SingleScene, ToyObject


def _one_hot_judge(predictions: list[dict[str, str]]):
    """A stand-in judge whose logits spell out the given predictions."""

    class Fixed(AttributeClassifier):
        def forward(self, images):
            return {
                head: torch.stack([torch.nn.functional.one_hot(torch.tensor(values.index(p[head])), len(values)).float()
                                   for p in predictions])
                for head, values in HEADS.items()
            }

    return Fixed()


_DEFAULTS = {head: values[0] for head, values in HEADS.items()}


def test_labels_follow_the_canonical_frame_and_ignore_inapplicable_heads():
    scenes = [prompt_to_scene("a blue square right of a red circle"), prompt_to_scene("a large red circle in the center")]
    labels = scene_labels(scenes)
    assert labels["layout"][0] == HEADS["layout"].index("horizontal")
    assert labels["first_shape"][0] == HEADS["first_shape"].index("circle")  # the left object
    assert labels["second_colour"][0] == HEADS["second_colour"].index("blue")
    assert labels["size"][0] == IGNORE and labels["layout"][1] == IGNORE
    assert labels["size"][1] == HEADS["size"].index("large")


def test_pair_verdicts_separate_presence_binding_and_relation():
    scene = PairScene(ToyObject("circle", "red"), "left of", ToyObject("square", "blue"))
    exact = {**_DEFAULTS, "count": "two", "layout": "horizontal", "first_shape": "circle", "first_colour": "red",
             "second_shape": "square", "second_colour": "blue"}
    swapped = {**exact, "first_shape": "square", "first_colour": "blue", "second_shape": "circle", "second_colour": "red"}
    unbound = {**exact, "first_colour": "blue", "second_colour": "red"}
    missing = {**exact, "second_shape": "triangle"}
    one_seen = {**exact, "count": "one"}  # everything else right, but the judge sees one object
    verdicts = judge_verdicts(_one_hot_judge([exact, swapped, unbound, missing, one_seen]), torch.zeros(5, 3, 32, 32),
                              [scene] * 5)
    assert verdicts[0] == {"pair/count": True, "pair/both_present": True, "pair/colour_binding": True, "pair/relation": True, "correct": True}
    assert verdicts[1]["pair/colour_binding"] and not verdicts[1]["pair/relation"] and not verdicts[1]["correct"]
    assert verdicts[2]["pair/both_present"] and not verdicts[2]["pair/colour_binding"]
    assert not verdicts[3]["pair/both_present"]
    assert verdicts[4]["pair/relation"] and not verdicts[4]["pair/count"] and not verdicts[4]["correct"]


def test_single_verdict_needs_every_attribute_and_the_count():
    scene = SingleScene(ToyObject("triangle", "green"), "small", "top left")
    right = {**_DEFAULTS, "count": "one", "shape": "triangle", "colour": "green", "size": "small", "position": "top left"}
    wrong_size = {**right, "size": "large"}
    two_objects = {**right, "count": "two"}
    verdicts = judge_verdicts(_one_hot_judge([right, wrong_size, two_objects]), torch.zeros(3, 3, 32, 32), [scene] * 3)
    assert [v["correct"] for v in verdicts] == [True, False, False]
    accuracy, by_category = summarise_verdicts(verdicts)
    assert accuracy == pytest.approx(1 / 3)
    assert by_category["single/size"] == pytest.approx(2 / 3) and by_category["single/count"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("arch", ["judge", "align"])
def test_classifier_learns_a_fixed_batch(arch):
    from dmdr_rl.toy.grammar import PromptSplit
    from dmdr_rl.toy.render import render_batch

    torch.manual_seed(0)
    model = AttributeClassifier(arch=arch)
    scenes = PromptSplit("held-in").sample(16, seed=0)
    images, labels = render_batch(scenes, range(16)), scene_labels(scenes)
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    first = None
    for _ in range(40):
        loss, _ = attribute_loss(model(images), labels)
        first = first if first is not None else loss.item()
        optimizer.zero_grad(), loss.backward(), optimizer.step()
    assert loss.item() < 0.3 * first


def test_unknown_arch_is_rejected():
    with pytest.raises(ValueError, match="judge, align"):
        AttributeClassifier(arch="vit")


def test_augment_keeps_range_and_is_seeded():
    images = torch.rand(4, 3, 32, 32)
    a = augment(images.clone(), torch.Generator().manual_seed(1))
    b = augment(images.clone(), torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1 and not torch.equal(a, images)


def test_align_reward_is_mean_log_prob_and_differentiable():
    torch.manual_seed(0)
    reward = AlignReward(AttributeClassifier(arch="align").eval())
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    prompts = ["a small red circle in the center", "a red circle left of a blue square"]
    scores = reward.score(images, prompts)
    assert scores.shape == (2,) and (scores <= 0).all()
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    # Against the definition: mean over the prompt's heads of log softmax at the true class.
    logits = reward.classifier(images.detach())
    labels = scene_labels([prompt_to_scene(prompts[0])])
    expected = torch.stack([torch.log_softmax(logits[h][0], 0)[labels[h][0]] for h in HEADS if labels[h][0] != IGNORE]).mean()
    assert scores[0].item() == pytest.approx(expected.item(), abs=1e-5)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        reward.score(images, prompts[:1])


def test_a_random_mismatch_is_never_the_same_image_worded_the_other_way():
    import random

    from dmdr_rl.toy.metrics import mismatch

    scene = PairScene(ToyObject("circle", "red"), "left of", ToyObject("square", "blue"))
    mirrored = PairScene(ToyObject("square", "blue"), "right of", ToyObject("circle", "red"))
    assert scene != mirrored and (scene.layout, scene.canonical) == (mirrored.layout, mirrored.canonical)
    rng = random.Random(0)
    drawn = [mismatch(scene, rng, hard=False) for _ in range(5000)]  # the pool holds ~2200 pair scenes
    assert all((d.layout, d.canonical) != (scene.layout, scene.canonical) for d in drawn)


def test_judge_transfer_measures_what_toy_align_ascent_does_to_the_judge(judge, align):
    from dmdr_rl.evaluation import fresh_renders
    from dmdr_rl.toy.check import judge_transfer
    from dmdr_rl.toy.grammar import PromptSplit

    scenes = PromptSplit("held-out").sample(16, seed=3)
    images = fresh_renders([*scenes[1:], scenes[0]], 3)  # other scenes' renders: the reward has room to climb
    unmoved = judge_transfer(judge, align, images, scenes, eps=0.0)
    assert unmoved["align_after"] == unmoved["align_before"] and unmoved["judge_after"] == unmoved["judge_before"]
    moved = judge_transfer(judge, align, images, scenes, eps=4 / 255)
    assert moved["align_after"] > moved["align_before"] + 0.1


def test_the_evaluator_checks_show_their_progress(judge, align, capsys):
    from dmdr_rl.evaluation import fresh_renders
    from dmdr_rl.toy.check import check_evaluators, judge_transfer
    from dmdr_rl.toy.grammar import PromptSplit

    check_evaluators(num_images=8, seed=0, judge=judge, align=align)
    shown = capsys.readouterr().err  # a bar on stderr: the 2000-image default takes ~30 s
    assert "checking evaluators" in shown and "held-out: FID" in shown
    scenes = PromptSplit("held-out").sample(4, seed=0)
    judge_transfer(judge, align, fresh_renders(scenes, 0), scenes)
    assert "toy-align ascent" in capsys.readouterr().err
