"""One decoding loop for every method: autoregressive (no drafter) and speculative (a drafter
proposes, the target verifies) over a left-padded batch.

Each step the target scores [last emitted token, drafts ...] in one forward, `verify` keeps a
root path of each row's draft plus one target token, and the kept tokens go to the host in one
transfer (the only synchronisation of a step), timestamped as they arrive. A draft is a chain
or a token tree (trees.py: scored in the same one forward under a tree attention mask; a
chain is the tree of width 1), and a tree's accepted path is gathered to the front of the
step's cache slots (`KVCache.rollback`), no recompute. Rows advance by what
they kept (1 .. gamma + 1 tokens), never by a fixed gamma: `cache.KVCache` explains how both
models' caches follow rows that accept different counts; a model set up with a static cache
(`cache.use_static_cache`, compiled or not: compiled.py) runs the same loop on preallocated
caches. A drafter that reads the target's hidden states (a learned head: eagle3.py, medusa.py)
names them (`Drafter.hidden_ids`); the target's forwards then return them beside the logits
and each step's outcome carries them. Finished rows (EOS or length) leave
the batch. Near the length limit drafts are capped to the tokens still wanted. Without a
drafter a step is a plain AR step, so TTFT is the target's first token after prefill for
every method. Float32 CPU linear layers run in the BLAS call order that is faster for
decoding's few rows (kernels.py).
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import torch

from .cache import open_cache, static_setup
from .drafters import Drafter, StepOutcome
from .kernels import decode_kernels
from .sampling import Draft, Sampler, verify
from .trees import node_key, rank_paths


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    temperature: float = 0.0  # 0 -> greedy
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0
    gamma: int = 4  # draft tokens per step; 0 with no drafter (AR)
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 means off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.gamma < 0:
            raise ValueError(f"gamma (draft tokens per step) must be >= 0, got {self.gamma}")
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))

    def sampler(self, generator: torch.Generator | None) -> Sampler:
        return Sampler(self.temperature, self.top_k, self.top_p, generator)


@dataclass
class RowResult:
    """One batch row's output and counts.

    emissions: (time.perf_counter_ns() once the tokens were on the host, tokens emitted).
    drafted_per_position[i] / accepted_per_position[i]: how often a draft reached depth i + 1
    / had its node at depth i + 1 accepted (a chain's position i + 1; empty for AR).
    drafted_tokens counts the nodes proposed (a chain's tokens), accepted_tokens what the
    verifier accepted; tokens per target forward is len(output_ids) / target_forwards (the
    prefill is a forward).
    per_node (a tree drafter's rows only, else None): per node, named by its path of child
    ranks (trees.rank_paths, trees.node_key), [drafted, tried, accepted]: how often it was
    proposed, reached (proposed, its parent on the accepted path and no earlier sibling
    accepted: the verifier tried it) and accepted; the tree theory's counts.
    """

    output_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    emissions: list[tuple[int, int]] = field(default_factory=list)
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    target_forwards: int = 0
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    per_node: dict[str, list[int]] | None = None

    @classmethod
    def empty(cls, gamma: int, per_node: bool = False) -> RowResult:
        """A row before decoding; per-position counts for `gamma` draft positions (0: AR),
        and per-node counts where the drafter proposes trees."""
        return cls(drafted_per_position=[0] * gamma, accepted_per_position=[0] * gamma, per_node={} if per_node else None)

    def count_draft(self, nodes: int, depth: int, accepted: int) -> None:
        """Count one verification: `nodes` proposed, `depth` deep, a path of `accepted` kept."""
        self.drafted_tokens += nodes
        self.accepted_tokens += accepted
        missing = depth - len(self.drafted_per_position)
        if missing > 0:
            self.drafted_per_position += [0] * missing
            self.accepted_per_position += [0] * missing
        for i in range(depth):
            self.drafted_per_position[i] += 1
        for i in range(accepted):
            self.accepted_per_position[i] += 1

    def count_nodes(self, parents: list[int], path: list[int]) -> None:
        """Count one tree verification per node: the proposed nodes' `parents` (fed
        indices) and the accepted `path` (node indices, root to leaf)."""
        chosen = {parents[j]: j for j in path}  # each parent on the path -> its accepted child
        for j, (key, parent) in enumerate(zip(_node_keys(tuple(parents)), parents)):
            counts = self.per_node.setdefault(key, [0, 0, 0])
            counts[0] += 1
            # Siblings are tried in rank order: after its parent was reached, until one passes.
            counts[1] += (parent == 0 or parent - 1 in path) and chosen.get(parent, j) >= j
            counts[2] += chosen.get(parent) == j

    def emit(self, tokens: list[int], now_ns: int, settings: GenerationSettings) -> bool:
        """Add one target forward's tokens (cut at EOS or the length limit); True once finished."""
        self.target_forwards += 1
        tokens = tokens[: settings.max_new_tokens - len(self.output_ids)]
        for i, token in enumerate(tokens):
            if token in settings.eos_token_ids:
                tokens, self.finish_reason = tokens[: i + 1], "eos"
                break
        self.output_ids.extend(tokens)
        self.emissions.append((now_ns, len(tokens)))
        if not self.finish_reason and len(self.output_ids) >= settings.max_new_tokens:
            self.finish_reason = "length"
        return bool(self.finish_reason)


@lru_cache(maxsize=256)
def _node_keys(parents: tuple[int, ...]) -> tuple[str, ...]:
    return tuple(map(node_key, rank_paths(parents)))


def _check_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    if input_ids.ndim != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, length) tensor, got shape {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
        )
    empty = (attention_mask.sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"empty prompt (attention_mask all zero) in batch row(s) {empty}")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded: attention_mask[:, -1] has zeros")


def generate(
    target,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    settings: GenerationSettings,
    drafter: Drafter | None = None,
    generator: torch.Generator | None = None,
    accept_timer: Callable[[], AbstractContextManager] | None = None,
) -> list[RowResult]:
    """Decode a left-padded batch with the target alone (AR) or verifying `drafter`'s drafts.

    `generator` (on the target's device) seeds sampling; a drafter elsewhere gets its own,
    seeded from it. `accept_timer()` (attribution.Attribution.accept) brackets each step's
    accept/sample work up to the host transfer. Returns one RowResult per batch row, in order.
    """
    _check_prompt(input_ids, attention_mask)
    if drafter is not None and settings.gamma < 1:
        raise ValueError("a drafter needs gamma >= 1 draft tokens per step")
    gamma = settings.gamma if drafter is not None else 0
    sampler = settings.sampler(generator)
    accept_span = accept_timer or nullcontext
    trees = drafter is not None and (drafter.tree is not None or drafter.dynamic is not None)
    results = [RowResult.empty(gamma, per_node=trees) for _ in range(input_ids.shape[0])]
    # A compiled model's graph was traced with its own linear layers: our CPU kernels would
    # change what it guards on and recompile it inside the request.
    eager = [m for m in (target, drafter.model if drafter is not None else None)
             if m is not None and not getattr(static_setup(m), "compiled", False)]
    with torch.inference_mode(), decode_kernels(*eager):
        nodes = drafter.max_nodes(gamma) if drafter is not None else 0
        cache, logits = open_cache(target, input_ids, attention_mask, "target", room=settings.max_new_tokens + nodes + 1,
                                   hidden_ids=drafter.hidden_ids if drafter is not None else ())
        logits = logits[:, None]
        draft = Draft.empty(input_ids.shape[0], input_ids.device)
        session = None
        running = list(range(input_ids.shape[0]))  # result index of each batch row
        while True:
            with accept_span():
                accepted, next_tokens, path = verify(logits, draft, sampler)
                kept = torch.cat([draft.tokens.gather(1, path), next_tokens[:, None]], dim=1)
                kept.scatter_(1, accepted[:, None], next_tokens[:, None])
                step = [accepted[:, None], draft.lengths[:, None], draft.depths[:, None], kept, path]
                step = torch.cat(step + [draft.tree_parents] if trees else step, dim=1)
            host = step.tolist()
            now = time.perf_counter_ns()
            width = draft.tokens.shape[1]
            outcome = StepOutcome(accepted, [h[0] for h in host], next_tokens, [h[3 : h[0] + 4] for h in host], cache.hidden,
                                  logits, path, [h[width + 4 : width + 4 + h[0]] for h in host])
            # A path that is not the draft's first nodes (a tree's) is moved to the front of its slots.
            moved = any(p != list(range(len(p))) for p in outcome.path_host)
            finished = []
            for r, h, new in zip(running, host, outcome.new_tokens):
                results[r].count_draft(h[1], h[2], h[0])
                if trees and h[1]:
                    results[r].count_nodes(h[2 * width + 4 : 2 * width + 4 + h[1]], h[width + 4 : width + 4 + h[0]])
                finished.append(results[r].emit(new, now, settings))
            if session is not None and any(finished):
                session.finish({i: results[r].output_ids for i, (r, done) in enumerate(zip(running, finished)) if done})
            if all(finished):
                return results
            if any(finished):
                rows = [i for i, done in enumerate(finished) if not done]
                index = torch.tensor(rows, device=input_ids.device)
                cache.select(index)
                outcome = outcome.select(rows, index)
                running = [running[i] for i in rows]
                if session is not None:
                    session.select(rows)
            if width:
                # The step fed [last token, drafts]: keep the last token and the accepted path.
                keep = max(outcome.accepted_host) + 1
                order = outcome.fed_path(keep) if moved else None
                cache.rollback(outcome.accepted + 1, width + 1, keep, order)
            if drafter is not None and session is None:
                # Drafter prefill after the first emission: TTFT is the target's alone.
                session = drafter.start(input_ids, attention_mask, sampler, logits.shape[-1])
                if len(running) < input_ids.shape[0]:
                    session.select(running)
            if session is not None:
                session.commit(outcome)
                left = max(settings.max_new_tokens - len(results[r].output_ids) for r in running)
                draft = session.propose(outcome.next_tokens, max(1, min(gamma, left - 1)))
            else:
                draft = Draft.empty(len(running), input_ids.device)
            tokens = torch.cat([outcome.next_tokens[:, None], draft.tokens], dim=1)
            logits = cache.extend(tokens, torch.ones_like(tokens, dtype=torch.bool), ancestry=draft.attention())
