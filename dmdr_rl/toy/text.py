"""The toy prompt encoder: a word-level `tokenizers` tokenizer and a tiny CLIP text model.

It produces the SD3 conditioning interface (per-token hidden states and a pooled vector). It is
trained together with the teacher and then frozen; the empty prompt "" is the CFG null prompt.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModelWithProjection
from transformers.utils import logging as transformers_logging

from ..conditioning import Conditioning
from .grammar import vocabulary

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
MAX_TOKENS = 12  # the longest grammar prompt has 8 words, plus BOS and EOS
TOKENIZER_FILE = "tokenizer.json"


def check_prompts(prompts: Sequence[str], tokenizer: Tokenizer | None = None) -> list:
    """The encodings of `prompts`, or a ValueError naming a prompt the toy text encoder cannot take: a word
    outside the grammar's vocabulary, or more words than it has room for. The encoder and every check
    before a run (dry run, trainers, `sample`) use this one function."""
    tokenizer = tokenizer or build_tokenizer()
    unk, limit = tokenizer.token_to_id(UNK), MAX_TOKENS - 2
    encodings = tokenizer.encode_batch(list(prompts))
    for prompt, enc in zip(prompts, encodings):
        words = [word for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(prompt.lower())]
        if len(words) > limit:
            raise ValueError(f"prompt {prompt!r} is longer than {limit} words")
        if unk in enc.ids:
            unknown = [w for w, i in zip(words, enc.ids[1:]) if i == unk]
            raise ValueError(f"unknown word(s) {unknown} in prompt {prompt!r}; the toy vocabulary is: "
                             f"{' '.join(sorted(vocabulary()))}")
    return encodings


def build_tokenizer() -> Tokenizer:
    """Word-level tokenizer over the grammar's vocabulary, padding every prompt to MAX_TOKENS."""
    vocab = {token: i for i, token in enumerate([PAD, UNK, BOS, EOS, *vocabulary()])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    tokenizer.enable_padding(pad_id=vocab[PAD], pad_token=PAD, length=MAX_TOKENS)
    tokenizer.enable_truncation(MAX_TOKENS)
    return tokenizer


def text_model_config(tokenizer: Tokenizer, width: int = 64) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        pad_token_id=tokenizer.token_to_id(PAD),
        bos_token_id=tokenizer.token_to_id(BOS),
        eos_token_id=tokenizer.token_to_id(EOS),
    )


@contextlib.contextmanager
def _no_loading_bar():
    """transformers' loading progress bar off for one call, as it was before."""
    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


class ToyTextEncoder(torch.nn.Module):
    """prompts -> Conditioning(tokens [B, 12, 64], pooled [B, 64])."""

    def __init__(self, tokenizer: Tokenizer, model: CLIPTextModelWithProjection):
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model
        self._unk = tokenizer.token_to_id(UNK)

    @classmethod
    def create(cls, seed: int = 0) -> "ToyTextEncoder":
        tokenizer = build_tokenizer()
        torch.manual_seed(seed)
        return cls(tokenizer, CLIPTextModelWithProjection(text_model_config(tokenizer)))

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    def token_ids(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts, not one string")
        encodings = check_prompts(prompts, self.tokenizer)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask

    def forward(self, prompts: Sequence[str]) -> Conditioning:
        if len(prompts) == 0:
            raise ValueError("encode() got an empty prompt list; pass at least one prompt")
        ids, mask = self.token_ids(prompts)
        device = self.model.device
        out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device))
        return Conditioning(tokens=out.last_hidden_state, pooled=out.text_embeds)

    encode = forward

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.model.save_pretrained(directory)
        self.tokenizer.save(str(directory / TOKENIZER_FILE))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "ToyTextEncoder":
        directory = Path(directory)
        tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        with _no_loading_bar():  # 37 small tensors: a bar only adds a line to each actor's log
            return cls(tokenizer, CLIPTextModelWithProjection.from_pretrained(directory))
