"""Tiny random-weight models of the built-in reward models' classes, saved like the real ones, so the
real loading and scoring code runs offline in tests and benchmarks (no hub weights here)."""

from __future__ import annotations

from pathlib import Path

import torch

def save_tiny_clip(directory: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """A tiny `CLIPModel` + word-level tokenizer + `CLIPImageProcessor` in one directory (PickScore's layout)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from dmdr_rl.tiny import word_level_tokenizer

    directory = Path(directory)
    fast = word_level_tokenizer(max_length=16)
    vocab = fast.get_vocab()
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 2},
        vision_config={"image_size": image_size, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
                       ).save_pretrained(directory)
    return directory


TINY_OPEN_CLIP = "dmdr-tiny-open-clip"  # the architecture name the tiny config registers under


def save_tiny_open_clip(directory: str | Path, image_size: int = 32, seed: int = 0, quick_gelu: bool = False) -> dict:
    """A tiny open_clip CLIP (HPSv2's classes; `quick_gelu`: DFN5B's activation) as a model-config JSON plus an
    HPS-style checkpoint ({"state_dict": ...}), and the bare state dict as `open_clip_model.safetensors` beside
    them; returns the HPSv2 / open-clip-score kwargs that load the checkpoint."""
    import json

    import open_clip
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    architecture = TINY_OPEN_CLIP + ("-quickgelu" if quick_gelu else "")
    config = {"embed_dim": 16, "quick_gelu": quick_gelu,
              "vision_cfg": {"image_size": image_size, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    config_path = directory / f"{architecture}.json"
    config_path.write_text(json.dumps(config))
    open_clip.add_model_config(config_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(architecture, pretrained=None, load_weights=False)
    checkpoint = directory / "HPS_tiny.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    save_file({name: value.contiguous() for name, value in model.state_dict().items()}, directory / "open_clip_model.safetensors")
    return {"checkpoint": str(checkpoint), "architecture": architecture, "model_config": str(config_path)}


def save_tiny_aesthetic_head(file: str | Path, width: int = 16, seed: int = 0) -> Path:
    """Random weights of the aesthetic predictor's MLP on a `width`-wide embedding (the tiny CLIP's projection),
    saved as a state dict like the predictor's .pth (or .safetensors by the file's suffix)."""
    from .aesthetic import aesthetic_head

    file = Path(file)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = aesthetic_head(width).state_dict()
    if file.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(file))
    else:
        torch.save(state, file)
    return file
