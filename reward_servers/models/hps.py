"""HPSv2 / HPSv2.1 (Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on human preference pairs.
score = cos(image embedding, prompt embedding), as `hpsv2.score` computes it, but with tensor
preprocessing so the score is differentiable. Built on `open_clip_torch` (which ships the tokenizer
vocabulary) instead of the `hpsv2` package, whose pins (protobuf<4) break Ray Serve."""

from __future__ import annotations

from .open_clip_score import OpenClipScore

HUB_REPO = "xswu/HPSv2"
CHECKPOINTS = {"v2": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


class HPSv2(OpenClipScore):
    def __init__(self, version: str = "v2.1", checkpoint: str | None = None, architecture: str = "ViT-H-14",
                 model_config: str | None = None, cache_dir: str | None = None, device: str | None = None):
        """`checkpoint`: a local HPS checkpoint file; null downloads `CHECKPOINTS[version]` from the hub
        repo xswu/HPSv2. `model_config`: an open_clip model-config JSON to register first (for an
        architecture open_clip does not ship; the tests use a tiny one)."""
        if version not in CHECKPOINTS:
            raise ValueError(f"HPS version {version!r} is unknown; allowed: {', '.join(CHECKPOINTS)}")
        # HPSv2's scorer resizes the longest side and pads (open_clip's resize_longest_max), unlike plain CLIP
        super().__init__(architecture, checkpoint, HUB_REPO, CHECKPOINTS[version], model_config, cache_dir, device,
                         resize="longest", name=f"hps{version}")
