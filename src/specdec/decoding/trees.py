"""Token trees: the shape of a draft (each node's parent), which nodes a node sees, the
static tree templates drafters expand, and EAGLE-2's dynamic trees (`DynamicTree`).

A draft of g nodes is scored by the target in one forward over [last emitted token, node 1
.. node g]; the last emitted token is the root (fed index 0) and node i has fed index i. A
node's parent is a fed index before its own (nodes are in topological order), so a chain is
the tree whose node i hangs from fed index i - 1. A node sees the root, its ancestors and
itself (`ancestry`), and sits at position (tokens before the root) + its depth: exactly the
keys and positions it would have were its root path decoded alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Iterable, Sequence

import torch


def chain_parents(batch: int, nodes: int, device: torch.device) -> torch.Tensor:
    """(batch, nodes) parents of a chain: node i hangs from fed index i - 1."""
    return torch.arange(nodes, device=device).expand(batch, nodes)


def ancestry(parents: torch.Tensor) -> torch.Tensor:
    """(B, g + 1, g + 1) bool from (B, g) parents: [b, j, a] is True when fed index a is j or
    one of j's ancestors (the root included). Closed by squaring the one-step relation, so
    log2(depth) batched products instead of a loop over nodes."""
    batch, g = parents.shape
    fed = g + 1
    step = torch.eye(fed, device=parents.device).expand(batch, fed, fed).clone()
    step[:, 1:].scatter_(2, parents[..., None], 1.0)
    reach = step
    for _ in range(max(1, (fed - 1).bit_length())):
        reach = (reach @ reach).clamp_(max=1.0)
    return reach.bool()


def first_among_siblings(parents: torch.Tensor, passed: torch.Tensor) -> torch.Tensor:
    """(B, g) bool: the node passed and no earlier sibling (same parent, lower index) did."""
    g = parents.shape[1]
    earlier = torch.ones(g, g, dtype=torch.bool, device=parents.device).tril(-1)
    siblings = (parents[:, :, None] == parents[:, None, :]) & earlier
    return passed & ~(siblings & passed[:, None, :]).any(-1)


def sibling_rank(parents: torch.Tensor, in_draft: torch.Tensor) -> torch.Tensor:
    """(B, g) long: how many earlier nodes of the draft share each node's parent."""
    g = parents.shape[1]
    earlier = torch.ones(g, g, dtype=torch.bool, device=parents.device).tril(-1)
    siblings = (parents[:, :, None] == parents[:, None, :]) & earlier & in_draft[:, None, :]
    return siblings.sum(-1)


@dataclass(frozen=True)
class TreeShape:
    """A static tree template: `paths`, each a tuple of child ranks from the root ((0,) is the
    root's best child, (0, 1) that child's second best, ...), every path's prefix present.
    Nodes are numbered breadth-first (by depth, then path): a parent before its children.
    A node's children are ranks 0 .. k - 1. A chain of gamma tokens is `TreeShape.chain(gamma)`,
    the tree of width 1."""

    paths: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        paths = tuple(sorted({tuple(p) for p in self.paths}, key=lambda p: (len(p), p)))
        if not paths:
            raise ValueError("a token tree needs at least one path")
        for path in paths:
            if not path or min(path) < 0:
                raise ValueError(f"a tree path is a non-empty tuple of child ranks >= 0, got {path}")
            if len(path) > 1 and path[:-1] not in paths:
                raise ValueError(f"tree path {list(path)} has no parent path {list(path[:-1])}")
            if path[-1] > 0 and path[:-1] + (path[-1] - 1,) not in paths:
                # Children are a node's best k (greedy) or its first k draws (sampling): a rank
                # drawn but not proposed would change the later siblings' distributions.
                raise ValueError(f"tree path {list(path)} has no elder sibling {list(path[:-1] + (path[-1] - 1,))}")
        object.__setattr__(self, "paths", paths)

    @classmethod
    def chain(cls, gamma: int) -> TreeShape:
        return _chain(gamma)

    @classmethod
    def from_branching(cls, branching: Sequence[int]) -> TreeShape:
        """Every node at depth d - 1 gets `branching[d - 1]` children (the full tree)."""
        if not branching or min(branching) < 1:
            raise ValueError(f"tree branching needs depths of >= 1 children each, got {list(branching)}")
        paths, level = [], [()]
        for width in branching:
            level = [p + (r,) for p in level for r in range(width)]
            paths += level
        return cls(tuple(paths))

    @classmethod
    def of(cls, paths: Iterable[Sequence[int]]) -> TreeShape:
        return cls(tuple(tuple(p) for p in paths))

    @cached_property
    def parents(self) -> tuple[int, ...]:
        """Each node's parent as a fed index (0: the root)."""
        index = {p: i + 1 for i, p in enumerate(self.paths)}
        return tuple(index.get(p[:-1], 0) for p in self.paths)

    @property
    def depth(self) -> int:
        return len(self.paths[-1])

    @property
    def nodes(self) -> int:
        return len(self.paths)

    @cached_property
    def branching(self) -> int:
        """The most children of one node (1: a chain)."""
        counts: dict[tuple[int, ...], int] = {}
        for p in self.paths:
            counts[p[:-1]] = counts.get(p[:-1], 0) + 1
        return max(counts.values())

    def truncated(self, depth: int) -> TreeShape:
        """The nodes at most `depth` deep."""
        return self if depth >= self.depth else _truncated(self, depth)

    def is_chain(self) -> bool:
        return self.branching == 1

    def ancestry(self) -> list[list[bool]]:
        """(nodes + 1) x (nodes + 1): [j][a] is True when fed index a is j or an ancestor of j."""
        rows = [[a == 0 for a in range(self.nodes + 1)]]
        for j, parent in enumerate(self.parents, start=1):
            rows.append([a == j or rows[parent][a] for a in range(self.nodes + 1)])
        return rows

    def children(self, node: int) -> list[int]:
        """The fed indices of the children of fed index `node` (0: the root), in rank order."""
        return [j for j, parent in enumerate(self.parents, start=1) if parent == node]


