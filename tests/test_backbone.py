"""The toy backbone: LoRA adapters on one shared frozen base, scale semantics, CFG, gradients."""

import pytest
import torch

from benchmarks.activations import as_peft_computes_them, saved_activation_bytes
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_base_calls_skip_the_adapters_and_equal_an_adapter_computed_at_scale_zero(backbone, dtype):
    backbone.transformer.to(dtype)
    backbone.add_lora("critic", rank=4, alpha=4)
    backbone.add_lora("generator", rank=4, alpha=4)
    _perturb(backbone, "critic")
    calls = []
    for name, module in backbone.transformer.named_modules():
        if name.endswith("lora_A.critic"):
            module.register_forward_hook(lambda *_: calls.append(1))
    x, t, cond = _inputs(backbone)
    with torch.no_grad():
        computed_at_zero = backbone._lora_forward("critic", 0.0)(x, t, cond)  # the adapters' matmuls, times 0
        assert calls, "the hook must see the adapter's layers run"
        calls.clear()
        base = backbone.velocity(x, t, cond)
        at_zero = backbone.velocity(x, t, cond, adapter="critic", scale=0.0)
        assert not calls
        assert torch.equal(base, computed_at_zero) and torch.equal(at_zero, computed_at_zero)
        # the adapters are back on afterwards, with the active one unchanged
        assert not torch.equal(backbone.velocity(x, t, cond, adapter="critic"), base)
        assert calls


def test_a_bf16_base_computes_its_float32_adapters_in_bf16_with_float32_gradients(backbone):
    backbone.transformer.to(torch.bfloat16)
    backbone.add_lora("generator", rank=4, alpha=8)
    _perturb(backbone, "generator")
    x, t, cond = _inputs(backbone)
    params = backbone.trainable_parameters("generator")
    runs = {}
    for path in ("base precision", "peft's float32"):
        if path == "peft's float32":
            as_peft_computes_them(backbone.transformer)
        v, saved = saved_activation_bytes(backbone.transformer, lambda: backbone.velocity(x, t, cond, adapter="generator"))
        v.square().mean().backward()
        runs[path] = (v.detach(), [p.grad.clone() for p in params], saved)
        for p in params:
            p.grad = None
    (v, grads, saved), (v_ref, grads_ref, saved_ref) = runs["base precision"], runs["peft's float32"]
    assert all(p.dtype == torch.float32 for p in params) and all(g.dtype == torch.float32 for g in grads)
    assert saved < 0.85 * saved_ref  # no float32 copy of each adapted layer's input is kept
    assert (v - v_ref).abs().max() <= 0.015 * v_ref.abs().max()  # bf16 rounding (measured 0.7%)
    for g, g_ref in zip(grads, grads_ref):
        assert (g - g_ref).norm() <= 0.02 * g_ref.norm()  # measured 0.7%


def test_checkpointing_recomputes_a_base_call_with_the_adapters_off(backbone):
    backbone.add_lora("generator", rank=4, alpha=8)
    _perturb(backbone, "generator")
    x, t, cond = _inputs(backbone)
    x.requires_grad_(True)

    def input_gradient():  # a base call and an adapter call in one graph, back-propagated after both
        x.grad = None
        (backbone.velocity(x, t, cond, cfg=2.0).square().mean()
         + backbone.velocity(x, t, cond, adapter="generator").square().mean()).backward()
        return x.grad.clone()

    plain = input_gradient()
    backbone.enable_gradient_checkpointing()
    assert torch.equal(input_gradient(), plain)


def test_a_float16_base_keeps_its_adapters_in_float32():
    """float16 (unlike bf16) has too little range for the adapters' small gradients without loss scaling."""
    torch.manual_seed(0)
    backbone = ToyBackbone(create_teacher_transformer(seed=0).to(torch.float16), ToyTextEncoder.create(seed=0))
    backbone.add_lora("generator", rank=4, alpha=8)
    factors = [m for n, m in backbone.transformer.named_modules() if n.endswith(("lora_A.generator", "lora_B.generator"))]
    assert factors and all(type(f) is torch.nn.Linear for f in factors)


