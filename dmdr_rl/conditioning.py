"""Prompt conditioning as plain tensors, so it moves through Ray's object store unchanged."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    """What a text encoder hands the denoiser (the SD3 interface)."""

    tokens: torch.Tensor  # [B, L, D] encoder_hidden_states
    pooled: torch.Tensor  # [B, P] pooled_projections

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, *args, **kwargs) -> "Conditioning":
        """Both tensors moved or cast, with `torch.Tensor.to`'s arguments (device and/or dtype)."""
        return Conditioning(self.tokens.to(*args, **kwargs), self.pooled.to(*args, **kwargs))

    def __getitem__(self, index: slice) -> "Conditioning":
        """The conditioning of a slice of the batch."""
        return Conditioning(self.tokens[index], self.pooled[index])

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        return Conditioning(torch.cat([p.tokens for p in parts]), torch.cat([p.pooled for p in parts]))
