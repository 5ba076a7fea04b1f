"""Check `reward_servers.models.image_reward.ImageReward` against the `image-reward` package itself.

The package (PyPI image-reward 1.5) does not import on the transformers 5 that the project uses, so it
runs in its own venv. Step `reference` (in that venv) builds the package's own `ImageReward` model with
random weights at the real sizes (BLIP ViT-L/16 at 224 px, med BERT-base with cross-attention, MLP head),
saves its state dict as `ImageReward.pt` plus `med_config.json` and a BERT vocab, and scores random
images with the package's differentiable `score_gard` path (preprocessed as ReFL.py does: torchvision
Resize(224, bicubic) + CenterCrop + Normalize on tensors) and with its PIL `score` path; it saves scores,
d score / d image and the token ids. Step `compare` (project venv) loads those files through our
`ImageReward` (registry name "imagereward", so `convert_image_reward_state_dict` and
`torch.load(weights_only=True)` run on the package's own state dict) and compares. Nothing is downloaded.

The reference venv (torch comes from this machine's wheels, pinned like the project's):

    python3 -m venv /tmp/ir-venv
    /tmp/ir-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/ir-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 image-reward==1.5 timm==0.6.13 \\
        fairscale==0.4.13 transformers==4.57.6 clip-anytorch "setuptools<81"

(`--make-venv` runs exactly these if the venv is missing.) What the package needs beyond its metadata:
`clip` (PyPI clip-anytorch) and `pkg_resources` (setuptools<81) are imported but not declared; its
`med.py` imports `apply_chunking_to_forward`, `find_pruneable_heads_and_indices` and `prune_linear_layer`
from `transformers.modeling_utils`, which no longer re-exports them (they live in
`transformers.pytorch_utils`), so `_shim_transformers` puts them back before the import -- enough on
transformers 4.57.6, not on 5.x. `ImageReward.load()` would download the weights and `init_tokenizer`
bert-base-uncased; neither is called: the model class is built from a local med_config.json, and
`init_tokenizer` is patched to build BLIP's tokenizer from a local 30522-line BERT-style vocab.

Run (from the repository root; about 5 minutes on 2 CPU cores, 2 GB of files under --workdir):

    .venv/bin/python tools/verify_image_reward.py --make-venv

Result (2 CPU cores, float32, seed 0; real ViT-L/16 + BERT-base sizes; 4 images of 256x320 that go
through resize + crop and 2 of 224x224; 6 prompts, one truncated at 35 tokens; 2 min 40 s in all):

    token ids:                 identical (package: slow BertTokenizer on 4.57.6; ours: transformers 5)
    score_gard vs ours:        max |score diff| = 0.0 (bitwise equal; scores -1.741 .. -1.511)
    d score / d image:         max |grad diff|  = 0.0 (bitwise equal; max |grad| 3.9e-3)
    PIL `score` path vs ours:  max |score diff| = 8.3e-7 (224x224 images, uint8 values)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_COMMANDS = [
    ["{python}", "-m", "venv", "{venv}"],
    ["{venv}/bin/pip", "install", "torch==2.14.1", "torchvision==0.29.1"],
    ["{venv}/bin/pip", "install", "torch==2.14.1", "torchvision==0.29.1", "image-reward==1.5", "timm==0.6.13",
     "fairscale==0.4.13", "transformers==4.57.6", "clip-anytorch", "setuptools<81"],
]

# BLIP's med_config.json as THUDM/ImageReward ships it (BERT-base; encoder_width is overridden to 1024).
MED_CONFIG = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
              "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert",
              "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2,
              "vocab_size": 30524, "encoder_width": 768, "add_cross_attention": True}
# Smaller text encoder for --small (the ViT stays ViT-L: encoder_width 1024 is what matters).
SMALL_MED = {**MED_CONFIG, "hidden_size": 768, "num_hidden_layers": 2}

WORDS = ("a an the of in on at with and photo painting portrait cat dog red blue green yellow small large "
         "astronaut riding horse castle mountain sunset city night forest river oil watercolor detailed "
         "beautiful girl boy old man woman car street rain snow flower garden sky cloud digital art style "
         "trending highly render light dark sea ship by").split()
SUFFIXES = ["##s", "##ing", "##ed", "##er", "##ly"]
PROMPTS_A = ["a photo of an astronaut riding a horse",
             "oil painting of a castle on a mountain at sunset, highly detailed",
             "a small red cat",
             "a beautiful girl with flowers in a garden under the rain and snow at night by the river and the sea "
             "with ships and cars on the street in the city, digital art, trending, highly detailed render"]
PROMPTS_B = ["watercolor portrait of an old man", "dark forest, blue sky, clouds"]


def _vocab() -> list[str]:
    """A bert-base-uncased-shaped vocab (30522 entries; [PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102,
    [MASK]=103), so ids line up with the 30524-row embedding after BLIP adds [DEC] and [ENC]."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += list(dict.fromkeys(WORDS + [",", "."] + SUFFIXES))
    vocab += [f"[unused{i}]" for i in range(99, 99 + 30522 - len(vocab))]
    assert len(vocab) == 30522
    return vocab


def _shim_transformers() -> None:
    """Re-export the helpers BLIP's med.py imports from transformers.modeling_utils (moved to pytorch_utils)."""
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    for name in ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer"):
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))