def test_lora_scale_interpolates_the_adapter_contribution(backbone):
    backbone.add_lora("critic", rank=4, alpha=4)
    _perturb(backbone, "critic")
    x, t, cond = _inputs(backbone)
    with torch.no_grad():
        v = {s: backbone.velocity(x, t, cond, adapter="critic", scale=s) for s in (0.0, 0.5, 1.0, 2.0)}
    # Small LoRA weights: the output is nearly linear in the scale around the base, so the adapter's contribution
    # at scale s is about s times its contribution at 1 (measured 0.503 and 1.984; scale**2 would give 0.25 and 4)
    unit = (v[1.0] - v[0.0]).abs().mean()
    assert unit > 1e-4
    for s in (0.5, 2.0):
        assert ((v[s] - v[0.0]).abs().mean() / unit).item() == pytest.approx(s, rel=0.1)


def test_a_calls_lora_scale_is_applied_to_the_layers_for_that_call_only(backbone):
    """The backbone scales the adapters itself (no joint_attention_kwargs for the transformer to honour or
    ignore) and puts every layer's scaling back exactly, also when the call fails."""
    backbone.add_lora("critic", rank=4, alpha=4)
    _perturb(backbone, "critic")
    x, t, cond = _inputs(backbone)
    layers = backbone._lora_layers
    before = [dict(layer.scaling) for layer in layers]
    seen = []
    hook = layers[0].register_forward_pre_hook(lambda module, args: seen.append(module.scaling["critic"]))
    try:
        with torch.no_grad():
            backbone.velocity(x, t, cond, adapter="critic", scale=0.37)
            with pytest.raises(RuntimeError):
                backbone.velocity(x[:, :1], t, cond, adapter="critic", scale=0.37)  # (a wrong shape: the call fails)
    finally:
        hook.remove()
    assert seen[0] == pytest.approx(0.37 * before[0]["critic"]) and [dict(layer.scaling) for layer in layers] == before


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


def test_a_full_copy_on_a_bf16_base_trains_float32_weights_but_computes_in_bf16(backbone):
    x, t, cond = _inputs(backbone)
    with torch.no_grad():
        reference = backbone.velocity(x, t, cond)  # float32 throughout
    backbone.transformer.to(torch.bfloat16)
    backbone.add_full_copy("generator")
    copy = backbone.standalone_transformer("generator")  # (a full copy is its own transformer)
    seen = []
    hook = copy.transformer_blocks[0].attn.to_q.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    v = backbone.velocity(x, t, cond, adapter="generator")
    hook.remove()
    assert seen == [torch.bfloat16] and v.dtype == torch.float32  # bf16 matmuls, float32 answer
    assert (v.detach() - reference).abs().max() <= 0.03 * reference.abs().max()  # bf16 rounding of the teacher
    v.square().mean().backward()
    params = backbone.trainable_parameters("generator")
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    assert all(p.grad is None for p in backbone.transformer.parameters())
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    backbone.enable_gradient_checkpointing()  # the recomputed blocks compute in bf16 as well: the same gradients
    backbone.velocity(x, t, cond, adapter="generator").square().mean().backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


def test_full_copy_errors_name_the_problem(backbone):
    backbone.add_lora("critic", rank=4, alpha=4)
    with pytest.raises(ValueError, match="before any LoRA adapter"):
        backbone.add_full_copy("generator")


def test_full_copy_has_no_scale(backbone):
    backbone.add_full_copy("generator")
    x, t, cond = _inputs(backbone)
    with pytest.raises(ValueError, match="full copy.*no LoRA scale"):
        backbone.velocity(x, t, cond, adapter="generator", scale=0.5)
