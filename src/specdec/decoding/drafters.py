"""Drafters: they propose up to gamma tokens per row, as a chain or a token tree (trees.py);
the engine's one verifier scores them.

A drafter starts one `DraftSession` per `generate()` call. The session proposes a `Draft`
for the rows still running, learns what the verifier kept (`commit`), and drops finished
rows (`select`). This is the proposer half of vLLM's proposer/scorer split, or a
transformers candidate generator.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from .cache import model_device, open_cache
from .compiled import step_widths
from .sampling import Draft, Sampler
from .trees import DynamicTree, Level, TreeShape, best_nodes, expansion


@dataclass
class StepOutcome:
    """What the verifier kept in one step, for the rows still running.

    accepted: (B,) draft tokens kept per row (device); accepted_host: the same, on the host;
    next_tokens: (B,) the token chosen after them (device); new_tokens: per row, the kept
    draft tokens followed by the next token (host). hidden: the target's hidden states the
    drafter asked for (`Drafter.hidden_ids`), from the forward that scored this step, over
    every token it fed (B, W, len(ids) * H): the left-padded prompt after the prefill, else
    [last token, drafts]; None when none were asked for. logits: (B, W, V) the target's logits of
    the step (device), position 0 after the last emitted token and position j after draft j
    (W = 1 at the first token, which follows the prompt): a drafter that learns from the
    target's own distributions (recycling) reads them here, at no extra forward.
    path: (B, g) the kept draft nodes, root to leaf (`sampling.verify`; a chain's 0 .. g - 1),
    for a tree drafter; hidden and logits are per fed token, so position 1 + path[b, i] is the
    i-th kept node's. path_host: per row, its kept nodes (host).
    """

    accepted: torch.Tensor
    accepted_host: list[int]
    next_tokens: torch.Tensor
    new_tokens: list[list[int]]
    hidden: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    path: torch.Tensor | None = None
    path_host: list[list[int]] | None = None

    def fed_path(self, keep: int) -> torch.Tensor:
        """(B, keep) the fed positions of the last emitted token and the kept path's first
        keep - 1 nodes (what a cache over the step's fed tokens keeps, in order)."""
        root = torch.zeros_like(self.accepted)[:, None]
        return torch.cat([root, self.path[:, : keep - 1] + 1], dim=1)

    def select(self, rows: list[int], index: torch.Tensor) -> StepOutcome:
        """The outcome of the given rows only (`index`: the same rows as a device tensor)."""
        return StepOutcome(
            self.accepted[index], [self.accepted_host[i] for i in rows], self.next_tokens[index],
            [self.new_tokens[i] for i in rows], None if self.hidden is None else self.hidden[index],
            None if self.logits is None else self.logits[index], None if self.path is None else self.path[index],
            None if self.path_host is None else [self.path_host[i] for i in rows],
        )


class DraftSession(ABC):
    @abstractmethod
    def propose(self, last_tokens: torch.Tensor, gamma: int) -> Draft:
        """Up to `gamma` tokens per row continuing each row's text, whose last token
        (B,) is `last_tokens` (emitted but not yet in any cache)."""

    @abstractmethod
    def commit(self, outcome: StepOutcome) -> None:
        """Record the verifier's decision on the last proposal (or the first token)."""

    @abstractmethod
    def select(self, rows: list[int]) -> None:
        """Keep only these batch rows."""

    def finish(self, outputs: dict[int, list[int]]) -> None:
        """These batch rows are done (called before they are dropped): batch row -> the row's
        whole output ids. A drafter that learns from earlier outputs (suffix) keeps them."""


class Drafter(ABC):
    model = None  # the draft model, for drafters that run one
    hidden_ids: tuple[int, ...] = ()  # the target's hidden states it reads (cache.py's ids)
    tree: TreeShape | None = None  # the static token tree it proposes (None: chains)
    dynamic: DynamicTree | None = None  # or the EAGLE-2 tree it grows (kinds that can)
    partial = False  # a proposal may hold fewer nodes than its shape (a model-free drafter's matches)

    @property
    def module(self):
        """The module whose forwards are the drafter's own work (attribution times them)."""
        return self.model

    @abstractmethod
    def start(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampler: Sampler, vocab_size: int
    ) -> DraftSession:
        """Begin drafting for a left-padded prompt batch (on the verifier's device)."""

    def shape(self, gamma: int) -> TreeShape:
        """The shape of a proposal of depth `gamma`: its tree cut there, or a chain."""
        return TreeShape.chain(gamma) if self.tree is None else self.tree.truncated(gamma)

    def max_nodes(self, gamma: int) -> int:
        """The most draft nodes a proposal of depth `gamma` holds (a chain's: gamma): the
        target's step widths and its cache's room follow."""
        return self.shape(gamma).nodes if self.dynamic is None else self.dynamic.truncated(gamma).nodes

    def step_room(self, gamma: int) -> int:
        """The most slots one step adds to the target's cache or a draft model's before its
        rollback: the target's [last token, nodes]; a draft model feeds [carried node, last
        token, the nodes with children], no more, except for a dynamic tree, whose (depth - 1)
        x top_k frontier nodes are all fed, however few are verified."""
        fed = 0 if self.dynamic is None else 2 + (self.dynamic.truncated(gamma).depth - 1) * self.dynamic.top_k
        return max(self.max_nodes(gamma) + 1, fed)

    def verify_widths(self, gamma: int) -> tuple[list[int], list[int]]:
        """The widths of the target's steps over [last token, nodes] for proposals of depth 1
        .. gamma (the engine cuts the depth near the length limit), as (causal steps, steps
        under a tree's mask), to compile them ahead (compiled.py): a chain's 1 .. gamma + 1;
        a tree's node counts + 1, or, for a drafter that may fill fewer nodes than its tree
        (`partial`), every width up to them."""
        if self.tree is None and self.dynamic is None:
            return step_widths(gamma, "target"), []
        causal, tree = set(), set()
        for depth in range(1, gamma + 1):
            shape = self.shape(depth)
            chain = self.dynamic is None and shape.is_chain()  # a Draft without parents: the causal mask
            (causal if chain else tree).add(self.max_nodes(depth) + 1)
        if self.partial:
            causal, tree = ({width for top in widths for width in range(1, top + 1)} for widths in (causal, tree))
        return sorted(causal), sorted(tree)

    def draft_widths(self, gamma: int) -> tuple[list[int], list[int]]:
        """The widths of the draft model's own steps (a drafter that runs one), as
        `verify_widths`: a chain's feeds one token, or two after a carried draft."""
        return step_widths(gamma, "drafter"), []

    def forget(self) -> None:
        """Drop what was learnt across requests. Called as the measured window opens, so that
        no warm-up output feeds a measured request (warm-up requests are the first measured
        prompts again) and every repeat of a cell starts from the same, empty state."""

    def state(self) -> dict:
        """What the drafter holds across requests and its bounds, for the result (empty for
        a drafter that keeps nothing)."""
        return {}


def unpadded_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """Each row's prompt token ids without the left padding, on the host."""
    return [[t for t, m in zip(ids, mask) if m] for ids, mask in zip(input_ids.tolist(), attention_mask.tolist())]


def point_mass_draft(drafts: list[list[int]], device: torch.device, parents: list[list[int]] | None = None,
                     branching: int = 1) -> Draft:
    """A Draft of each row's host-side token list (rows may be shorter or empty), padded with
    filler the verifier never accepts; a point mass for the verifier. `parents`: each row's
    nodes' parents (fed indices, trees.py), for a tree of at most `branching` children per
    node; None: chains."""
    width = max(map(len, drafts))
    padded = [d + [0] * (width - len(d)) for d in drafts]
    tokens = torch.tensor(padded, dtype=torch.long).reshape(len(drafts), width).to(device)
    tree = None
    if parents is not None:
        tree = torch.tensor([p + [0] * (width - len(p)) for p in parents], dtype=torch.long).reshape(len(drafts), width)
        tree = tree.to(device)
    return Draft(tokens, torch.tensor([len(d) for d in drafts], dtype=torch.long).to(device), parents=tree,
                 branching=branching)


class ModelDrafter(Drafter):
    """A small causal LM sharing the target's tokenizer, on any device and dtype. It drafts a
    chain of gamma tokens, or, given `tree`, that token tree cut at depth gamma: a static
    tree's nodes have as children their k best tokens (greedy) or k draws without
    replacement (sampling); a dynamic tree is EAGLE-2's (`grow_dynamic`)."""

    def __init__(self, model, tree: TreeShape | DynamicTree | None = None):
        self.model = model
        self.tree, self.dynamic = static_or_dynamic(tree)

    def start(self, input_ids, attention_mask, sampler, vocab_size):
        return _ModelDraftSession(self, input_ids, attention_mask, sampler, vocab_size)

    def draft_widths(self, gamma):
        """After the last token, a static tree's levels of nodes with children
        (`trees.expansion`: a proposal cut shallower runs the first of them), each under the
        tree's mask unless it sees the whole window (a chain's one node); a dynamic tree's
        frontier of top_k nodes per depth below its first."""
        causal, tree = super().draft_widths(gamma)
        if self.dynamic is not None:
            return causal, [self.dynamic.top_k] if min(gamma, self.dynamic.depth) > 1 else []
        levels = expansion(self.shape(gamma))[0][1:]
        causal = sorted(set(causal) | {len(level.nodes) for level in levels if level.sees is None})
        return causal, sorted({len(level.nodes) for level in levels if level.sees is not None})


def on_target_vocab(logits: torch.Tensor, target_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(..., V) logits over the target's vocabulary from (..., D) logits over a reduced draft
    vocabulary whose entry i is target token target_ids[i]: -inf elsewhere, so the draft's
    probabilities are zero outside its vocabulary and the verifier's rule applies as is."""
    full = logits.new_full(logits.shape[:-1] + (vocab_size,), float("-inf"))
    return full.index_copy_(-1, target_ids, logits)


def grow_tree(shape: TreeShape, sampler: Sampler, batch: int, device: torch.device,
              score: Callable[[int, Level, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draw the nodes of a static tree a level at a time (`trees.expansion`).

    `score(depth, level, fed)` returns the (B, len(level.nodes), V) logits after each of the
    level's nodes, given `fed` (B, nodes + 1): the root, then every node drawn so far. A
    node's children are its best k tokens (greedy) or k draws without replacement
    (sampling, `Sampler.children`). Returns (the nodes' tokens (B, nodes); the distribution
    each was drawn from (B, nodes, V), or None under greedy)."""
    levels, _ = expansion(shape)
    fed = torch.zeros(batch, shape.nodes + 1, dtype=torch.long, device=device)
    probs: list[torch.Tensor | None] = [None] * (shape.nodes + 1)
    for depth, level in enumerate(levels):
        children, child_probs = sampler.children(score(depth, level, fed), max(map(len, level.children)))
        for i, kids in enumerate(level.children):
            for rank, node in enumerate(kids):
                fed[:, node] = children[:, i, rank]
                if child_probs is not None:
                    probs[node] = child_probs[:, i, rank]
    return fed[:, 1:], None if sampler.greedy else torch.stack(probs[1:], dim=1)


def static_or_dynamic(tree: TreeShape | DynamicTree | None) -> tuple[TreeShape | None, DynamicTree | None]:
    """A drafter's `tree` and `dynamic` from the one tree it was given."""
    return (None, tree) if isinstance(tree, DynamicTree) else (tree, None)


def grow_dynamic(tree: DynamicTree, root_logits: torch.Tensor,
                 feed: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[Draft, torch.Tensor]:
    """EAGLE-2's expansion (trees.DynamicTree) from the root's logits (B, V).

    The frontier, the top_k nodes of a depth by joint draft log-probability (first the
    root's top_k children), is fed in one forward: `feed(tokens (B, k), parents (B, k): each
    node's place in the frontier fed before it (0 .. k - 1; zeros at the first), sees
    (B, k, S): which of the S speculative slots fed so far, these k last, each node sees
    (its ancestors and itself))` returns the logits after each (B, k, V). Each frontier
    node's top_k children are candidates, the best top_k of them the next frontier;
    candidates are numbered depth by depth, and the best `tree.nodes` are verified
    (`best_nodes`). Returns (their Draft: point masses, their tokens a deterministic
    function of the draft distributions; each node's speculative slot (B, nodes), -1 for a
    node never fed)."""
    k, (batch, _) = tree.top_k, root_logits.shape
    device = root_logits.device
    scores, tokens = torch.log_softmax(root_logits.float(), -1).topk(k, dim=-1)
    candidates = [(scores, tokens, torch.full_like(tokens, -1))]  # (joint log-prob, token, parent candidate)
    frontier, parents = torch.arange(k, device=device).expand(batch, k), torch.zeros_like(tokens)
    slots = torch.full((batch, tree.candidates), -1, dtype=torch.long, device=device)  # each candidate's, if fed
    sees = torch.zeros(batch, k, 0, dtype=torch.bool, device=device)  # each frontier node's parent's row
    eye = torch.eye(k, dtype=torch.bool, device=device).expand(batch, k, k)
    numbered = k
    for _ in range(1, tree.depth):
        slots.scatter_(1, frontier, sees.shape[-1] + torch.arange(k, device=device).expand(batch, k))
        sees = torch.cat([sees, eye], dim=-1)  # the frontier's own rows: its parent's, and itself
        child_scores, child_tokens = torch.log_softmax(feed(tokens, parents, sees).float(), -1).topk(k, dim=-1)
        joint, child_tokens = (scores[..., None] + child_scores).flatten(1), child_tokens.flatten(1)
        candidates.append((joint, child_tokens, frontier.repeat_interleave(k, dim=1)))
        scores, pick = joint.topk(k, dim=-1)
        parents = pick // k
        frontier, tokens = numbered + pick, child_tokens.gather(1, pick)
        sees = sees.gather(1, parents[..., None].expand(-1, -1, sees.shape[-1]))
        numbered += k * k
    scores, tokens, parents = (torch.cat(parts, dim=1) for parts in zip(*candidates))
    chosen, chosen_parents = best_nodes(scores, parents, tree.nodes)
    lengths = torch.full((batch,), tree.nodes, dtype=torch.long, device=device)
    return Draft(tokens.gather(1, chosen), lengths, None, chosen_parents, k), slots.gather(1, chosen)


def static_draft(shape: TreeShape, tokens: torch.Tensor, probs: torch.Tensor | None, device: torch.device) -> Draft:
    """The Draft of a static tree's nodes (`grow_tree`), every row the whole tree, on `device`."""
    batch = tokens.shape[0]
    parents = None if shape.is_chain() else torch.tensor(shape.parents, device=device).expand(batch, -1)
    lengths = torch.full((batch,), shape.nodes, dtype=torch.long, device=device)
    return Draft(tokens.to(device), lengths, None if probs is None else probs.to(device), parents, shape.branching)


def _fit_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Trim or -inf-pad drafter logits to the target's vocabulary size (embedding tables of
    one tokenizer are often padded to different sizes)."""
    extra = vocab_size - logits.shape[-1]
    if extra <= 0:
        return logits[..., :vocab_size]
    return torch.nn.functional.pad(logits, (0, extra), value=float("-inf"))


class _ModelDraftSession(DraftSession):
    """Drafts a tree (a chain: the tree of width 1) level by level with its own cache
    (`open_cache`: the drafter model's choice), in one forward per depth.

    The cache holds every committed token except the last one. A proposal feeds the last
    token, then each depth's nodes that have children under the tree's attention
    (trees.expansion; a dynamic tree: each depth's frontier, `grow_dynamic`); leaves are
    drawn, never fed. After verification the cache keeps the last token and the accepted
    path's fed nodes, gathered into place (`KVCache.rollback`); when the path ends on a
    node never fed, that token is fed in front of the next proposal (a hole for the other
    rows), so no extra drafter forward is spent on it.
    """

    def __init__(self, drafter: ModelDrafter, input_ids, attention_mask, sampler: Sampler, vocab_size: int):
        self.drafter = drafter
        self.device = model_device(drafter.model)
        self.target_device = input_ids.device
        self.sampler = sampler.on(self.device)
        self.vocab_size = vocab_size
        self.cache, _ = open_cache(drafter.model, input_ids.to(self.device), attention_mask.to(self.device), "drafter")
        self.carry: torch.Tensor | None = None  # (B, 1) last draft to feed first, or None
        self.carry_valid: torch.Tensor | None = None
        # The last proposal's window of slots (the last token and the nodes fed), and per
        # row its nodes' slots in it (host), -1 for a node never fed.
        self.window = 0
        self.node_slots: list[list[int]] | None = None

    def propose(self, last_tokens, gamma):
        tokens = last_tokens.to(self.device)[:, None]
        valid = torch.ones_like(tokens, dtype=torch.bool)
        if self.carry is not None:
            tokens = torch.cat([self.carry, tokens], dim=1)
            valid = torch.cat([self.carry_valid, valid], dim=1)
        batch = tokens.shape[0]
        if self.drafter.dynamic is not None:
            tree = self.drafter.dynamic.truncated(gamma)
            root = _fit_vocab(self.cache.extend(tokens, valid, logits_to_keep=1), self.vocab_size)[:, -1]
            draft, slots = grow_dynamic(tree, root, lambda nodes, parents, sees: _fit_vocab(
                self.cache.extend(nodes, torch.ones_like(nodes, dtype=torch.bool), ancestry=sees), self.vocab_size))
            self.window, self.node_slots = 1 + (tree.depth - 1) * tree.top_k, torch.where(slots >= 0, slots + 1, -1).tolist()
            target = self.target_device
            return Draft(draft.tokens.to(target), draft.lengths.to(target), None, draft.parents.to(target), draft.branching)
        shape = self.drafter.shape(gamma)

        def score(depth: int, level: Level, fed: torch.Tensor) -> torch.Tensor:
            if depth == 0:
                return _fit_vocab(self.cache.extend(tokens, valid, logits_to_keep=1), self.vocab_size)
            sees = None if level.sees is None else torch.tensor(level.sees, device=self.device).expand(batch, -1, -1)
            nodes = fed[:, list(level.nodes)]
            return _fit_vocab(self.cache.extend(nodes, torch.ones_like(nodes, dtype=torch.bool), ancestry=sees), self.vocab_size)

        drafts, probs = grow_tree(shape, self.sampler, batch, self.device, score)
        _, slots = expansion(shape)
        self.window, self.node_slots = len(slots), [[slots.get(node, -1) for node in range(1, shape.nodes + 1)]] * batch
        return static_draft(shape, drafts, probs, self.target_device)

    def commit(self, outcome):
        if self.node_slots is None:  # the first token: nothing was proposed
            return
        # The cache ends with the window [last token, fed nodes]; each row keeps the last token
        # and its path's fed nodes (a prefix of the path: a node is fed only if it has children).
        kept, carried = [], []
        for path, slots in zip(outcome.path_host, self.node_slots):
            fed_path = [slots[node] for node in path if slots[node] >= 0]
            kept.append([0] + fed_path)
            carried.append(len(path) > len(fed_path))
        keep = max(map(len, kept))
        lengths = torch.tensor([len(k) for k in kept], device=self.device)
        order = None
        if any(k != list(range(len(k))) for k in kept):
            order = torch.tensor([k + [0] * (keep - len(k)) for k in kept], device=self.device)
        self.cache.rollback(lengths, self.window, keep, order)
        if any(carried):
            last = [new[len(path) - 1] if carry else 0 for new, path, carry in zip(outcome.new_tokens, outcome.path_host, carried)]
            self.carry = torch.tensor(last, device=self.device)[:, None]
            self.carry_valid = torch.tensor(carried, device=self.device)[:, None]
        else:
            self.carry = self.carry_valid = None
        self.node_slots = None

    def select(self, rows):
        index = torch.tensor(rows, device=self.device)
        self.cache.select(index)
        if self.carry is not None:
            self.carry, self.carry_valid = self.carry[index], self.carry_valid[index]
        if self.node_slots is not None:
            self.node_slots = [self.node_slots[r] for r in rows]


class NgramDrafter(Drafter):
    """Model-free drafting from an n-gram table (in the spirit of NASD / ANPD).

    Each row's table maps every context of 1 .. n-1 tokens seen so far (prompt, accepted
    drafts and target tokens) to counts of the token that followed it, keeping the `top_k`
    most frequent continuations per context (ties go to the most recent). A proposal follows
    the best continuation of the longest matching context, backing off to shorter contexts
    down to `min_context` tokens, for up to gamma tokens; it stops early, or proposes
    nothing, when no such context matches. Given `tree`, a proposal is that token tree cut
    at depth gamma: a node's children are the ranked continuations of its own longest
    matching context (a node whose rank has none is left out, with its subtree). Every
    drafted token widens the verification
    forward (on the CPU a five-token forward costs 1.6x a one-token one), so a guess from a
    single matching token, right about one time in ten, costs more than it saves:
    `min_context=2` drafts only after a two-token match. Its drafts are a point mass for
    the verifier.
    """

    partial = True

    def __init__(self, n: int = 5, top_k: int = 4, min_context: int = 2, tree: TreeShape | None = None):
        if n < 2:
            raise ValueError(f"NgramDrafter n must be >= 2 (a context of at least one token), got {n}")
        if top_k < 1:
            raise ValueError(f"NgramDrafter top_k must be >= 1, got {top_k}")
        if not 1 <= min_context <= n - 1:
            raise ValueError(f"NgramDrafter min_context must be in 1 .. n - 1 = {n - 1}, got {min_context}")
        self.n, self.top_k, self.min_context, self.tree = n, top_k, min_context, tree

    def start(self, input_ids, attention_mask, sampler, vocab_size):
        return _NgramSession(self, unpadded_prompts(input_ids, attention_mask), input_ids.device)


class _NgramTable:
    def __init__(self, n: int, top_k: int, min_context: int):
        self.n, self.top_k, self.min_context = n, top_k, min_context
        self.history: list[int] = []
        self.next: dict[tuple[int, ...], dict[int, int]] = {}

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            for width in range(1, min(self.n - 1, len(self.history)) + 1):
                counts = self.next.setdefault(tuple(self.history[-width:]), {})
                count = counts.pop(token, 0) + 1
                counts[token] = count  # re-inserted last: the most recent
                if len(counts) > self.top_k:
                    del counts[min(counts, key=counts.__getitem__)]
            self.history.append(token)

    def ranked(self, text: list[int]) -> list[int]:
        """The continuations of the longest context of `text` that matches, most frequent
        first (ties: the most recent first); none below `min_context` tokens."""
        for width in range(min(self.n - 1, len(text)), self.min_context - 1, -1):
            counts = self.next.get(tuple(text[-width:]))
            if counts:
                return sorted(reversed(counts), key=lambda token: -counts[token])
        return []

    def propose(self, shape: TreeShape) -> tuple[list[int], list[int]]:
        """The nodes of `shape` the table can fill, breadth-first: (tokens, parents as fed
        indices)."""
        tokens, parents = [], []
        fed = {(): 0}  # path -> fed index
        texts = {(): self.history[-(self.n - 1) :]}
        options: dict[tuple[int, ...], list[int]] = {}
        for path in shape.paths:
            parent = path[:-1]
            if parent not in fed:
                continue
            if parent not in options:
                options[parent] = self.ranked(texts[parent])
            if path[-1] >= len(options[parent]):
                continue
            token = options[parent][path[-1]]
            tokens.append(token)
            parents.append(fed[parent])
            fed[path] = len(tokens)
            texts[path] = (texts[parent] + [token])[-(self.n - 1) :]
        return tokens, parents


class _NgramSession(DraftSession):
    def __init__(self, drafter: NgramDrafter, prompts: list[list[int]], device: torch.device):
        self.drafter, self.device = drafter, device
        self.tables = []
        for prompt in prompts:
            table = _NgramTable(drafter.n, drafter.top_k, drafter.min_context)
            table.extend(prompt)
            self.tables.append(table)

    def propose(self, last_tokens, gamma):
        # `last_tokens` is already in each table's history (committed on the host).
        shape = self.drafter.shape(gamma)
        drafts, parents = zip(*(table.propose(shape) for table in self.tables))
        return point_mass_draft(list(drafts), self.device, None if shape.is_chain() else list(parents), shape.branching)

    def commit(self, outcome):
        for table, tokens in zip(self.tables, outcome.new_tokens):
            table.extend(tokens)

    def select(self, rows):
        self.tables = [self.tables[r] for r in rows]


class ReplayDrafter(Drafter):
    """A measurement tool, not a method: it proposes each row's reference continuation (the
    target's own greedy AR output for that prompt), each token replaced by a wrong one with
    probability `error_rate`, so that the verifier accepts a draft token with probability
    alpha = 1 - error_rate on any model, random weights included.

    `continuations` maps a prompt's token ids (unpadded) to its reference output ids. A
    proposal costs `cost_s_per_token` seconds per draft position, paced on the host (a wait
    after the proposal's own work, to the deadline); or, given `model`, the real forwards of
    that draft model, whose proposals are discarded. Greedy only: under sampling the target
    accepts a reference token with its own probability, so `error_rate` would not set alpha.
    A row whose output leaves its reference (a near-tie that rounds the other way) gets no
    more drafts: what follows is no longer a replay.
    """

    def __init__(self, continuations: Mapping[tuple[int, ...], Sequence[int]], error_rate: float,
                 cost_s_per_token: float = 0.0, model=None, seed: int = 0):
        if not 0 <= error_rate <= 1:
            raise ValueError(f"ReplayDrafter error_rate must be in [0, 1], got {error_rate}")
        if cost_s_per_token < 0:
            raise ValueError(f"ReplayDrafter cost_s_per_token must be >= 0, got {cost_s_per_token}")
        self.continuations, self.error_rate, self.cost_s_per_token = continuations, error_rate, cost_s_per_token
        self.model, self.seed, self.sessions = model, seed, 0

    def start(self, input_ids, attention_mask, sampler, vocab_size):
        if not sampler.greedy:
            raise ValueError("the replay drafter is greedy only: under sampling its error_rate does not set the acceptance rate")
        references = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = tuple(t for t, m in zip(ids, mask) if m)
            if prompt not in self.continuations:
                raise ValueError(f"replay drafter: no reference continuation for a prompt of {len(prompt)} tokens "
                                 f"(it has {len(self.continuations)}); the reference must hold every request")
            references.append(list(self.continuations[prompt]))
        inner = (_ModelDraftSession(ModelDrafter(self.model), input_ids, attention_mask, sampler, vocab_size)
                 if self.model is not None else None)
        # One generator per session, seeded from the drafter's seed and the session count:
        # a run that starts the same sessions in the same order corrupts the same tokens.
        generator = torch.Generator(device=input_ids.device).manual_seed(self.seed + self.sessions)
        self.sessions += 1
        return _ReplaySession(self, references, input_ids.device, vocab_size, generator, inner)


class _ReplaySession(DraftSession):
    """Each row's reference as one padded (B, L) tensor, its emitted count (B,) and whether it
    left the reference (B,): a proposal gathers reference[emitted : emitted + gamma] and
    corrupts it in one tensor op for the whole batch."""

    def __init__(self, drafter: ReplayDrafter, references: list[list[int]], device, vocab_size: int,
                 generator: torch.Generator, inner: DraftSession | None):
        self.drafter, self.vocab_size, self.generator, self.inner = drafter, vocab_size, generator, inner
        width = max(1, max(map(len, references)))
        self.reference = torch.tensor([r + [0] * (width - len(r)) for r in references], dtype=torch.long, device=device)
        self.reference_lengths = torch.tensor([len(r) for r in references], dtype=torch.long, device=device)
        self.emitted = torch.zeros(len(references), dtype=torch.long, device=device)
        self.left = torch.zeros(len(references), dtype=torch.bool, device=device)
        self.corrupted: torch.Tensor | None = None  # (B, g) of the last proposal

    def _at(self, positions: torch.Tensor) -> torch.Tensor:
        return self.reference.gather(1, positions.clamp(max=self.reference.shape[1] - 1))

    def propose(self, last_tokens, gamma):
        began = time.perf_counter()
        if self.inner is not None:
            self.inner.propose(last_tokens, gamma)  # the draft model's forwards; its tokens are discarded
        positions = self.emitted[:, None] + torch.arange(gamma, device=self.emitted.device)
        tokens = self._at(positions)
        shape = tokens.shape
        self.corrupted = torch.rand(shape, generator=self.generator, device=tokens.device) < self.drafter.error_rate
        # A shift of 1 .. V-1 modulo V: a token that is certainly not the reference's.
        shift = torch.randint(1, self.vocab_size, shape, generator=self.generator, device=tokens.device)
        tokens = torch.where(self.corrupted, (tokens + shift) % self.vocab_size, tokens)
        lengths = (self.reference_lengths - self.emitted).clamp(min=0, max=gamma).masked_fill(self.left, 0)
        if self.drafter.cost_s_per_token:
            _wait_until(began + self.drafter.cost_s_per_token * gamma)
        return Draft(tokens, lengths)

    def commit(self, outcome):
        if self.inner is not None:
            self.inner.commit(outcome)
        accepted = outcome.accepted.to(self.emitted.device)
        if self.corrupted is not None:
            # An accepted wrong token, or a target token other than the reference's: the row left it.
            kept = torch.arange(self.corrupted.shape[1], device=accepted.device) < accepted[:, None]
            self.left |= (self.corrupted & kept).any(1)
        self.left |= outcome.next_tokens.to(self.emitted.device) != self._at((self.emitted + accepted)[:, None])[:, 0]
        self.emitted = self.emitted + accepted + 1
        self.corrupted = None

    def select(self, rows):
        if self.inner is not None:
            self.inner.select(rows)
        index = torch.tensor(rows, device=self.emitted.device)
        self.reference, self.reference_lengths = self.reference[index], self.reference_lengths[index]
        self.emitted, self.left = self.emitted[index], self.left[index]
        if self.corrupted is not None:
            self.corrupted = self.corrupted[index]


def _wait_until(deadline: float) -> None:
    """Sleep to just before `deadline` (perf_counter seconds), then spin: a sleep alone
    overshoots by up to a scheduler tick, far more than a paced draft token may cost."""
    remaining = deadline - time.perf_counter()
    if remaining > 2e-3:
        time.sleep(remaining - 1e-3)
    while time.perf_counter() < deadline:
        pass