def _randomise(model, generator) -> None:
    """Move every parameter off its structured init (LayerNorms at 1/0, zero biases), so a swapped or
    dropped tensor changes the result, and give the MLP head unit-gain weights (its own init, std 1/769
    over five linear layers, makes every score the same constant and the comparison vacuous)."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.startswith("mlp.") and name.endswith("weight"):
                param.copy_(noise / param.shape[1] ** 0.5)
            elif name.startswith("mlp."):
                param.copy_(noise * 0.1)
            elif param.dim() == 1:  # LayerNorm weights/biases and biases
                param.add_(noise * 0.1)
            else:
                param.add_(noise * 0.01)


def reference(workdir: Path, small: bool) -> None:
    """In the image-reward venv: build, save and score the package's own model."""
    import torch

    torch.set_num_threads(2)
    _shim_transformers()
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize
    from transformers import BertTokenizer

    import ImageReward.models.BLIP.blip_pretrain as blip_pretrain
    from ImageReward.ImageReward import ImageReward as PackageImageReward

    workdir.mkdir(parents=True, exist_ok=True)
    vocab_dir = workdir / "bert-vocab"
    vocab_dir.mkdir(exist_ok=True)
    (vocab_dir / "vocab.txt").write_text("\n".join(_vocab()) + "\n")
    (workdir / "med_config.json").write_text(json.dumps(SMALL_MED if small else MED_CONFIG))

    def init_tokenizer():  # BLIP's init_tokenizer, from the local vocab instead of the hub
        tokenizer = BertTokenizer(vocab_file=str(vocab_dir / "vocab.txt"))
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tokenizer.enc_token_id = tokenizer.additional_special_tokens_ids[0]
        return tokenizer

    blip_pretrain.init_tokenizer = init_tokenizer
    torch.manual_seed(0)
    model = PackageImageReward(med_config=str(workdir / "med_config.json"), device="cpu").eval()
    _randomise(model, torch.Generator().manual_seed(0))
    torch.save(model.state_dict(), workdir / "ImageReward.pt")

    generator = torch.Generator().manual_seed(1)
    images_a = torch.rand((len(PROMPTS_A), 3, 256, 320), generator=generator)
    images_b = (torch.rand((len(PROMPTS_B), 3, 224, 224), generator=generator) * 255).round() / 255
    # ReFL.py's preprocessing of generated image tensors before score_gard.
    preprocess = Compose([Resize(224, interpolation=InterpolationMode.BICUBIC), CenterCrop(224),
                          Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])

    def score_gard(images, prompts):
        images = images.clone().requires_grad_(True)
        tokens = model.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35,
                                      return_tensors="pt")
        rewards = model.score_gard(tokens.input_ids, tokens.attention_mask, preprocess(images)).squeeze(1)
        rewards.sum().backward()
        return rewards.detach(), images.grad, tokens.input_ids

    scores_a, grads_a, ids_a = score_gard(images_a, PROMPTS_A)
    scores_b, grads_b, ids_b = score_gard(images_b, PROMPTS_B)
    from PIL import Image

    pil_b = []
    with torch.no_grad():
        for image, prompt in zip(images_b, PROMPTS_B):
            array = (image * 255).round().byte().permute(1, 2, 0).numpy()
            pil_b.append(model.score(prompt, Image.fromarray(array)))
    torch.save({"prompts_a": PROMPTS_A, "prompts_b": PROMPTS_B, "images_a": images_a, "images_b": images_b,
                "scores_a": scores_a, "grads_a": grads_a, "ids_a": ids_a, "scores_b": scores_b, "grads_b": grads_b,
                "ids_b": ids_b, "pil_scores_b": torch.tensor(pil_b)}, workdir / "reference.pt")
    print(f"reference: scores {scores_a.tolist()} {scores_b.tolist()}; PIL path {pil_b}")


