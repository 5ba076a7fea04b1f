import pytest

from dmdr_rl.toy.grammar import (
    HELD_OUT_OBJECTS,
    PromptSplit,
    all_pair_scenes,
    all_single_scenes,
    is_held_out,
    prompt_to_scene,
    scene_to_prompt,
)
from dmdr_rl.toy.scene import COLOUR_NAMES, POSITION_NAMES, RELATIONS, SHAPES, SIZES, PairScene, SingleScene, ToyObject


def test_vocabulary_sizes_meet_the_spec():
    assert len(SHAPES) >= 4 and len(COLOUR_NAMES) >= 6 and len(SIZES) >= 2 and len(POSITION_NAMES) >= 5
    assert set(RELATIONS) == {"left of", "right of", "above", "below"}


def test_every_prompt_round_trips_through_the_grammar():
    scenes = all_single_scenes() + all_pair_scenes()
    prompts = [scene_to_prompt(s) for s in scenes]
    assert len(set(prompts)) == len(prompts)
    for scene, prompt in zip(scenes, prompts):
        assert prompt_to_scene(prompt) == scene


def test_parse_is_case_and_space_tolerant():
    assert prompt_to_scene("  A Small RED circle in the  center ") == SingleScene(ToyObject("circle", "red"), "small", "center")


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("a small mauve circle in the center", "unknown word"),
        ("a small red hexagon in the center", "'hexagon'"),
        ("", "empty prompt"),
        ("red circle a small", "not the toy grammar"),
    ],
)
def test_bad_prompts_raise_clear_errors(prompt, message):
    with pytest.raises(ValueError, match=message):
        prompt_to_scene(prompt)


def test_unknown_attribute_value_names_the_field():
    with pytest.raises(ValueError, match="unknown colour 'mauve'"):
        ToyObject("circle", "mauve")


def test_pair_canonical_frame():
    a, b = ToyObject("circle", "red"), ToyObject("square", "blue")
    assert PairScene(a, "left of", b).canonical == (a, b)
    assert PairScene(a, "right of", b).canonical == (b, a)
    assert PairScene(a, "below", b).canonical == (b, a)
    assert PairScene(a, "below", b).layout == "vertical"


def test_splits_are_disjoint_and_held_out_objects_never_appear_held_in():
    held_in, held_out = PromptSplit("held-in"), PromptSplit("held-out")
    assert len(held_in) > 0 and len(held_out) > 0
    inside = set(map(scene_to_prompt, held_in.single + held_in.pair))
    outside = set(map(scene_to_prompt, held_out.single + held_out.pair))
    assert not inside & outside
    assert len(inside | outside) == len(all_single_scenes()) + len(all_pair_scenes())
    for scene in held_in.single + held_in.pair:
        assert not any(obj in HELD_OUT_OBJECTS for obj in scene.objects)
    assert all(is_held_out(s) for s in held_out.single + held_out.pair)


def test_split_sampling_is_seeded_and_balanced():
    split = PromptSplit("held-in")
    assert split.sample(50, seed=3) == split.sample(50, seed=3)
    assert split.sample(50, seed=3) != split.sample(50, seed=4)
    kinds = [isinstance(s, SingleScene) for s in split.sample(100, seed=0)]
    assert sum(kinds) == 50


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="held-in, held-out"):
        PromptSplit("train")
