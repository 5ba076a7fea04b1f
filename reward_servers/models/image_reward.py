"""ImageReward (Xu et al. 2023): BLIP's ViT-L/16 encodes the image, BLIP's BERT ("med") encodes the prompt
with cross-attention to the image tokens, and an MLP on the [CLS] state gives the reward, normalised by
the training set's mean and std -- the `score_gard` path of the `image-reward` package, rebuilt on
transformers' maintained BLIP classes (`BlipVisionModel`, `BlipTextModel`), since the package's own BLIP
code no longer imports on current transformers. The official checkpoint loads through
`convert_image_reward_state_dict`; the image preprocessing runs on tensors so the score is differentiable
in the pixels. `tools/verify_image_reward.py` checks scores and gradients against the package itself."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from dmdr_rl.hub import expand_home, local_files_only as hub_local_files_only
from dmdr_rl.registry import torch_dtype

from .clip import clip_preprocess

HUB_REPO = "THUDM/ImageReward"
CHECKPOINT = "ImageReward.pt"
MED_CONFIG = "med_config.json"
TOKENIZER = "bert-base-uncased"

# Fixed by the package (ImageReward/ImageReward.py): prompt length, pixel normalisation (CLIP's) and the
# reward's normalisation by the mean and std of the raw reward over the training set.
MAX_LENGTH = 35
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072

# BLIP's `create_vit('large', 224)`: timm-style ViT-L/16 with qkv bias, exact GELU, LayerNorm eps 1e-6.
VIT_LARGE = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
             "image_size": 224, "patch_size": 16, "hidden_act": "gelu", "layer_norm_eps": 1e-6}

# Checkpoint entries the score does not use: BLIP's contrastive projections, and the text position ids
# (a buffer that transformers rebuilds itself).
_UNUSED = re.compile(r"^blip\.(vision_proj|text_proj)\.(weight|bias)$|^blip\.text_encoder\.embeddings\.position_ids$")

# BLIP ViT (timm naming, after `blip.visual_encoder.`) -> BlipVisionModel. The fused qkv projection keeps
# its layout (q, k, v stacked on the output dim) in both, so the weights are renamed, not split.
_VISION_RENAMES = [
    (re.compile(r"^cls_token$"), "embeddings.class_embedding"),
    (re.compile(r"^pos_embed$"), "embeddings.position_embedding"),
    (re.compile(r"^patch_embed\.proj\.(weight|bias)$"), r"embeddings.patch_embedding.\1"),
    (re.compile(r"^blocks\.(\d+)\.norm([12])\.(weight|bias)$"), r"encoder.layers.\1.layer_norm\2.\3"),
    (re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$"), r"encoder.layers.\1.self_attn.qkv.\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$"), r"encoder.layers.\1.self_attn.projection.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$"), r"encoder.layers.\1.mlp.\2.\3"),
    (re.compile(r"^norm\.(weight|bias)$"), r"post_layernorm.\1"),
]


StateDict = dict[str, torch.Tensor]


def convert_image_reward_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[StateDict, StateDict, StateDict]:
    """Split an official ImageReward state dict (`blip.visual_encoder.*`, `blip.text_encoder.*`,
    `mlp.layers.*`) into state dicts for `BlipVisionModel`, `BlipTextModel` (no pooler) and the MLP head.
    BLIP's `med.py` BERT and transformers' `BlipTextModel` share parameter names, so the text part only
    loses its prefix. Raises ValueError naming any key it cannot place (not an ImageReward checkpoint)."""
    vision: StateDict = {}
    text: StateDict = {}
    mlp: StateDict = {}
    unknown = []
    for key, value in state_dict.items():
        if _UNUSED.match(key):
            continue
        if key.startswith("blip.visual_encoder."):
            name = key[len("blip.visual_encoder."):]
            for pattern, target in _VISION_RENAMES:
                if pattern.match(name):
                    vision[pattern.sub(target, name)] = value
                    break
            else:
                unknown.append(key)
        elif key.startswith("blip.text_encoder."):
            text[key[len("blip.text_encoder."):]] = value
        elif key.startswith("mlp.layers."):
            mlp[key[len("mlp."):]] = value
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise ValueError(f"not an ImageReward checkpoint: cannot place {len(unknown)} key(s): {shown}; expected the "
                         "state dict of ImageReward.pt (blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*)")
    return vision, text, mlp


def vision_config(**overrides: Any):
    """The `BlipVisionConfig` of ImageReward's ViT-L/16 (224 px); keyword arguments override fields."""
    from transformers import BlipVisionConfig

    return BlipVisionConfig(**{**VIT_LARGE, **overrides})


