"""EAGLE-3 as a drafter: a one-layer head that drafts from the target's own hidden states
(Li et al., 2025), computed as vLLM runs it (`model_executor/models/llama_eagle3.py`, the
proposer in `v1/spec_decode/eagle.py`).

The head fuses the target's auxiliary hidden states (`Eagle3Spec.aux_ids`, cache.py's ids,
ascending, as vLLM concatenates them) through `fc`, runs one Llama decoder layer whose
attention reads [normed token embedding, normed fused state] (2H wide), and scores a reduced
draft vocabulary (`lm_head`) whose entry i is target token i + d2t[i]. The token embedding
is the target's (shared) unless the checkpoint carries its own.

Slot j of the head's sequence pairs the target's state at token j with token j + 1, so the
slot holding the last emitted token predicts the first draft; each later draft feeds the
previous draft token with the head's own pre-norm output instead of a target state. After
verification those speculative slots are dropped and the kept tokens are fed again with the
target's states of the step just verified, as vLLM does.

A token tree is drafted a level at a time in the head's cache, as the model drafter grows
one (drafters.grow_tree): each node with children is fed with its parent's output state,
under the tree's attention over the speculative slots, at the position of its depth. The
tree is static (trees.TreeShape: a node's children are its best k tokens, or k draws
without replacement) or EAGLE-2's dynamic tree (trees.DynamicTree: the top_k nodes of each
depth by joint draft probability are expanded, the best `nodes` verified). A dynamic tree
is a point mass for the verifier: its nodes are a deterministic function of the head's
distributions, which is exact under sampling too (docs/methodology.md, "Token trees").
After verification the accepted path's tokens are fed again with the target's states of
their fed positions (the tree's path gathered, `StepOutcome.fed_path`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from .cache import RaggedCache
from .drafters import (Drafter, DraftSession, StepOutcome, grow_dynamic, grow_tree, on_target_vocab, static_draft,
                       static_or_dynamic)
from .sampling import Draft, Sampler
from .trees import DynamicTree, Level, TreeShape


def default_aux_ids(num_layers: int) -> tuple[int, ...]:
    """vLLM's default auxiliary layers for a target of `num_layers` decoder layers."""
    return (2, num_layers // 2, num_layers - 3)


@dataclass(frozen=True)
class Eagle3Spec:
    """What an EAGLE-3 head is, as its checkpoint's config says (head_formats.py reads it).

    layer: the head's Llama config (one decoder layer; vocab_size is the target's).
    aux_ids: the target's hidden states it fuses, ascending. norm_before_residual: the fused
    state enters the residual stream normed. norm_output: later drafts read the normed output.
    """

    layer: LlamaConfig
    aux_ids: tuple[int, ...]
    draft_vocab_size: int
    target_hidden_size: int
    norm_before_residual: bool = False
    norm_output: bool = False


class Eagle3Layer(nn.Module):
    """The head's decoder layer: a Llama layer whose q/k/v take 2H inputs (parameter names
    as the checkpoints' `midlayer.*`)."""

    def __init__(self, config: LlamaConfig, norm_before_residual: bool):
        super().__init__()
        width, eps = config.hidden_size, config.rms_norm_eps
        self.norm_before_residual = norm_before_residual
        self.input_layernorm = LlamaRMSNorm(width, eps=eps)
        self.hidden_norm = LlamaRMSNorm(width, eps=eps)
        self.self_attn = LlamaAttention(config, layer_idx=0)
        for name in ("q_proj", "k_proj", "v_proj"):
            projection = getattr(self.self_attn, name)
            setattr(self.self_attn, name, nn.Linear(2 * width, projection.out_features, bias=config.attention_bias))
        self.post_attention_layernorm = LlamaRMSNorm(width, eps=eps)
        self.mlp = LlamaMLP(config)

    def forward(self, embeds, hidden, position_embeddings, mask, cache) -> torch.Tensor:
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        both = torch.cat([self.input_layernorm(embeds), normed], dim=-1)
        attended, _ = self.self_attn(hidden_states=both, position_embeddings=position_embeddings,
                                     attention_mask=mask, cache=cache)
        residual = residual + attended
        return residual + self.mlp(self.post_attention_layernorm(residual))


class Eagle3Head(nn.Module):
    """fc, the decoder layer, norm, lm_head and the vocabulary maps d2t (draft -> target
    offsets) and t2d (target tokens in the draft vocabulary), as checkpoints name them.
    `embedding`: the target's input embedding, shared (None: the head has its own)."""

    def __init__(self, spec: Eagle3Spec, embedding: nn.Module | None = None):
        super().__init__()
        config = spec.layer
        self.spec = spec
        self.config = config  # the head's cache and mask read it
        self.own_embedding = embedding is None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if embedding is None else embedding
        self.fc = nn.Linear(len(spec.aux_ids) * spec.target_hidden_size, config.hidden_size, bias=False)
        self.midlayer = Eagle3Layer(config, spec.norm_before_residual)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, spec.draft_vocab_size, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.register_buffer("d2t", torch.zeros(spec.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool))

    def target_ids(self) -> torch.Tensor:
        """(draft_vocab_size,) the target token of each draft vocabulary entry."""
        return torch.arange(self.spec.draft_vocab_size, device=self.d2t.device) + self.d2t

    def forward(self, input_ids, attention_mask, position_ids, cache, hidden, use_cache=True, logits_to_keep=0):
        """One step over (B, T) tokens, each paired with a fused state `hidden` (B, T, H).
        Returns (draft-vocabulary logits (B, T or logits_to_keep, D), the states the next
        draft step reads (B, T, H))."""
        embeds = self.embed_tokens(input_ids)
        mask = create_causal_mask(config=self.config, inputs_embeds=embeds, attention_mask=attention_mask,
                                  cache=cache, position_ids=position_ids)
        out = self.midlayer(embeds, hidden, self.rotary_emb(embeds, position_ids), mask, cache)
        normed = self.norm(out)
        kept = normed[:, -logits_to_keep:] if logits_to_keep else normed
        return self.lm_head(kept), normed if self.spec.norm_output else out


class Eagle3Drafter(Drafter):
    """Drafts a chain of gamma tokens, or `tree` (static, or EAGLE-2's dynamic) cut at depth
    gamma, with an `Eagle3Head` on the target's device and dtype."""

    def __init__(self, head: Eagle3Head, tree: TreeShape | DynamicTree | None = None):
        self.head = head
        self.hidden_ids = head.spec.aux_ids
        self.tree, self.dynamic = static_or_dynamic(tree)

    @property
    def module(self):
        return self.head

    def start(self, input_ids, attention_mask, sampler, vocab_size):
        return _Eagle3Session(self, input_ids, attention_mask, sampler, vocab_size)


class _Eagle3Session(DraftSession):
    """The head's cache (`RaggedCache`: ragged rows, rollback, rows leaving) holds one slot
    per target token whose hidden state is known, then, during a proposal, the slots of the
    draft nodes it fed (`speculative`: a chain's gamma - 1). `logits`/`state`: each row's
    head output at its last kept slot, which scores the first depth of the next proposal."""

    def __init__(self, drafter: Eagle3Drafter, input_ids, attention_mask, sampler: Sampler, vocab_size: int):
        self.drafter, self.head, self.sampler, self.vocab_size = drafter, drafter.head, sampler, vocab_size
        self.target_ids = self.head.target_ids()
        self.prompt: tuple[torch.Tensor, torch.Tensor] | None = (input_ids, attention_mask)
        self.cache: RaggedCache | None = None
        self.logits: torch.Tensor | None = None  # (B, D)
        self.state: torch.Tensor | None = None  # (B, 1, H)
        self.drafts: torch.Tensor | None = None  # (B, g) the last proposal
        self.speculative = 0

    def _run(self, tokens, valid, hidden, logits_to_keep, ancestry=None):
        logits = self.cache.feed(partial(self.head, hidden=hidden), tokens, valid, logits_to_keep, ancestry)
        return logits, self.cache.hidden

    def _on_target(self, logits: torch.Tensor) -> torch.Tensor:
        return on_target_vocab(logits, self.target_ids, self.vocab_size)

    def commit(self, outcome: StepOutcome):
        if self.cache is None:
            # The prompt's states: slot j pairs prompt token j's state with token j + 1 (the
            # last slot with the first emitted token); a left pad's slot is a hole.
            ids, mask = self.prompt
            self.cache = RaggedCache(self.head, ids.shape[0], ids.device)
            tokens = torch.cat([ids[:, 1:], outcome.next_tokens[:, None]], dim=1)
            logits, state = self._run(tokens, mask.bool(), self.head.fc(outcome.hidden), 1)
            self.logits, self.state, self.prompt = logits[:, -1], state[:, -1:], None
            return
        if self.speculative:  # the proposal's own slots, fed with the head's states
            self.cache.rollback(torch.zeros_like(outcome.accepted), self.speculative, 0)
        # The step scored [last token, nodes]; along the kept path, the state at its i-th fed
        # position pairs with token i + 1 of the kept text: the path's next node while
        # accepted, then the next token.
        keep = max(outcome.accepted_host) + 1
        fed = outcome.fed_path(keep)
        fused = self.head.fc(outcome.hidden.gather(1, fed[..., None].expand(-1, -1, outcome.hidden.shape[-1])))
        tokens = torch.cat([self.drafts.gather(1, outcome.path[:, : keep - 1]), outcome.next_tokens[:, None]], dim=1)
        tokens.scatter_(1, outcome.accepted[:, None], outcome.next_tokens[:, None])
        valid = torch.arange(keep, device=fused.device) <= outcome.accepted[:, None]  # the rest: holes
        logits, state = self._run(tokens, valid, fused, 0)
        batch = torch.arange(tokens.shape[0], device=fused.device)
        self.logits, self.state = logits[batch, outcome.accepted], state[batch, outcome.accepted][:, None]
        self.drafts, self.speculative = None, 0

    def propose(self, last_tokens, gamma):
        # `last_tokens` is in the head's cache already: its slot made `logits`.
        if self.drafter.dynamic is not None:
            draft = self._dynamic(self.drafter.dynamic.truncated(gamma))
        else:
            shape = self.drafter.shape(gamma)
            tokens, probs = grow_tree(shape, self.sampler, self.logits.shape[0], self.logits.device, self._static_level(shape))
            draft = static_draft(shape, tokens, probs, self.logits.device)
        self.drafts = draft.tokens
        return draft

    def _static_level(self, shape: TreeShape):
        """`grow_tree`'s score for `shape`: the root's children from `logits`; a level's nodes
        fed with their parents' output states (`outputs`, by fed index), each seeing its
        ancestors among the speculative slots (the root and the text before it: the cache)."""
        batch = self.logits.shape[0]
        outputs = self.state.new_zeros(batch, shape.nodes + 1, self.state.shape[-1])
        outputs[:, 0] = self.state[:, 0]

        def score(depth: int, level: Level, fed: torch.Tensor) -> torch.Tensor:
            if depth == 0:
                return self._on_target(self.logits[:, None])
            nodes = list(level.nodes)
            sees = None if level.sees is None else torch.tensor([row[1:] for row in level.sees], device=fed.device)
            parents = [shape.parents[j - 1] for j in nodes]
            logits, state = self._run(fed[:, nodes], torch.ones(batch, len(nodes), dtype=torch.bool, device=fed.device),
                                      outputs[:, parents], 0, None if sees is None else sees.expand(batch, -1, -1))
            outputs[:, nodes] = state
            self.speculative += len(nodes)
            return self._on_target(logits)

        return score

    def _dynamic(self, tree: DynamicTree) -> Draft:
        """EAGLE-2's tree (`grow_dynamic`): each frontier node is fed with its parent's output
        state (the root's: `state`)."""
        states = self.state  # the output states of the frontier fed last

        def feed(tokens: torch.Tensor, parents: torch.Tensor, sees: torch.Tensor) -> torch.Tensor:
            nonlocal states
            inputs = states.gather(1, parents[..., None].expand(-1, -1, states.shape[-1]))
            logits, states = self._run(tokens, torch.ones_like(tokens, dtype=torch.bool), inputs, 0, sees)
            self.speculative += tokens.shape[1]
            return self._on_target(logits)

        return grow_dynamic(tree, self._on_target(self.logits), feed)[0]

    def select(self, rows):
        index = torch.tensor(rows, device=self.target_ids.device)
        if self.prompt is not None:
            self.prompt = (self.prompt[0][index], self.prompt[1][index])
        if self.cache is not None:
            self.cache.select(index)
        for name in ("logits", "state", "drafts"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[index])
