"""The cosine of an open_clip model's image and prompt embeddings as a reward, differentiable (tensor
preprocessing instead of open_clip's PIL transforms). By default DFN5B CLIP-H (Apple's ViT-H-14 trained on
DFN-5B), the CLIP reward of the paper's released SD3 scripts. HPSv2 is the same scoring on its own fine-tuned
weights (`models/hps.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import torch

from dmdr_rl.hub import local_files_only as hub_local_files_only

from .clip import clip_preprocess

DFN5B_REPO = "apple/DFN5B-CLIP-ViT-H-14"
OPEN_CLIP_WEIGHTS = "open_clip_pytorch_model.bin"  # the file name open_clip's hub models use


def load_open_clip_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file, or a torch file read with weights_only (never unpickled code); a
    checkpoint that wraps it ({"state_dict": ...}, as HPS's) is unwrapped."""
    path = Path(path).expanduser()
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


class OpenClipScore(torch.nn.Module):
    differentiable = True

    def __init__(self, architecture: str = "ViT-H-14-quickgelu", checkpoint: str | None = None,
                 hub_repo: str = DFN5B_REPO, hub_file: str = OPEN_CLIP_WEIGHTS, model_config: str | None = None,
                 cache_dir: str | None = None, device: str | None = None,
                 resize: Literal["squash", "shortest", "longest"] = "squash", name: str = "open-clip-score"):
        """`architecture`: an open_clip model name (DFN5B CLIP-H: ViT-H-14-quickgelu). `checkpoint`: a local
        weights file (.safetensors, or a torch file); null downloads `hub_file` from the hub repo `hub_repo`.
        `model_config`: an open_clip model-config JSON to register first (an architecture open_clip does not
        ship; the tests use a tiny one). `resize`: how images reach the model's input size, as the weights'
        own transform does (squash: resized to a square, as open_clip's DFN5B and the paper's code; shortest:
        resized and centre-cropped; longest: resized and padded, as HPSv2)."""
        import open_clip

        super().__init__()
        if resize not in ("squash", "shortest", "longest"):
            raise ValueError(f"resize={resize!r} is unknown; allowed: squash, shortest, longest")
        self.name, self.resize = name, resize
        if model_config is not None:
            open_clip.add_model_config(model_config)
        if checkpoint is None:
            from huggingface_hub import hf_hub_download

            checkpoint = hf_hub_download(hub_repo, hub_file, cache_dir=cache_dir,
                                         local_files_only=hub_local_files_only(False, hub_repo))
        self.model = open_clip.create_model(architecture, pretrained=None, load_weights=False)
        self.model.load_state_dict(load_open_clip_weights(checkpoint))
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
        pixels = clip_preprocess(images.to(self.device, torch.float32), self.size, self.size, self.mean, self.std,
                                 resize=self.resize)
        image_features = self.model.encode_image(pixels, normalize=True)
        text_features = self.model.encode_text(self.tokenizer(list(prompts)).to(self.device), normalize=True)
        return (image_features * text_features).sum(dim=-1).to(images.device)
