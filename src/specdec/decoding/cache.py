"""A model's KV cache for a batch whose rows advance by different amounts: one interface
(`KVCache`), a growing cache (`RaggedCache`) and a preallocated one (`StaticRaggedCache`),
chosen per model in one place (`open_cache`).

A cache opened with `hidden_ids` also keeps, from each forward, the model's hidden states of
those ids beside the logits (`KVCache.hidden`): id k is transformers' `hidden_states[k]`
(0: the embedding output; k < L: the residual stream after layer k - 1, which is vLLM's
EAGLE-3 auxiliary layer id k; L: the final normed state). Transformers captures only the
selected ids (`output_hidden_states=[ids]`, hooks on the decoder layers), in the same forward;
a cache without ids asks for nothing.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache, StaticCache


def model_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def logits_and_hidden(output, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A causal LM's (logits, the hidden states `kwargs["output_hidden_states"]` selected,
    concatenated along the last dimension (B, T, len(ids) * H), or None when none were)."""
    ids = kwargs.get("output_hidden_states")
    return output.logits, (torch.cat([output.hidden_states[i] for i in ids], dim=-1) if ids else None)


def _attention_format(mask: torch.Tensor, model, dtype: torch.dtype) -> torch.Tensor:
    """A (B, 1, T, S) bool mask (True: attend) as the model's attention takes a ready 4D mask:
    bool for SDPA and flex, additive float for eager attention."""
    if model.config._attn_implementation != "eager":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def _cache_kwarg(model) -> str:
    # transformers 5.23 renamed the forward's `past_key_values` to `cache`; an unknown
    # keyword would be swallowed by **kwargs and the model would run uncached.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class KVCache(ABC):
    """A transformers cache plus a (B, S) mask of which cache slots hold each row's tokens.

    A transformers cache has one length for the whole batch, but rows accept different
    numbers of draft tokens. Rather than cropping to the shortest row and re-feeding the
    others, a rejected token's slot stays in the cache and is masked out for good: every later
    query of that row ignores it, exactly like left padding. Position ids count only a row's
    valid slots, so each row sees the same positions and the same keys it would see decoded
    alone. After each step the slots that no row kept are dropped from the tail, so the
    cache grows by the longest accepted run, not by gamma. `used` (on the host) counts the
    slots written so far; `lengths` (B,) the valid ones per row. `hidden`: the hidden states
    the last forward gave beside its logits (B, T, ...), or None.
    """

    cache: object  # the transformers cache
    mask: torch.Tensor  # (B, S) bool
    used: int

    def __init__(self, model, batch: int, device: torch.device, hidden_ids: tuple[int, ...] = ()):
        self.model = model
        self.cache_kwarg = _cache_kwarg(model)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.hidden_ids = tuple(hidden_ids)
        self.hidden: torch.Tensor | None = None
        self.dtype = next(model.parameters()).dtype

    @classmethod
    def prefill(cls, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
        """Cache a left-padded prompt batch; returns (cache, logits of the last position (B, V)).
        The hidden states (`hidden_ids`) cover every prompt position."""
        cache = cls(model, input_ids.shape[0], input_ids.device, **kwargs)
        return cache, cache.feed(cache._eager_step, input_ids, attention_mask.bool(), 1)[:, -1]

    def extend(self, tokens: torch.Tensor, valid: torch.Tensor, logits_to_keep: int = 0,
               ancestry: torch.Tensor | None = None) -> torch.Tensor:
        """Run the model on (B, T) new tokens; `valid` (B, T) marks the real ones (the rest are
        holes no query will ever attend to); `ancestry` makes them a token tree (`feed`).
        Returns logits (B, T or logits_to_keep, V)."""
        return self.feed(self._eager_step, tokens, valid, logits_to_keep, ancestry)

    def _eager_step(self, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        return logits_and_hidden(self.model(**kwargs), kwargs)

    def feed(self, step: Callable, tokens: torch.Tensor, valid: torch.Tensor, logits_to_keep: int,
             ancestry: torch.Tensor | None = None) -> torch.Tensor:
        """`step(**model kwargs)` -> (logits, hidden states or None), on the tokens placed after
        the cached ones: the one place positions and the mask are made. Returns the logits and
        keeps the hidden states in `hidden`.

        `ancestry` (B, T, A), A >= T: which of the last A slots (the A - T cached last, then the
        T new ones) each new token sees, a token tree's (trees.py); the slots before those it
        sees as the row's mask says. A token's position counts the valid slots it sees, so a
        tree node sits at its depth. None: each token sees every earlier valid slot (causal).
        """
        if ancestry is None:
            positions = (self.lengths[:, None] + valid.cumsum(1) - 1).clamp_(min=0)
            self._write_mask(valid)
            mask = self.mask
        else:
            self._write_mask(valid)
            span = ancestry.shape[-1]
            start = self.used - span
            sees = ancestry & self.mask[:, None, start : self.used]
            positions = (self.mask[:, :start].sum(1)[:, None] + sees.sum(-1) - 1).clamp_(min=0)
            mask = self.mask[:, None, None, :].repeat(1, 1, tokens.shape[1], 1)
            mask[:, 0, :, start : self.used] = sees
            mask = _attention_format(mask, self.model, self.dtype)
        self.lengths = self.lengths + valid.sum(1)
        selected = {"output_hidden_states": list(self.hidden_ids)} if self.hidden_ids else {}
        logits, self.hidden = step(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                                   **{self.cache_kwarg: self.cache}, logits_to_keep=logits_to_keep, **selected)
        return logits

    def rollback(self, keep: torch.Tensor, window: int, max_keep: int, order: torch.Tensor | None = None) -> None:
        """Of the last `window` slots, row b keeps the first keep[b]; `max_keep` = max(keep)
        (known on the host), so slots past it are dropped for every row. `order` (B, max_keep):
        the window slots each row keeps, in order (a token tree's accepted path), moved to the
        window's front first: keys and values are gathered, never recomputed (a node's were
        computed at its depth's position, which is its position on the path)."""
        start = self.used - window
        if order is not None:
            slots = start + order
            for layer in self.cache.layers:
                for buffer in (layer.keys, layer.values):
                    index = slots[:, None, :, None].expand(-1, buffer.shape[1], -1, buffer.shape[3])
                    buffer[:, :, start : start + max_keep] = buffer.gather(2, index)
            self.mask[:, start : start + max_keep] = self.mask.gather(1, slots)
        span = torch.arange(window, device=keep.device)
        tail = self.mask[:, start : self.used]
        dropped = (span >= keep[:, None]) & tail
        tail &= ~dropped
        self.lengths = self.lengths - dropped.sum(1)
        surplus = window - max_keep
        if surplus > 0:
            self.cache.crop(-surplus)  # transformers 5: crop(-k) drops the last k slots
            self._drop_tail(surplus)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (finished rows leave the batch)."""
        self._select_cache(rows)
        self.mask = self.mask[rows]
        self.lengths = self.lengths[rows]

    @abstractmethod
    def _write_mask(self, valid: torch.Tensor) -> None:
        """Append (B, T) slots to the mask (and to `used`)."""

    @abstractmethod
    def _drop_tail(self, slots: int) -> None:
        """Forget the mask's last `slots` slots (the cache was cropped already)."""

    @abstractmethod
    def _select_cache(self, rows: torch.Tensor) -> None:
        """Keep the transformers cache's given rows."""


class RaggedCache(KVCache):
    """A `DynamicCache`: it grows by each step's slots and is cropped on rollback."""

    def __init__(self, model, batch: int, device: torch.device, hidden_ids: tuple[int, ...] = ()):
        super().__init__(model, batch, device, hidden_ids)
        self.cache = DynamicCache(config=model.config)
        self.mask = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        self.used = 0

    def _write_mask(self, valid):
        self.mask = torch.cat([self.mask, valid], dim=1)
        self.used += valid.shape[1]

    def _drop_tail(self, slots):
        self.mask = self.mask[:, :-slots]
        self.used -= slots

    def _select_cache(self, rows):
        self.cache.batch_select_indices(rows)


@dataclass
class StaticSetup:
    """A model decoded with preallocated caches of `max_length` slots, whose step forwards
    `step` runs (the model itself, or its compiled forward: see compiled.py): model kwargs ->
    (logits, the hidden states they select or None), as `logits_and_hidden` returns them.

    The caches are allocated once per (user, batch size) and reused by every later
    `generate()`: captured graphs read the cache at fixed addresses. The target and a drafter
    are distinct users, so one model may be both (its own drafter). One `generate()` at a
    time per model.
    """

    max_length: int
    step: Callable
    compiled: bool = False  # step is a compiled forward: it runs its own kernels (not kernels.py's)
    caches: dict[tuple[str, int], StaticCache] = field(default_factory=dict)

    def cache(self, model, user: str, batch: int) -> StaticCache:
        key = (user, batch)
        if key not in self.caches:
            self.caches[key] = StaticCache(config=model.config, max_cache_len=self.max_length)
        return self.caches[key]


_STATIC = "_specdec_static_cache"


def use_static_cache(model, max_length: int, compiled_step: Callable | None = None) -> StaticSetup:
    """Decode `model` with static caches of `max_length` slots from now on; its step
    forwards run eagerly, or through `compiled_step` (`StaticSetup.step`)."""
    setup = StaticSetup(max_length, compiled_step or (lambda **kwargs: logits_and_hidden(model(**kwargs), kwargs)),
                        compiled_step is not None)
    setattr(model, _STATIC, setup)
    return setup


def use_dynamic_cache(model) -> None:
    """Back to the growing cache (drops the static caches)."""
    restore_static_cache(model, None)


def restore_static_cache(model, setup: StaticSetup | None) -> None:
    """Decode `model` with a setup made earlier (`static_setup`), its caches and compiled
    steps as they were, or with the growing cache (None): a bench switches paths per run."""
    if setup is not None:
        setattr(model, _STATIC, setup)
    elif hasattr(model, _STATIC):
        delattr(model, _STATIC)


def static_setup(model) -> StaticSetup | None:
    return getattr(model, _STATIC, None)


def open_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, user: str, room: int = 0,
               hidden_ids: tuple[int, ...] = ()):
    """The one place a cache is chosen: prefill the model's static cache if it has one
    (`use_static_cache`), else a growing one. `room`: slots the caller will add beyond the
    prompt (checked against a static cache's length); `hidden_ids`: the hidden states every
    forward keeps (`KVCache.hidden`). Returns (cache, last logits (B, V))."""
    setup = static_setup(model)
    if setup is None:
        return RaggedCache.prefill(model, input_ids, attention_mask, hidden_ids=hidden_ids)
    need = input_ids.shape[1] + room
    if need > setup.max_length:
        raise ValueError(f"the static cache holds {setup.max_length} slots; this batch needs {need} "
                         f"(prompt {input_ids.shape[1]} + {room}): raise its max_length")
    return StaticRaggedCache.prefill(model, input_ids, attention_mask, hidden_ids=hidden_ids, setup=setup, user=user)


class StaticRaggedCache(KVCache):
    """Transformers' `StaticCache` (preallocated, written at its own pointer
    `cumulative_length`, `crop(-k)` moves the pointer back) behind the same interface.

    The mask spans all `max_length` slots, those past `used` masked out, so every step
    forward has the shape (batch, width) -> fixed cache tensors: a captured graph per shape.
    Two things StaticCache cannot do are done here: rows leaving the batch (a `StaticLayer`
    has no `batch_select_indices` in transformers 5.24, and a new batch size must land in that
    batch size's own preallocated cache, not in a fresh tensor), and compaction: ragged rows
    leave masked slots behind, so when a step would run past the end, each row's valid slots
    are moved to the front (order kept, so positions and keys are unchanged). Rows keep at
    most prompt + max_new_tokens tokens, so a length of that plus gamma + 1 always has room.
    """

    def __init__(self, model, batch: int, device: torch.device, setup: StaticSetup, user: str,
                 hidden_ids: tuple[int, ...] = ()):
        super().__init__(model, batch, device, hidden_ids)
        self.setup, self.user = setup, user
        self.cache = setup.cache(model, user, batch)
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.cumulative_length.zero_()  # stale slots past the pointer are masked out
        self.mask = torch.zeros(batch, setup.max_length, dtype=torch.bool, device=device)
        self.used = 0

    def extend(self, tokens, valid, logits_to_keep=0, ancestry=None):
        # Every step returns all its logits: one graph per (batch, width), whatever is kept.
        logits = self.feed(self.setup.step, tokens, valid, 0, ancestry)
        return logits[:, -logits_to_keep:] if logits_to_keep else logits

    def _write_mask(self, valid):
        width = valid.shape[1]
        if self.used + width > self.setup.max_length:
            self._compact()
        if self.used + width > self.setup.max_length:
            raise ValueError(f"the static cache of {self.setup.max_length} slots cannot take {width} more "
                             f"after {self.used}: raise its max_length")
        self.mask[:, self.used : self.used + width] = valid
        self.used += width

    def _drop_tail(self, slots):
        self.used -= slots
        self.mask[:, self.used : self.used + slots] = False

    def _compact(self) -> None:
        kept = int(self.lengths.max())
        # Stable sort: holes first, then each row's valid slots in their order; the last
        # `kept` of them become slots 0 .. kept - 1.
        order = torch.sort(self.mask[:, : self.used].to(torch.uint8), dim=1, stable=True).indices[:, self.used - kept :]
        for layer in self.cache.layers:
            for buffer in (layer.keys, layer.values):
                index = order[:, None, :, None].expand(-1, buffer.shape[1], -1, buffer.shape[3])
                buffer[:, :, :kept] = buffer.gather(2, index)
            layer.cumulative_length.fill_(kept)
        self.mask[:, :kept] = self.mask.gather(1, order)
        self.mask[:, kept:] = False
        self.used = kept

    def _select_cache(self, rows):
        target = self.setup.cache(self.model, self.user, len(rows))
        for old, new in zip(self.cache.layers, target.layers):
            keys, values = old.keys[rows], old.values[rows]
            if not new.is_initialized:
                new.lazy_initialization(keys, values)
            new.keys.copy_(keys)
            new.values.copy_(values)
            new.cumulative_length.copy_(old.cumulative_length)
        self.cache = target
