"""Suffix decoding (Oliaro et al., SuffixDecoding): model-free drafts from suffix tries over
the request's own text and over the outputs earlier requests of the cell produced.

Each row keeps a trie of its prompt and output so far; the drafter keeps one more, over the
outputs of the requests that finished before (`OutputCache`), bounded by `cache_tokens`
tokens, the oldest outputs evicted first. A proposal matches the longest suffix of the row's
text (at most `max_depth` - 1 tokens) that has a continuation in a trie, then expands a
static tree template from the matched node (`Drafter.shape`: the config's `tree` cut at
gamma, or a chain of gamma): a node's child of rank r is its r-th most frequent continuation
(ties: the first seen), so a chain follows the most frequent continuation token by token.
A node is kept while its estimated probability, the product of each step's count / the
counts of its siblings, stays at or above `min_token_prob`, and while its depth is at most
`max_spec_factor` x the match length (the paper's adaptive speculation length: long matches
earn long drafts); a node left out takes its subtree with it. Of the two tries' drafts the
one with the higher score (the sum of its nodes' probabilities: the expected accepted count)
wins. Drafts are a point mass for the verifier, so the method is lossless like every other.

Warm-up rule: `forget()` empties the output cache as the measured window opens, so warm-up
outputs (of the first measured prompts) never feed a measured request; within the window
every finished request's output is cached, in finishing order, including repeats of a prompt
a load sends again.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable, Sequence

import torch

from .drafters import Drafter, DraftSession, point_mass_draft, unpadded_prompts
from .trees import TreeShape


class _Node:
    __slots__ = ("count", "children")

    def __init__(self):
        self.count = 0  # occurrences of the substring this node spells
        self.children: dict[int, _Node] = {}


class SuffixTrie:
    """Every substring of at most `depth` tokens of the texts appended, with its count: a suffix
    trie truncated at `depth`, O(depth) per appended token and exactly reversible (`remove`).

    Texts are appended token by token (`extend`); `open_text()` starts a new text, so that no
    substring crosses from one text into the next.
    """

    def __init__(self, depth: int):
        if depth < 2:
            raise ValueError(f"SuffixTrie depth must be >= 2 (a one-token match and its continuation), got {depth}")
        self.depth = depth
        self.root = _Node()
        self.nodes = 0
        self._open = [self.root]  # the nodes of the current text's suffixes of 0 .. depth - 1 tokens

    def open_text(self) -> None:
        self._open = [self.root]

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            grown = []
            for node in self._open:
                child = node.children.get(token)
                if child is None:
                    child = node.children[token] = _Node()
                    self.nodes += 1
                child.count += 1
                grown.append(child)
            self._open = [self.root, *grown[: self.depth - 1]]

    def remove(self, text: Sequence[int]) -> None:
        """Undo `open_text(); extend(text)`: every count it added is taken back, and the nodes
        left without any occurrence are dropped."""
        opened = [self.root]
        for token in text:
            shrunk = []
            for node in opened:
                child = node.children[token]
                child.count -= 1
                if child.count == 0:
                    del node.children[token]
                    self.nodes -= 1
                shrunk.append(child)
            opened = [self.root, *shrunk[: self.depth - 1]]

    def _walk(self, tokens: Sequence[int]) -> _Node | None:
        node = self.root
        for token in tokens:
            node = node.children.get(token)
            if node is None:
                return None
        return node

    def match(self, text: Sequence[int]) -> tuple[_Node, int]:
        """The node of the longest suffix of `text` that occurs with a continuation, and its
        length (0: the root, nothing matched). A suffix that occurs with a continuation has
        every shorter suffix doing so too, so the length is found by bisection."""
        low, high, best = 0, min(len(text), self.depth - 1), self.root
        while low < high:
            middle = (low + high + 1) // 2
            node = self._walk(text[len(text) - middle :])
            if node is not None and node.children:
                low, best = middle, node
            else:
                high = middle - 1
        return best, low

    def draft(self, text: Sequence[int], shape: TreeShape, factor: float, min_prob: float) -> tuple[list[int], list[int], float]:
        """The nodes of `shape` that continue `text` from its longest match, breadth-first:
        (tokens, parents as fed indices, score). A node's child of rank r is its r-th most
        frequent continuation (ties: the first seen), kept while its estimated probability
        (the product of each step's count / its siblings' counts) stays >= `min_prob` and its
        depth <= `factor` x the match length; a node left out takes its subtree with it. The
        score is the sum of the nodes' probabilities (the expected accepted count). Where a
        node reaches the trie's depth, its children continue from the longest match of the
        text with the node's path appended."""
        node, length = self.match(text)
        limit = int(factor * length)
        tokens, parents, score = [], [], 0.0
        reached = {(): (0, node, 1.0, [])}  # path -> (fed index, trie node, probability, its tokens)
        options: dict[tuple[int, ...], tuple[list[tuple[int, _Node]], int]] = {}  # path -> ranked children, their total
        for path in shape.paths:
            parent = path[:-1]
            if len(path) > limit or parent not in reached:
                continue
            fed, node, probability, spelled = reached[parent]
            if parent not in options:
                options[parent] = self._ranked(node, [*text[-self.depth :], *spelled])
            ranked, total = options[parent]
            if path[-1] >= len(ranked):
                continue
            token, child = ranked[path[-1]]
            probability *= child.count / total
            if probability < min_prob:
                continue
            tokens.append(token)
            parents.append(fed)
            score += probability
            reached[path] = (len(tokens), child, probability, [*spelled, token])
        return tokens, parents, score

    def _ranked(self, node: _Node, text: list[int]) -> tuple[list[tuple[int, _Node]], int]:
        """The continuations of `node`, which spells the end of `text`, most frequent first
        (ties: the first seen), and their total count; a node without any (at the trie's
        depth) gives those of the longest match of `text` (none when nothing matches)."""
        if not node.children:
            node, length = self.match(text)
            if not length:
                return [], 0
        ranked = sorted(node.children.items(), key=lambda item: -item[1].count)  # a stable sort
        return ranked, sum(child.count for _, child in ranked)