# A drafter asks for its shape at every proposal: made once per (shape, depth).
@lru_cache(maxsize=64)
def _chain(gamma: int) -> TreeShape:
    return TreeShape.from_branching([1] * gamma)


@lru_cache(maxsize=64)
def _truncated(shape: TreeShape, depth: int) -> TreeShape:
    return TreeShape(tuple(p for p in shape.paths if len(p) <= depth))


@lru_cache(maxsize=256)
def rank_paths(parents: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Each node's path of child ranks from the root (`TreeShape.paths`' form) from its
    parents as fed indices: a node's rank is how many earlier nodes share its parent. The
    inverse of `TreeShape.parents`; it names the nodes of any draft, static or dynamic, the
    same way (a static tree's node with a rank left out takes its later siblings with it)."""
    paths: list[tuple[int, ...]] = [()]
    children: dict[int, int] = {}
    for parent in parents:
        rank = children.get(parent, 0)
        children[parent] = rank + 1
        paths.append(paths[parent] + (rank,))
    return tuple(paths[1:])


def node_key(path: Sequence[int]) -> str:
    """A node's path as a record's key: its ranks joined by dots ("0.1": the best child's
    second best)."""
    return ".".join(map(str, path))


def key_path(key: str) -> tuple[int, ...]:
    """The inverse of `node_key`."""
    return tuple(int(rank) for rank in key.split("."))


@dataclass(frozen=True)
class Level:
    """One forward of a drafter growing a tree in its own cache: the fed indices of the
    nodes at one depth that have children (the root at depth 0), what each sees of the
    window [root, nodes fed at earlier levels, these] (None: all of it, as in a chain), and
    each node's children (fed indices, in rank order)."""

    nodes: tuple[int, ...]
    sees: tuple[tuple[bool, ...], ...] | None
    children: tuple[tuple[int, ...], ...]


@lru_cache(maxsize=64)
def expansion(shape: TreeShape) -> tuple[tuple[Level, ...], dict[int, int]]:
    """How a drafter grows `shape` a level at a time, feeding only nodes with children
    (leaves are drawn, never fed): the levels, and each fed node's window slot (root: 0)."""
    views = shape.ancestry()
    depth = [0] + [len(p) for p in shape.paths]
    slots, window, levels = {0: 0}, [0], []
    for d in range(shape.depth):
        nodes = [j for j in range(shape.nodes + 1) if depth[j] == d and shape.children(j)]
        if d:
            for j in nodes:
                slots[j] = len(window)
                window.append(j)
        sees = tuple(tuple(views[j][w] for w in window) for j in nodes)
        levels.append(Level(tuple(nodes), None if all(all(row) for row in sees) else sees,
                            tuple(tuple(shape.children(j)) for j in nodes)))
    return tuple(levels), slots


@dataclass(frozen=True)
class DynamicTree:
    """EAGLE-2's dynamic token tree (Li et al., 2024): the root's `top_k` best children, then,
    at each later depth down to `depth`, the `top_k` nodes of best joint draft probability
    (the product along their path) each expanded into its `top_k` best children; of all these
    candidates the `nodes` best by joint probability are verified (`best_nodes`)."""

    top_k: int
    depth: int
    nodes: int

    def __post_init__(self):
        if min(self.top_k, self.depth, self.nodes) < 1:
            raise ValueError(f"a dynamic tree needs top_k, depth and nodes >= 1, got {self.top_k}, {self.depth}, {self.nodes}")
        if self.nodes > self.candidates:
            raise ValueError(f"dynamic.nodes {self.nodes} exceeds the {self.candidates} candidates that top_k {self.top_k} "
                             f"and depth {self.depth} grow (top_k + (depth - 1) * top_k^2)")

    @property
    def candidates(self) -> int:
        return grown(self.top_k, self.depth)

    def truncated(self, depth: int) -> DynamicTree:
        """The tree grown at most `depth` deep (its node budget capped by what that grows)."""
        if depth >= self.depth:
            return self
        depth = max(1, depth)
        return DynamicTree(self.top_k, depth, min(self.nodes, grown(self.top_k, depth)))


def grown(top_k: int, depth: int) -> int:
    """The candidates a dynamic tree of `top_k` and `depth` grows: the root's top_k children,
    then top_k children of each of top_k frontier nodes per later depth."""
    return top_k + (depth - 1) * top_k**2


def best_nodes(scores: torch.Tensor, parents: torch.Tensor, nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `nodes` best of a dynamic tree's candidates by joint draft log-probability.

    scores: (B, C), candidates in topological order (a parent before its children);
    parents: (B, C) each candidate's parent candidate (-1: the root). Returns (the chosen
    candidates (B, nodes), ascending: a draft's node order; their parents as fed indices
    (B, nodes), trees.py's convention). A child's joint probability never exceeds its
    parent's, and a stable sort keeps a parent ahead of a child it ties with, so every chosen
    node's parent is chosen too: the choice is a tree."""
    chosen = scores.sort(dim=1, descending=True, stable=True).indices[:, :nodes].sort(dim=1).values
    parent = parents.gather(1, chosen)
    fed = torch.searchsorted(chosen, parent.clamp(min=0)) + 1
    return chosen, torch.where(parent < 0, 0, fed)