def compare(workdir: Path) -> dict:
    """In the project venv: load the package's files through our ImageReward and compare."""
    import torch

    torch.set_num_threads(2)
    sys.path.insert(0, str(REPO))
    from reward_servers import load_reward_model

    ref = torch.load(workdir / "reference.pt", weights_only=True)
    model = load_reward_model("imagereward", {"path": str(workdir), "tokenizer": str(workdir / "bert-vocab"),
                                              "local_files_only": True})
    results = {}
    for batch in ("a", "b"):
        prompts, images = ref[f"prompts_{batch}"], ref[f"images_{batch}"].clone().requires_grad_(True)
        ids = model.tokenizer(prompts, padding="max_length", truncation=True, max_length=35,
                              return_tensors="pt")["input_ids"]
        scores = model.score(images, prompts)
        scores.sum().backward()
        results[f"ids_equal_{batch}"] = bool(torch.equal(ids, ref[f"ids_{batch}"]))
        results[f"max_abs_score_diff_{batch}"] = (scores.detach() - ref[f"scores_{batch}"]).abs().max().item()
        results[f"max_abs_grad_diff_{batch}"] = (images.grad - ref[f"grads_{batch}"]).abs().max().item()
        results[f"max_abs_grad_{batch}"] = ref[f"grads_{batch}"].abs().max().item()
        results[f"scores_{batch}"] = ref[f"scores_{batch}"].tolist()
        if batch == "b":
            results["max_abs_score_diff_pil_b"] = (scores.detach() - ref["pil_scores_b"]).abs().max().item()
    results["max_abs_score_diff"] = max(results["max_abs_score_diff_a"], results["max_abs_score_diff_b"])
    results["max_abs_grad_diff"] = max(results["max_abs_grad_diff_a"], results["max_abs_grad_diff_b"])
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step", choices=["all", "reference", "compare"], default="all")
    parser.add_argument("--venv", type=Path, default=Path("/tmp/ir-venv"), help="venv with image-reward 1.5")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ir-verify"), help="where the files go (~2 GB)")
    parser.add_argument("--make-venv", action="store_true", 
                        help="create --venv with the pinned pip commands if missing")
    parser.add_argument("--small", action="store_true", help="2-layer text encoder (faster; the ViT stays ViT-L)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs score difference allowed")
    args = parser.parse_args()

    if args.step == "reference":
        reference(args.workdir, args.small)
        return 0
    if args.step == "all":
        python = args.venv / "bin" / "python"
        if not python.exists():
            if not args.make_venv:
                print(f"{python} is missing: rerun with --make-venv, or create it with the commands in this "
                      "script's docstring", file=sys.stderr)
                return 2
            for command in VENV_COMMANDS:
                subprocess.run([part.format(python=sys.executable, venv=args.venv) for part in command], check=True)
        command = [str(python), __file__, "--step", "reference", "--workdir", str(args.workdir)]
        subprocess.run(command + (["--small"] if args.small else []), check=True)
    results = compare(args.workdir)
    print(json.dumps(results, indent=2))
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2))
    ok = (results["ids_equal_a"] and results["ids_equal_b"] and results["max_abs_score_diff"] <= args.tolerance
          and results["max_abs_score_diff_pil_b"] <= args.tolerance)
    print("OK" if ok else f"MISMATCH (tolerance {args.tolerance})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
