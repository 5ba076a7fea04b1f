"""The original `image-reward` package as a reward model, for users who want its own code: run it in a
Serve replica with an isolated `runtime_env` (the package does not import next to this project's
transformers 5). Same scores as the built-in `imagereward` (which `tools/verify_image_reward.py`
checks bitwise against the package), so prefer that one; this exists for audits and comparisons.

    rewards:
      - name: reward_servers.models.image_reward_package:ImageRewardPackage
        placement: serve
        serve:
          runtime_env:
            pip: ["image-reward==1.5", "timm==0.6.13", "fairscale==0.4.13", "transformers==4.57.6",
                  "clip-anytorch", "setuptools<81"]

(`deploy/serve-rewards-paper.yaml` has it as an app.) The package's `load()` downloads
`ImageReward.pt`, `med_config.json` and the bert-base-uncased tokenizer from the hub unless given
local files (`name`: a checkpoint path, `med_config`, `tokenizer_dir`).

Checked in the package's own venv (the one `tools/verify_image_reward.py --make-venv` builds, plus
pydantic and pyyaml) on that script's random-weight checkpoint: scores and d score / d image equal the
package's `score_gard` on ReFL's torchvision preprocessing bitwise (max |diff| 0.0 for both).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .clip import clip_preprocess
from .image_reward import IMAGE_MEAN, IMAGE_STD, MAX_LENGTH


def shim_transformers() -> None:
    """BLIP's med.py imports three helpers from transformers.modeling_utils that moved to
    transformers.pytorch_utils; put them back (enough on transformers 4.57.6, not on 5.x)."""
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    for name in ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer"):
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))


class ImageRewardPackage(torch.nn.Module):
    name = "imagereward-package"
    differentiable = True

    def __init__(self, name: str = "ImageReward-v1.0", download_root: str | None = None, med_config: str | None = None,
                 tokenizer_dir: str | None = None, device: str = "cpu"):
        super().__init__()
        shim_transformers()
        try:
            import ImageReward
            import ImageReward.models.BLIP.blip_pretrain as blip_pretrain
        except ImportError as err:
            raise ImportError("the image-reward package is not importable here: run this model in a Serve replica "
                              "with the runtime_env in this module's docstring, or use the built-in `imagereward`"
                              ) from err
        if tokenizer_dir is not None:  # BLIP's init_tokenizer, from a local bert-base-uncased directory
            from transformers import BertTokenizer

            def init_tokenizer():
                tokenizer = BertTokenizer.from_pretrained(tokenizer_dir)
                tokenizer.add_special_tokens({"bos_token": "[DEC]"})
                tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
                tokenizer.enc_token_id = tokenizer.additional_special_tokens_ids[0]
                return tokenizer

            blip_pretrain.init_tokenizer = init_tokenizer
        self.model = ImageReward.load(name, device=device, download_root=download_root, med_config=med_config)
        self.model.eval().requires_grad_(False)
        self.device = torch.device(device)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The package's differentiable `score_gard`, on images preprocessed as ReFL does (on tensors)."""
        pixels = clip_preprocess(images.to(self.device, torch.float32), 224, 224, IMAGE_MEAN, IMAGE_STD)
        tokens = self.model.blip.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH,
                                           return_tensors="pt").to(self.device)
        return self.model.score_gard(tokens.input_ids, tokens.attention_mask, pixels).squeeze(1).to(images.device)
