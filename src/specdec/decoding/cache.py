"""A model's KV cache for a batch whose rows advance by different amounts."""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache


def model_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


class RaggedCache:
    """A transformers `DynamicCache` plus a (B, S) mask of which cache slots hold each row's tokens.

    A `DynamicCache` has one length for the whole batch, but rows accept different numbers of
    draft tokens. Rather than cropping to the shortest row and re-feeding the others, a
    rejected token's slot stays in the cache and is masked out for good: every later query of
    that row ignores it, exactly like left padding. Position ids count only a row's valid
    slots, so each row sees the same positions and the same keys it would see decoded alone.
    After each step the slots that no row kept are cropped from the tail (transformers 5:
    `crop(-k)` removes k slots), so the cache grows by the longest accepted run, not by gamma.
    """

    def __init__(self, model, batch: int, device: torch.device):
        self.model = model
        # transformers 5.23 renamed the forward's `past_key_values` to `cache`; an unknown
        # keyword would be swallowed by **kwargs and the model would run uncached.
        self.cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.cache = DynamicCache(config=model.config)
        self.mask = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)

    @classmethod
    def prefill(cls, model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Cache a left-padded prompt batch; returns (cache, logits of the last position (B, V))."""
        cache = cls(model, input_ids.shape[0], input_ids.device)
        return cache, cache.extend(input_ids, attention_mask.bool(), logits_to_keep=1)[:, -1]

    def extend(self, tokens: torch.Tensor, valid: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        """Run the model on (B, T) new tokens; `valid` (B, T) marks the real ones (the rest are
        holes no query will ever attend to). Returns logits (B, T or logits_to_keep, V)."""
        positions = (self.lengths[:, None] + valid.cumsum(1) - 1).clamp_(min=0)
        self.mask = torch.cat([self.mask, valid], dim=1)
        self.lengths = self.lengths + valid.sum(1)
        out = self.model(
            input_ids=tokens,
            attention_mask=self.mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_kwarg: self.cache},
            logits_to_keep=logits_to_keep,
        )
        return out.logits

    def rollback(self, keep: torch.Tensor, window: int, max_keep: int) -> None:
        """Of the last `window` slots, row b keeps the first keep[b]; `max_keep` = max(keep)
        (known on the host), so slots past it are cropped for every row."""
        span = torch.arange(window, device=keep.device)
        dropped = (span >= keep[:, None]) & self.mask[:, -window:]
        self.mask[:, -window:] &= ~dropped
        self.lengths = self.lengths - dropped.sum(1)
        surplus = window - max_keep
        if surplus > 0:
            self.cache.crop(-surplus)
            self.mask = self.mask[:, :-surplus]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (finished rows leave the batch)."""
        self.cache.batch_select_indices(rows)
        self.mask = self.mask[rows]
        self.lengths = self.lengths[rows]