def text_config_from_med(med: Mapping[str, Any], encoder_width: int):
    """A `BlipTextConfig` from BLIP's `med_config.json` (a BertConfig dict). `encoder_width` is the vision
    width the cross-attention reads (BLIP_Pretrain overrides med's `encoder_width` with it: 1024 for ViT-L).
    `is_decoder=True` only makes transformers build the cross-attention layers; `score` runs the encoder
    bidirectionally (is_decoder=False at call time), as med's BertModel does in its default mode."""
    from transformers import BlipTextConfig

    if not med.get("add_cross_attention", False):
        raise ValueError("med_config has add_cross_attention false: ImageReward's text encoder needs the "
                         "cross-attention layers (use the med_config.json from THUDM/ImageReward)")
    if med.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"med_config position_embedding_type {med['position_embedding_type']!r} is not supported "
                         "(BlipTextModel has absolute position embeddings only)")
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings", "hidden_act", "layer_norm_eps", "hidden_dropout_prob",
              "attention_probs_dropout_prob", "pad_token_id", "initializer_range")
    return BlipTextConfig(**{k: med[k] for k in fields if k in med}, encoder_hidden_size=encoder_width,
                          is_decoder=True, use_cache=False)


def load_tokenizer(tokenizer: Any = TOKENIZER, cache_dir: str | None = None, local_files_only: bool = False):
    """BLIP's `init_tokenizer`: a BERT WordPiece tokenizer (hub id or local directory with vocab.txt) with
    `[DEC]` added as bos and `[ENC]` as an extra special token, which is how the 30524-row embedding of
    med_config arises. A tokenizer object is used as given (the caller has added the tokens)."""
    if not isinstance(tokenizer, (str, Path)):
        return tokenizer
    from transformers import BertTokenizer

    tokenizer = expand_home(str(tokenizer))
    built = BertTokenizer.from_pretrained(tokenizer, cache_dir=cache_dir,
                                          local_files_only=hub_local_files_only(local_files_only, tokenizer))
    built.add_special_tokens({"bos_token": "[DEC]"})
    built.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return built


