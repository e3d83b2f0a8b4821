"""Prompt handling: the original's prompt strings and a per-prompt-pair cache of text contexts.

The text context depends only on (prompt + ', ' + a_prompt, n_prompt, num_samples), so it is encoded once per
pair and reused for every image, which takes CLIP off the per-image path.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch

from models.tokenizer import tokenize


def positive_prompt(prompt: str, a_prompt: str) -> str:
    return prompt + ", " + a_prompt


class PromptCache:
    """(positive, negative, num_samples) -> context (2B, 77, D) = [cond] * B + [uncond] * B, LRU-bounded."""

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], device, capacity: int = 16):
        self._encode = encode
        self._device = device
        self._capacity = capacity
        self._cache: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()

    def get(self, positive: str, negative: str, num_samples: int) -> torch.Tensor:
        key = (positive, negative, num_samples)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        ids = tokenize([positive] * num_samples + [negative] * num_samples).to(self._device)
        context = self._encode(ids)
        self._cache[key] = context
        if len(self._cache) > self._capacity:
            self._cache.popitem(last=False)
        return context
