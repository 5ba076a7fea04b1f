import numpy as np
import pytest

from dmdr_rl.toy.render import RESOLUTION, render, render_batch
from dmdr_rl.toy.scene import COLOURS, POSITIONS, PairScene, SingleScene, ToyObject


def _object_mask(image, background_seed_image=None):
    # Objects are saturated; the background is grey: saturation separates them.
    saturation = image.max(axis=0) - image.min(axis=0)
    return saturation > 0.35


def test_render_is_deterministic_per_seed_and_varies_across_seeds():
    scene = SingleScene(ToyObject("triangle", "green"), "large", "center")
    a, b, c = render(scene, 5), render(scene, 5), render(scene, 6)
    assert a.shape == (3, RESOLUTION, RESOLUTION) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 0.01
    assert 0.0 <= a.min() and a.max() <= 1.0


@pytest.mark.parametrize("position", list(POSITIONS))
def test_single_object_lands_at_its_position(position):
    scene = SingleScene(ToyObject("circle", "red"), "small", position)
    mask = _object_mask(render(scene, 11))
    ys, xs = np.nonzero(mask)
    cx, cy = POSITIONS[position]
    assert abs(xs.mean() + 0.5 - cx) < 2.5 and abs(ys.mean() + 0.5 - cy) < 2.5


@pytest.mark.parametrize("colour", list(COLOURS))
def test_object_pixels_have_the_named_colour(colour):
    image = render(SingleScene(ToyObject("square", colour), "large", "center"), 3)
    mean_rgb = image[:, 14:18, 14:18].reshape(3, -1).mean(axis=1)
    distances = {name: np.linalg.norm(mean_rgb - np.array(rgb)) for name, rgb in COLOURS.items()}
    assert min(distances, key=distances.get) == colour


def test_large_is_larger_than_small():
    areas = {}
    for size in ("small", "large"):
        areas[size] = np.mean([_object_mask(render(SingleScene(ToyObject("diamond", "blue"), size, "center"), s)).sum() for s in range(5)])
    assert areas["large"] > 2 * areas["small"]


def test_shapes_differ_in_area_ratio_to_bounding_box():
    # A triangle fills about half its box, a circle pi/4, a square nearly all of it.
    fill = {}
    for shape in ("circle", "square", "triangle"):
        ratios = []
        for seed in range(8):  # average over the rotation jitter
            mask = _object_mask(render(SingleScene(ToyObject(shape, "yellow"), "large", "center"), seed))
            ys, xs = np.nonzero(mask)
            ratios.append(mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)))
        fill[shape] = np.mean(ratios)
    assert fill["triangle"] < fill["circle"] < fill["square"]


@pytest.mark.parametrize("relation, axis, first_is_lower", [("left of", 1, True), ("right of", 1, False), ("above", 0, True), ("below", 0, False)])
def test_pair_relations_place_objects_accordingly(relation, axis, first_is_lower):
    scene = PairScene(ToyObject("circle", "red"), relation, ToyObject("square", "blue"))
    image = render(scene, 2)
    red = (image[0] > 0.6) & (image[2] < 0.4)
    blue = (image[2] > 0.6) & (image[0] < 0.4)
    assert red.sum() > 10 and blue.sum() > 10  # both objects found (an empty mask's NaN centre compares False)
    red_c = np.argwhere(red).mean(axis=0)[axis]
    blue_c = np.argwhere(blue).mean(axis=0)[axis]
    assert (red_c < blue_c) == first_is_lower


def test_render_batch_checks_lengths():
    scene = SingleScene(ToyObject("circle", "red"), "small", "center")
    assert render_batch([scene, scene], [0, 1]).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="2 scenes but 1 seeds"):
        render_batch([scene, scene], [0])
