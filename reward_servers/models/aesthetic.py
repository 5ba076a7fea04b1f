"""The LAION aesthetic predictor (improved-aesthetic-predictor, "sac+logos+ava1-l14-linearMSE"): a small
MLP on OpenAI CLIP ViT-L/14's L2-normalised image embedding, trained to predict the mean human rating
(1-10) of an image. It ignores the prompt. The reward DDPO and AlignProp train Stable Diffusion towards;
here on transformers' `CLIPModel` with tensor preprocessing, so the score is differentiable (ReFL).

score = MLP(e / |e|), e = CLIP image embedding; the MLP is Linear(768, 1024), Linear(1024, 128),
Linear(128, 64), Linear(64, 16), Linear(16, 1) with dropout between the first four and no activation,
as the predictor was trained (its state dict's keys are `layers.0`, `.2`, `.4`, `.6`, `.7`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from dmdr_rl.hub import expand_home, local_files_only as hub_local_files_only
from dmdr_rl.registry import torch_dtype

from .clip import ProcessorGeometry, embedding

HUB_CLIP = "openai/clip-vit-large-patch14"
HUB_HEAD = "trl-lib/ddpo-aesthetic-predictor"  # the predictor's weights as TRL's DDPO example downloads them
HEAD_FILE = "aesthetic-model.pth"


def aesthetic_head(width: int) -> torch.nn.Sequential:
    """The predictor's MLP on a `width`-dimensional embedding (768 for ViT-L/14), dropout kept as its layout."""
    layers = torch.nn.Sequential(
        torch.nn.Linear(width, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    head = torch.nn.Module()
    head.layers = layers  # (the predictor's own state-dict names: layers.N.weight)
    return head


def read_head_weights(file: str | Path) -> dict[str, torch.Tensor]:
    """The predictor's state dict from a .safetensors file, or a .pth/.pt one read with weights_only (tensors only,
    never arbitrary pickled objects)."""
    file = Path(file).expanduser()
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    state = torch.load(file, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


class LaionAesthetic(torch.nn.Module):
    differentiable = True

    def __init__(self, path: str = HUB_CLIP, head: str = HUB_HEAD, head_file: str = HEAD_FILE,
                 cache_dir: str | None = None, local_files_only: bool = False, device: str | None = None,
                 dtype: str = "float32", name: str = "aesthetic"):
        """`path`: CLIP ViT-L/14 (hub id or local directory: its image processor gives the size and normalisation).
        `head`: the predictor's weights: a local file (.pth or .safetensors), a local directory holding
        `head_file`, or a hub repo to download `head_file` from."""
        from transformers import CLIPImageProcessor, CLIPModel

        super().__init__()
        self.name = name
        path, head = expand_home(path), expand_home(head)
        offline = hub_local_files_only(local_files_only, path, head)
        load = {"cache_dir": cache_dir, "local_files_only": offline}
        self.model = CLIPModel.from_pretrained(path, dtype=torch_dtype(dtype, "rewards[].kwargs.dtype"), **load)
        self.model.eval().requires_grad_(False)
        processor = CLIPImageProcessor.from_pretrained(path, **load)
        self.geometry = ProcessorGeometry.of(processor)
        self.head = aesthetic_head(self.model.config.projection_dim)
        state = read_head_weights(self._head_file(head, head_file, cache_dir, offline))
        try:
            self.head.load_state_dict(state)
        except RuntimeError as err:  # another layout, or a head for another CLIP's embedding width
            raise ValueError(f"the aesthetic head's weights do not fit its MLP on this CLIP's {self.model.config.projection_dim}-wide "
                             f"embedding ({str(err).splitlines()[0]}): rewards[].kwargs.head must be the "
                             "improved-aesthetic-predictor's weights for this CLIP (ViT-L/14: 768)") from None
        self.head.eval().requires_grad_(False).to(self.model.logit_scale.dtype)
        if device:
            self.to(device)

    @staticmethod
    def _head_file(head: str, head_file: str, cache_dir: str | None, local_files_only: bool) -> Path:
        local = Path(head)
        if local.is_file():
            return local
        if local.is_dir():
            return local / head_file
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(head, head_file, cache_dir=cache_dir, local_files_only=local_files_only))

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pixels = self.geometry.pixels(images, self.device, self.model.logit_scale.dtype)
        features = embedding(self.model.get_image_features(pixel_values=pixels))
        features = features / features.norm(dim=-1, keepdim=True)
        return self.head.layers(features).squeeze(-1).float().to(images.device)
