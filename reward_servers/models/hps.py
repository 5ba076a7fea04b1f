"""HPSv2 / HPSv2.1 (Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on human preference pairs.
score = cos(image embedding, prompt embedding), as `hpsv2.score` computes it, but with tensor
preprocessing so the score is differentiable. Built on `open_clip_torch` (which ships the tokenizer
vocabulary) instead of the `hpsv2` package, whose pins (protobuf<4) break Ray Serve."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from dmdr_rl.hub import local_files_only as hub_local_files_only

from .clip import clip_preprocess

HUB_REPO = "xswu/HPSv2"
CHECKPOINTS = {"v2": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


class HPSv2(torch.nn.Module):
    differentiable = True

    def __init__(self, version: str = "v2.1", checkpoint: str | None = None, architecture: str = "ViT-H-14",
                 model_config: str | None = None, cache_dir: str | None = None, device: str | None = None):
        """`checkpoint`: a local HPS checkpoint file; null downloads `CHECKPOINTS[version]` from the hub
        repo xswu/HPSv2. `model_config`: an open_clip model-config JSON to register first (for an
        architecture open_clip does not ship; the tests use a tiny one)."""
        import open_clip

        super().__init__()
        if version not in CHECKPOINTS:
            raise ValueError(f"HPS version {version!r} is unknown; allowed: {', '.join(CHECKPOINTS)}")
        self.name = f"hps{version}"
        if model_config is not None:
            open_clip.add_model_config(model_config)
        if checkpoint is None:
            from huggingface_hub import hf_hub_download

            checkpoint = hf_hub_download(HUB_REPO, CHECKPOINTS[version], cache_dir=cache_dir,
                                         local_files_only=hub_local_files_only(False, HUB_REPO))
        self.model = open_clip.create_model(architecture, pretrained=None, load_weights=False)
        state = torch.load(Path(checkpoint).expanduser(), map_location="cpu", weights_only=True)
        self.model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        self.model.eval().requires_grad_(False)
        if device:
            self.model.to(device)
        self.tokenizer = open_clip.get_tokenizer(architecture)
        preprocess = self.model.visual.preprocess_cfg
        size = preprocess["size"]
        self.size = size if isinstance(size, int) else int(size[0])
        self.mean, self.std = list(preprocess["mean"]), list(preprocess["std"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        # HPSv2's scorer resizes the longest side and pads (open_clip's resize_longest_max), unlike plain CLIP
        pixels = clip_preprocess(images.to(self.device, torch.float32), self.size, self.size, self.mean, self.std,
                                 resize="longest")
        image_features = self.model.encode_image(pixels, normalize=True)
        text_features = self.model.encode_text(self.tokenizer(list(prompts)).to(self.device), normalize=True)
        return (image_features * text_features).sum(dim=-1).to(images.device)