class RewardHead(torch.nn.Module):
    """The package's `MLP`: five linear layers, no activations, dropouts at the package's indices so the
    checkpoint keys (`layers.0`, `.2`, `.4`, `.6`, `.7`) line up."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


def _local_or_hub(path: str, filename: str, cache_dir: str | None, local_files_only: bool) -> Path:
    """`filename` itself if it is a file, else `path/filename` if `path` is a directory, else the file
    from hub repo `path`."""
    path, filename = expand_home(path), expand_home(filename)
    if Path(filename).is_file():
        return Path(filename)
    if Path(path).is_dir():
        candidate = Path(path) / filename
        if not candidate.is_file():
            raise FileNotFoundError(f"{candidate} does not exist; put {filename} there or pass its file path")
        return candidate
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(path, filename, cache_dir=cache_dir,
                                local_files_only=hub_local_files_only(local_files_only, path)))


class ImageReward(torch.nn.Module):
    name = "imagereward"
    differentiable = True

    def __init__(self, path: str = HUB_REPO, checkpoint: str = CHECKPOINT, med_config: str = MED_CONFIG,
                 tokenizer: str = TOKENIZER, cache_dir: str | None = None, local_files_only: bool = False,
                 device: str | None = None, dtype: str = "float32", vision: Mapping[str, Any] | None = None):
        """`path`: hub repo or local directory holding `checkpoint` and `med_config` (each may also be a
        file path). `tokenizer`: BERT tokenizer hub id or local directory with vocab.txt. `vision`:
        overrides of the ViT-L/16 config fields (only for checkpoints of another ViT, e.g. the tests' tiny one)."""
        super().__init__()
        weights_dtype = torch_dtype(dtype, "rewards[].kwargs.dtype")  # (a typo stops before the loading)
        checkpoint_file = _local_or_hub(path, checkpoint, cache_dir, local_files_only)
        med_file = _local_or_hub(path, med_config, cache_dir, local_files_only)
        # ImageReward.pt is a plain state dict (the package passes torch.load's result straight to
        # load_state_dict), which the tensors-only unpickler reads; checked on a state dict saved from the
        # package's model (tools/verify_image_reward.py), not on the hub file itself (no hub access there).
        state_dict = torch.load(checkpoint_file, map_location="cpu", weights_only=True)
        vision_cfg = vision_config(**(vision or {}))
        text_cfg = text_config_from_med(json.loads(med_file.read_text()), encoder_width=vision_cfg.hidden_size)
        self._build(vision_cfg, text_cfg, load_tokenizer(tokenizer, cache_dir, local_files_only), state_dict)
        self.to(device=device, dtype=weights_dtype)

    @classmethod
    def from_configs(cls, vision_config, text_config, tokenizer: Any,
                     state_dict: Mapping[str, torch.Tensor] | None = None, device: str | None = None) -> "ImageReward":
        """Build from explicit `BlipVisionConfig` / `BlipTextConfig` (e.g. tiny ones for tests), with
        random weights or an official-layout `state_dict`. `tokenizer` as in `load_tokenizer`."""
        model = cls.__new__(cls)
        torch.nn.Module.__init__(model)
        model._build(vision_config, text_config, load_tokenizer(tokenizer), state_dict)
        return model.to(device) if device else model

    def _build(self, vision_config, text_config, tokenizer, state_dict: Mapping[str, torch.Tensor] | None) -> None:
        from transformers import BlipTextModel, BlipVisionModel

        if text_config.encoder_hidden_size != vision_config.hidden_size:
            raise ValueError(f"text_config.encoder_hidden_size ({text_config.encoder_hidden_size}) must equal the "
                             f"vision width vision_config.hidden_size ({vision_config.hidden_size})")
        if not text_config.is_decoder:
            raise ValueError("text_config.is_decoder must be True: transformers builds BlipTextModel's "
                             "cross-attention layers only then (score still encodes bidirectionally)")
        if len(tokenizer) > text_config.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the text encoder only "
                             f"{text_config.vocab_size} embeddings; use BLIP's bert-base-uncased tokenizer")
        self.vision_model = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = RewardHead(text_config.hidden_size)
        if state_dict is not None:
            vision, text, mlp = convert_image_reward_state_dict(state_dict)
            self.vision_model.load_state_dict(vision)
            self.text_encoder.load_state_dict(text)
            self.mlp.load_state_dict(mlp)
        self.tokenizer = tokenizer
        self.image_size = int(vision_config.image_size)
        self.max_length = min(MAX_LENGTH, int(text_config.max_position_embeddings))
        self.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.mlp.layers[0].weight.device

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1], one prompt each -> [B] normalised rewards, differentiable in images."""
        device, dtype = self.device, self.mlp.layers[0].weight.dtype
        pixels = clip_preprocess(images.to(device), self.image_size, self.image_size, IMAGE_MEAN, IMAGE_STD, dtype=dtype)
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(device)
        image_embeds = self.vision_model(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
        text = self.text_encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                 encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
                                 is_decoder=False)
        rewards = self.mlp(text.last_hidden_state[:, 0, :]).squeeze(-1)
        return ((rewards - REWARD_MEAN) / REWARD_STD).float().to(images.device)
