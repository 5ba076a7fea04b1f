import math

import pytest
import torch

from dmdr_rl.toy.classifier import AttributeClassifier
from dmdr_rl.toy.grammar import PromptSplit
from dmdr_rl.toy.metrics import judge_fid
from dmdr_rl.toy.render import render_batch


def test_fid_is_small_between_render_sets_and_large_against_noise():
    torch.manual_seed(0)
    judge = AttributeClassifier(arch="judge").eval()  # random features still separate these
    scenes = PromptSplit("held-in").sample(300, seed=0)
    real_a = render_batch(scenes, range(300))
    real_b = render_batch(scenes, range(1000, 1300))
    noise = torch.rand(300, 3, 32, 32)
    same = judge_fid(judge, real_b, real_a)
    different = judge_fid(judge, noise, real_a)
    assert same >= 0 and different > 10 * same


def test_fid_of_a_set_against_itself_is_never_below_zero():
    """With fewer images than feature dimensions the covariances are singular and rounding can dip below 0."""
    torch.manual_seed(0)
    judge = AttributeClassifier(arch="judge").eval()
    renders = render_batch(PromptSplit("held-in").sample(40, seed=0), range(40))
    assert 0.0 <= judge_fid(judge, renders, renders) < 1e-2


def test_a_fid_that_is_not_a_number_stays_one_rather_than_a_perfect_zero():
    """Features that are not finite (a broken judge) give NaN: not 0, the best FID, and not the segmentation fault
    that the matrix square root of a NaN covariance gives."""
    torch.manual_seed(0)
    judge = AttributeClassifier(arch="judge").eval()
    with torch.no_grad():
        next(judge.parameters()).fill_(float("nan"))
    renders = render_batch(PromptSplit("held-in").sample(40, seed=0), range(40))
    assert math.isnan(judge_fid(judge, renders, renders))


def test_diversity_is_the_generated_features_total_variance_over_the_renders(judge):
    """tr Cov(generated) / tr Cov(reference) of the judge's features, against a float64 reference computed from the
    features themselves; about 1 for renders of the same prompts, 0 for one image repeated, lower for a collapse
    onto a few scenes."""
    from dmdr_rl.toy.classifier import JudgeFeatures
    from dmdr_rl.toy.metrics import judge_feature_statistics

    scenes = PromptSplit("held-in").sample(200, seed=0)
    reference, renders = render_batch(scenes, range(200)), render_batch(scenes, range(1000, 1200))
    collapsed = render_batch(scenes[:3] * 67, range(2000, 2201))[:200]
    with torch.no_grad():
        features = JudgeFeatures(judge)
        expected = (features(collapsed).double().var(dim=0).sum() / features(reference).double().var(dim=0).sum()).item()
    assert judge_feature_statistics(judge, collapsed, reference)["diversity"] == pytest.approx(expected, rel=1e-6)
    same = judge_feature_statistics(judge, renders, reference)
    assert 0.8 < same["diversity"] < 1.25 and same["fid"] == pytest.approx(judge_fid(judge, renders, reference))
    assert judge_feature_statistics(judge, reference[:1].repeat(200, 1, 1, 1), reference)["diversity"] == 0.0
    # renders the judge cannot tell apart: no spread to compare with (NaN, not a division by zero)
    assert math.isnan(judge_feature_statistics(judge, renders, reference[:1].repeat(200, 1, 1, 1))["diversity"])
    assert expected < 0.9 * same["diversity"]


def test_fid_matches_a_float64_reference_on_the_same_features():
    """The Frechet distance of the judge's features, computed independently (numpy / scipy, float64)."""
    import numpy as np
    from scipy import linalg

    torch.manual_seed(0)
    judge = AttributeClassifier(arch="judge").eval()
    scenes = PromptSplit("held-in").sample(200, seed=0)
    renders, noisy = render_batch(scenes, range(200)), (render_batch(scenes, range(500, 700)) * 0.8 + 0.1)
    with torch.no_grad():
        a, b = (judge.features(x).double().numpy() for x in (renders, noisy))
    mean_a, mean_b, cov_a, cov_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    expected = float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))
    assert abs(judge_fid(judge, noisy, renders) - expected) <= 1e-3 * expected


def test_fid_over_several_chunks_equals_fid_in_one():
    # evaluation feeds 1000 images in chunks of 500: every chunk must reach the statistics
    torch.manual_seed(0)
    judge = AttributeClassifier(arch="judge").eval()
    scenes = PromptSplit("held-in").sample(120, seed=0)
    renders, noisy = render_batch(scenes, range(120)), (render_batch(scenes, range(500, 620)) * 0.8 + 0.1)
    whole = judge_fid(judge, noisy, renders)
    assert abs(judge_fid(judge, noisy, renders, batch_size=32) - whole) <= 1e-6 * whole
    assert abs(judge_fid(judge, noisy[:32], renders) - whole) > 0.01 * whole  # (a chunk alone is another number)
