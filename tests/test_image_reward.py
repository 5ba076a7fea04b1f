"""ImageReward on tiny random-weight BLIP configs: scores and gradients, the official checkpoint layout
(converted one way by the module, the other way here), a plain-torch re-implementation of the original
BLIP forward (timm ViT + med BERT) as the reference, and loading by registry name from files. The check
against the `image-reward` package itself is tools/verify_image_reward.py (it needs its own venv)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from reward_servers import load_reward_model
from reward_servers.models.clip import clip_preprocess
from reward_servers.models.image_reward import ImageReward, convert_image_reward_state_dict, load_tokenizer
from dmdr_rl.tiny import WORDS as TINY_WORDS

PROMPTS = ["a large green diamond in the top left", "a red diamond below a purple circle",
           "a small purple triangle in the top right and a big blue star at the bottom of the white square"]
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 8, "layer_norm_eps": 1e-6}
# A med_config.json in BLIP's format (BertConfig keys), tiny; encoder_width is overridden by the ViT width.
MED = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
       "hidden_dropout_prob": 0.1, "hidden_size": 24, "initializer_range": 0.02, "intermediate_size": 48,
       "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 2,
       "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 0, "encoder_width": 768,
       "add_cross_attention": True}
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# The package's constants (ImageReward/ImageReward.py), restated so the reference does not share the module's.
PACKAGE_MEAN, PACKAGE_STD = 0.16717362830052426, 1.0333394966054072
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bert-vocab")
    (directory / "vocab.txt").write_text("\n".join(SPECIALS + list(TINY_WORDS) + ["##s"]) + "\n")
    return directory


@pytest.fixture(scope="module")
def med(vocab_dir):
    words = len((vocab_dir / "vocab.txt").read_text().split())
    return {**MED, "vocab_size": words + 2}  # + BLIP's [DEC] and [ENC]


@pytest.fixture(scope="module")
def configs(med):
    from reward_servers.models.image_reward import text_config_from_med, vision_config

    vision = vision_config(**VISION)
    return vision, text_config_from_med(med, encoder_width=vision.hidden_size)


def _random_model(configs, vocab_dir, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ImageReward.from_configs(*configs, tokenizer=str(vocab_dir))
        # transformers initialises LayerNorms to (1, 0) and some biases to 0: randomise everything so a
        # swapped or dropped parameter changes the scores.
        for parameter in model.parameters():
            parameter.data.normal_(0, 0.2)
        for name, parameter in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):  # LayerNorm scales around 1
                parameter.data.add_(1.0)
    return model


@pytest.fixture(scope="module")
def model(configs, vocab_dir):
    return _random_model(configs, vocab_dir)


def _images(n=3, size=32, seed=0):
    return torch.rand((n, 3, size, size), generator=torch.Generator().manual_seed(seed))


def _to_original_layout(model: ImageReward) -> dict:
    """The inverse of convert_image_reward_state_dict, written independently: our modules' state dicts
    under the key names of ImageReward.pt (timm ViT in BLIP, med BERT, MLP), plus the entries the score
    does not use (contrastive projections, position ids) that the official file also carries."""
    renames = [("embeddings.class_embedding", "cls_token"), ("embeddings.position_embedding", "pos_embed"),
               ("embeddings.patch_embedding.", "patch_embed.proj."), ("post_layernorm.", "norm."),
               ("encoder.layers.", "blocks."), (".layer_norm1.", ".norm1."), (".layer_norm2.", ".norm2."),
               (".self_attn.projection.", ".attn.proj."), (".self_attn.qkv.", ".attn.qkv.")]
    original = {}
    for key, value in model.vision_model.state_dict().items():
        for ours, theirs in renames:
            key = key.replace(ours, theirs)
        original[f"blip.visual_encoder.{key}"] = value.clone()
    for key, value in model.text_encoder.state_dict().items():
        original[f"blip.text_encoder.{key}"] = value.clone()
    for key, value in model.mlp.state_dict().items():
        original[f"mlp.{key}"] = value.clone()
    width, text_width = model.vision_model.config.hidden_size, model.text_encoder.config.hidden_size
    original["blip.text_encoder.embeddings.position_ids"] = torch.arange(40).expand(1, -1)
    original.update({"blip.vision_proj.weight": torch.zeros(16, width), "blip.vision_proj.bias": torch.zeros(16),
                     "blip.text_proj.weight": torch.zeros(16, text_width), "blip.text_proj.bias": torch.zeros(16)})
    return original


def _reference_score(original: dict, med: dict, images, input_ids, attention_mask):
    """ImageReward's score_gard in plain torch on the original-layout weights: BLIP's timm ViT (pre-norm
    blocks, fused qkv, cls token, final norm, eps 1e-6) and med's BERT (post-norm, -10000 padding mask,
    self- then cross-attention to all image tokens), MLP on [CLS], normalised. Float64 throughout."""
    w = {k: v.double() if v.is_floating_point() else v for k, v in original.items()}
    pixels = clip_preprocess(images.double(), 32, 32, CLIP_MEAN, CLIP_STD)

    def lin(x, name):
        return F.linear(x, w[name + ".weight"], w[name + ".bias"])

    def norm(x, name, eps):
        return F.layer_norm(x, x.shape[-1:], w[name + ".weight"], w[name + ".bias"], eps)

    def attention(q, k, v, n_heads, mask=None):
        b, lq, d = q.shape
        split = lambda t: t.view(b, t.shape[1], n_heads, d // n_heads).transpose(1, 2)  # noqa: E731
        scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // n_heads)
        if mask is not None:
            scores = scores + mask
        return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, lq, d)

    v = "blip.visual_encoder."
    x = F.conv2d(pixels, w[v + "patch_embed.proj.weight"], w[v + "patch_embed.proj.bias"], stride=8)
    x = torch.cat([w[v + "cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1) + w[v + "pos_embed"]
    for i in range(VISION["num_hidden_layers"]):
        p = f"{v}blocks.{i}."
        q, k, val = lin(norm(x, p + "norm1", 1e-6), p + "attn.qkv").chunk(3, dim=-1)
        x = x + lin(attention(q, k, val, VISION["num_attention_heads"]), p + "attn.proj")
        x = x + lin(F.gelu(lin(norm(x, p + "norm2", 1e-6), p + "mlp.fc1")), p + "mlp.fc2")
    image_embeds = norm(x, v + "norm", 1e-6)

    t, eps, heads = "blip.text_encoder.", med["layer_norm_eps"], med["num_attention_heads"]
    positions = torch.arange(input_ids.shape[1])
    x = w[t + "embeddings.word_embeddings.weight"][input_ids]
    x = x + w[t + "embeddings.position_embeddings.weight"][positions]
    x = norm(x, t + "embeddings.LayerNorm", eps)
    pad_mask = (1.0 - attention_mask[:, None, None, :].double()) * -10000.0
    for i in range(med["num_hidden_layers"]):
        p = f"{t}encoder.layer.{i}."
        a = attention(lin(x, p + "attention.self.query"), lin(x, p + "attention.self.key"),
                      lin(x, p + "attention.self.value"), heads, pad_mask)
        x = norm(lin(a, p + "attention.output.dense") + x, p + "attention.output.LayerNorm", eps)
        c = attention(lin(x, p + "crossattention.self.query"), lin(image_embeds, p + "crossattention.self.key"),
                      lin(image_embeds, p + "crossattention.self.value"), heads)
        x = norm(lin(c, p + "crossattention.output.dense") + x, p + "crossattention.output.LayerNorm", eps)
        x = norm(lin(F.gelu(lin(x, p + "intermediate.dense")), p + "output.dense") + x, p + "output.LayerNorm", eps)
    r = x[:, 0]
    for index in (0, 2, 4, 6, 7):
        r = lin(r, f"mlp.layers.{index}")
    return ((r.squeeze(-1) - PACKAGE_MEAN) / PACKAGE_STD).float()


def test_default_vision_config_is_blips_vit_large():
    from reward_servers.models.image_reward import vision_config

    config = vision_config()
    # BLIP create_vit('large', 224): depth 24, width 1024, 16 heads, mlp_ratio 4, patch 16, LayerNorm eps 1e-6.
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size,
            config.patch_size, config.image_size, config.layer_norm_eps, config.hidden_act) == (
        24, 1024, 16, 4096, 16, 224, 1e-6, "gelu")


def test_scores_are_finite_per_image_and_depend_on_image_and_prompt(model):
    images = _images()
    scores = model.score(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert (model.name, model.differentiable) == ("imagereward", True)
    # Cross-attention reads the image and self-attention the prompt: change either and the score moves.
    assert not torch.allclose(model.score(images.flip(-1), PROMPTS), scores, atol=1e-5)
    assert not torch.allclose(model.score(images, PROMPTS[::-1]), scores, atol=1e-5)
    # One sample's score does not depend on what else is in the batch (padding is masked per prompt).
    torch.testing.assert_close(model.score(images[1:2], PROMPTS[1:2]), scores[1:2], atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_pixels_through_resize_and_crop(model):
    images = _images(2, size=48).requires_grad_(True)  # 48 -> resized to 32 and cropped
    model.score(images, PROMPTS[:2]).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad[0].abs().sum() > 0 and images.grad[1].abs().sum() > 0
    assert not any(p.requires_grad for p in model.parameters())  # a frozen judge


def test_tokenizer_is_blips_with_dec_and_enc(model, vocab_dir, med):
    tokenizer = model.tokenizer
    assert len(tokenizer) == med["vocab_size"]
    assert tokenizer.bos_token == "[DEC]" and tokenizer.convert_tokens_to_ids("[ENC]") == len(tokenizer) - 1
    tokens = tokenizer([PROMPTS[0]], padding="max_length", truncation=True, max_length=model.max_length)
    assert len(tokens["input_ids"][0]) == model.max_length == 35
    assert tokens["input_ids"][0][0] == tokenizer.cls_token_id  # [CLS] first, as the package feeds it


def test_matches_a_plain_torch_blip_forward_on_the_original_layout(model, med):
    images = _images(seed=1)
    tokens = model.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens["attention_mask"].sum(1).unique().numel() > 1  # prompts of different lengths: padding is masked
    expected = _reference_score(_to_original_layout(model), med, images,
                                tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(model.score(images, PROMPTS), expected, atol=1e-4, rtol=1e-4)


def test_converter_round_trips_the_official_layout(model, configs, vocab_dir):
    original = _to_original_layout(model)
    vision, text, mlp = convert_image_reward_state_dict(original)
    # Every parameter is placed, nothing left over: exactly our modules' keys.
    assert set(vision) == set(model.vision_model.state_dict())
    assert set(text) == set(model.text_encoder.state_dict())
    assert set(mlp) == set(model.mlp.state_dict())
    rebuilt = ImageReward.from_configs(*configs, tokenizer=str(vocab_dir), state_dict=original)
    for ours, theirs in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert ours[0] == theirs[0] and torch.equal(ours[1], theirs[1]), ours[0]
    images = _images(seed=2)
    assert torch.equal(rebuilt.score(images, PROMPTS), model.score(images, PROMPTS))


def test_converter_names_keys_it_cannot_place(model):
    original = _to_original_layout(model)
    original["blip.visual_encoder.blocks.0.attn.q.weight"] = torch.zeros(1)
    original["text_decoder.cls.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"cannot place 2 key\(s\): blip.visual_encoder.blocks.0.attn.q.weight"):
        convert_image_reward_state_dict(original)


def test_missing_checkpoint_weights_fail_loudly(model, configs, vocab_dir):
    original = _to_original_layout(model)
    del original["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    with pytest.raises(RuntimeError, match="crossattention.self.key.weight"):
        ImageReward.from_configs(*configs, tokenizer=str(vocab_dir), state_dict=original)


def test_registry_name_loads_checkpoint_and_med_config_from_files(model, med, vocab_dir, tmp_path):
    torch.save(_to_original_layout(model), tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    loaded = load_reward_model("imagereward", {"path": str(tmp_path), "tokenizer": str(vocab_dir), "vision": VISION})
    assert isinstance(loaded, ImageReward) and loaded.name == "imagereward"
    # med's 768 encoder_width is replaced by the ViT width, as BLIP_Pretrain does.
    assert loaded.text_encoder.config.encoder_hidden_size == VISION["hidden_size"]
    images = _images(seed=3)
    torch.testing.assert_close(loaded.score(images, PROMPTS), model.score(images, PROMPTS), atol=0, rtol=0)


def test_bad_med_config_and_tokenizer_say_the_fix(configs, vocab_dir, med):
    from reward_servers.models.image_reward import text_config_from_med

    with pytest.raises(ValueError, match="add_cross_attention"):
        text_config_from_med({**med, "add_cross_attention": False}, encoder_width=32)
    small = text_config_from_med({**med, "vocab_size": 5}, encoder_width=32)
    with pytest.raises(ValueError, match="tokenizer has .* tokens but the text encoder only 5"):
        ImageReward.from_configs(configs[0], small, tokenizer=str(vocab_dir))
    tokenizer = load_tokenizer(str(vocab_dir))
    assert load_tokenizer(tokenizer) is tokenizer  # a built tokenizer is used as given