class OutputCache:
    """The outputs of earlier requests in one `SuffixTrie`, at most `cap_tokens` tokens of them:
    adding an output evicts the oldest ones beyond the cap (an output longer than the cap keeps
    its last `cap_tokens` tokens)."""

    def __init__(self, depth: int, cap_tokens: int):
        if cap_tokens < 0:
            raise ValueError(f"OutputCache cap_tokens must be >= 0, got {cap_tokens}")
        self.trie, self.cap_tokens = SuffixTrie(depth), cap_tokens
        self.outputs: deque[list[int]] = deque()
        self.tokens = self.added = self.evicted = 0

    def add(self, output: Sequence[int]) -> None:
        kept = list(output[-self.cap_tokens :]) if self.cap_tokens else []
        if not kept:
            return
        self.trie.open_text()
        self.trie.extend(kept)
        self.outputs.append(kept)
        self.tokens += len(kept)
        self.added += 1
        while self.tokens > self.cap_tokens:
            oldest = self.outputs.popleft()
            self.trie.remove(oldest)
            self.tokens -= len(oldest)
            self.evicted += 1

    def state(self) -> dict:
        return {"cache_tokens_cap": self.cap_tokens, "cached_tokens": self.tokens, "cached_outputs": len(self.outputs),
                "outputs_added": self.added, "outputs_evicted": self.evicted, "trie_nodes": self.trie.nodes}


def check_tree(tree: TreeShape, max_depth: int, max_spec_factor: float) -> None:
    """Refuse a tree deeper than any draft: a match is at most max_depth - 1 tokens long."""
    reach = int(max_spec_factor * (max_depth - 1))
    if tree.depth > reach:
        raise ValueError(f"a tree {tree.depth} deep reaches past the longest draft, "
                         f"int(max_spec_factor x (max_depth - 1)) = {reach} tokens")


class SuffixDrafter(Drafter):
    """Suffix decoding over the request's text and the cell's earlier outputs (module docstring)."""

    partial = True

    def __init__(self, max_depth: int = 24, max_spec_factor: float = 1.0, min_token_prob: float = 0.1,
                 cache_tokens: int = 10_000, tree: TreeShape | None = None):
        if max_spec_factor <= 0:
            raise ValueError(f"SuffixDrafter max_spec_factor must be > 0, got {max_spec_factor}")
        if not 0 <= min_token_prob <= 1:
            raise ValueError(f"SuffixDrafter min_token_prob must be in [0, 1], got {min_token_prob}")
        if tree is not None:
            check_tree(tree, max_depth, max_spec_factor)
        self.depth, self.factor, self.min_token_prob, self.tree = max_depth, max_spec_factor, min_token_prob, tree
        self.cache = OutputCache(max_depth, cache_tokens)

    def start(self, input_ids, attention_mask, sampler, vocab_size):
        return _SuffixSession(self, unpadded_prompts(input_ids, attention_mask), input_ids.device)

    def forget(self) -> None:
        self.cache = OutputCache(self.depth, self.cache.cap_tokens)

    def state(self) -> dict:
        return {"output_cache": "per cell, emptied as the measured window opens"} | self.cache.state()

    def propose(self, trie: SuffixTrie, text: list[int], shape: TreeShape) -> tuple[list[int], list[int]]:
        """The better of the request trie's and the output cache's drafts for `text`: (tokens,
        parents as fed indices)."""
        recent = text[-self.depth :]
        drafts = [source.draft(recent, shape, self.factor, self.min_token_prob) for source in (trie, self.cache.trie)]
        tokens, parents, _ = max(drafts, key=lambda draft: draft[2])  # a tie goes to the request's own text
        return tokens, parents


class _SuffixSession(DraftSession):
    def __init__(self, drafter: SuffixDrafter, prompts: list[list[int]], device: torch.device):
        self.drafter, self.device = drafter, device
        self.texts, self.tries = [], []
        for prompt in prompts:
            trie = SuffixTrie(drafter.depth)
            trie.extend(prompt)
            self.texts.append(list(prompt))
            self.tries.append(trie)

    def propose(self, last_tokens, gamma):
        # `last_tokens` is already in each row's text (committed on the host).
        shape = self.drafter.shape(gamma)
        drafts, parents = zip(*(self.drafter.propose(t, text, shape) for t, text in zip(self.tries, self.texts)))
        return point_mass_draft(list(drafts), self.device, None if shape.is_chain() else list(parents), shape.branching)

    def commit(self, outcome):
        for trie, text, tokens in zip(self.tries, self.texts, outcome.new_tokens):
            trie.extend(tokens)
            text.extend(tokens)

    def select(self, rows):
        self.texts, self.tries = [self.texts[r] for r in rows], [self.tries[r] for r in rows]

    def finish(self, outputs):
        for output in outputs.values():
            self.drafter.cache.add(output)
