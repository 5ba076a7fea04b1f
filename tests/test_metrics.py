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
