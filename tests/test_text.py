import pytest
import torch

from dmdr_rl.toy.text import MAX_TOKENS, ToyTextEncoder


@pytest.fixture(scope="module")
def encoder():
    return ToyTextEncoder.create(seed=0).eval()


def test_encoder_gives_the_sd3_conditioning_interface(encoder):
    cond = encoder.encode(["a small red circle in the center", "a red circle left of a blue square", ""])
    assert cond.tokens.shape == (3, MAX_TOKENS, encoder.width)
    assert cond.pooled.shape == (3, encoder.model.config.projection_dim)
    assert torch.isfinite(cond.tokens).all()


def test_different_prompts_give_different_pooled_vectors(encoder):
    cond = encoder.encode(["a small red circle in the center", "a small blue circle in the center"])
    assert not torch.allclose(cond.pooled[0], cond.pooled[1])


def test_unknown_word_is_named(encoder):
    with pytest.raises(ValueError, match=r"unknown word\(s\) \['mauve'\]"):
        encoder.encode(["a small mauve circle in the center"])


def test_empty_prompt_list_is_an_error(encoder):
    with pytest.raises(ValueError, match="empty prompt list"):
        encoder.encode([])
    with pytest.raises(TypeError, match="list of prompts"):
        encoder.encode("a small red circle in the center")


def test_save_and_load_round_trip(encoder, tmp_path):
    encoder.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists() and list(tmp_path.glob("*.safetensors"))
    loaded = ToyTextEncoder.from_pretrained(tmp_path).eval()
    prompts = ["a large cyan diamond in the top right"]
    with torch.no_grad():
        assert torch.allclose(encoder.encode(prompts).tokens, loaded.encode(prompts).tokens)


def test_the_checks_before_a_run_refuse_exactly_what_the_encoder_refuses():
    from dmdr_rl.config import ConfigError
    from dmdr_rl.registry import BACKBONES

    long = "a small red circle in the center a small red circle in the center"
    for prompt, message in ((long, "longer than 10 words"), ("a\x1fsmall red circle", "unknown word"),
                            ("a purple elephant", r"unknown word\(s\) \['elephant'\]")):
        with pytest.raises(ValueError, match=message):
            ToyTextEncoder.create()([prompt])
        with pytest.raises(ConfigError, match=message):
            BACKBONES.check("toy", resolution=32, prompts=[prompt])
    BACKBONES.check("toy", resolution=32, prompts=["A Red circle", "a red circle left of a blue square"])
