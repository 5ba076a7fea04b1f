"""The toy backbone: LoRA adapters on one shared frozen base, scale semantics, CFG, gradients."""

import pytest
import torch

from dmdr_rl.backbone import Backbone
from dmdr_rl.toy.teacher import ToyBackbone, create_teacher_transformer
from dmdr_rl.toy.text import ToyTextEncoder

PROMPTS = ["a small red circle in the center", "a blue square above a green triangle"]


@pytest.fixture()
def backbone():
    torch.manual_seed(0)
    return ToyBackbone(create_teacher_transformer(seed=0), ToyTextEncoder.create(seed=0))


def _inputs(backbone):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, *backbone.sample_shape, generator=g), torch.tensor([0.3, 0.8]), backbone.encode(PROMPTS)


def _perturb(backbone, name):
    with torch.no_grad():
        for p in backbone.trainable_parameters(name):
            p.add_(0.05 * torch.randn_like(p))


def test_toy_backbone_implements_the_protocol(backbone):
    assert isinstance(backbone, Backbone)
    assert backbone.sample_shape == (3, 32, 32)
    assert backbone.decode(torch.full((1, 3, 2, 2), 3.0)).max() == 1.0


def test_lora_scale_zero_and_no_adapter_reproduce_the_teacher_exactly(backbone):
    x, t, cond = _inputs(backbone)
    with torch.no_grad():
        teacher = backbone.velocity(x, t, cond)
        backbone.add_lora("critic", rank=4, alpha=4)
        _perturb(backbone, "critic")
        assert torch.equal(backbone.velocity(x, t, cond, adapter="critic", scale=0.0), teacher)
        assert torch.equal(backbone.velocity(x, t, cond), teacher)
        assert not torch.allclose(backbone.velocity(x, t, cond, adapter="critic", scale=1.0), teacher)


def test_lora_scale_interpolates_the_adapter_contribution(backbone):
    backbone.add_lora("critic", rank=4, alpha=4)
    _perturb(backbone, "critic")
    x, t, cond = _inputs(backbone)
    with torch.no_grad():
        v = {s: backbone.velocity(x, t, cond, adapter="critic", scale=s) for s in (0.0, 0.5, 1.0, 2.0)}
    # Small LoRA weights: the output is nearly linear in the scale around the base.
    assert (v[2.0] - v[0.0]).abs().mean() > 1.5 * (v[1.0] - v[0.0]).abs().mean()
    assert (v[0.5] - v[0.0]).abs().mean() < (v[1.0] - v[0.0]).abs().mean()


def test_cfg_is_the_guided_combination(backbone):
    x, t, cond = _inputs(backbone)
    with torch.no_grad():
        v_cond = backbone.velocity(x, t, cond)
        v_null = backbone.velocity(x, t, backbone.null(2))
        guided = backbone.velocity(x, t, cond, cfg=4.0)
    assert torch.allclose(guided, v_null + 4.0 * (v_cond - v_null), atol=1e-5)


def test_adapters_keep_their_own_gradients_when_switched(backbone):
    backbone.add_lora("generator", rank=4, alpha=8)
    backbone.add_lora("critic", rank=4, alpha=4)
    x, t, cond = _inputs(backbone)
    v_gen = backbone.velocity(x, t, cond, adapter="generator")
    with torch.no_grad():
        v_critic = backbone.velocity(x, t, cond, adapter="critic", scale=2.0)
    ((v_gen - v_critic - 1.0) ** 2).mean().backward()  # fresh adapters are equal: offset the target
    assert all(p.requires_grad for p in backbone.trainable_parameters("generator") + backbone.trainable_parameters("critic"))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.trainable_parameters("generator"))
    assert all(p.grad is None for p in backbone.trainable_parameters("critic"))
    assert all(p.grad is None for n, p in backbone.transformer.named_parameters() if "lora_" not in n)


def test_adapter_errors_name_the_problem(backbone):
    with pytest.raises(ValueError, match=r"LoRA target module\(s\) \['to_nowhere'\]"):
        backbone.add_lora("critic", rank=4, alpha=4, targets=("to_q", "to_nowhere"))
    x, t, cond = _inputs(backbone)
    with pytest.raises(ValueError, match="no adapter 'generator'"):
        backbone.velocity(x, t, cond, adapter="generator")
    backbone.add_lora("critic", rank=4, alpha=4)
    with pytest.raises(ValueError, match="exists already"):
        backbone.add_lora("critic", rank=4, alpha=4)


def test_full_copy_starts_at_the_teacher_trains_alone_and_leaves_the_base_frozen(backbone):
    x, t, cond = _inputs(backbone)
    with torch.no_grad():
        teacher = backbone.velocity(x, t, cond)
    backbone.add_full_copy("generator")
    backbone.add_lora("critic", rank=4, alpha=4)
    assert backbone.adapters == ("generator", "critic")
    v_gen = backbone.velocity(x, t, cond, adapter="generator")
    assert torch.equal(v_gen.detach(), teacher)
    names = [n for n, _ in backbone.named_trainable_parameters("generator")]
    assert len(names) == len(list(backbone.transformer.parameters())) - len(backbone.trainable_parameters("critic"))
    v_gen.square().mean().backward()
    assert all(p.grad is not None for p in backbone.trainable_parameters("generator"))
    assert all(p.grad is None for p in backbone.transformer.parameters())
    with torch.no_grad():
        for p in backbone.trainable_parameters("generator"):
            p.add_(0.01)
        assert torch.equal(backbone.velocity(x, t, cond), teacher)
        assert not torch.allclose(backbone.velocity(x, t, cond, adapter="generator"), teacher)


def test_full_copy_errors_name_the_problem(backbone):
    backbone.add_lora("critic", rank=4, alpha=4)
    with pytest.raises(ValueError, match="before any LoRA adapter"):
        backbone.add_full_copy("generator")


def test_full_copy_has_no_scale(backbone):
    backbone.add_full_copy("generator")
    x, t, cond = _inputs(backbone)
    with pytest.raises(ValueError, match="full copy.*no LoRA scale"):
        backbone.velocity(x, t, cond, adapter="generator", scale=0.5)
