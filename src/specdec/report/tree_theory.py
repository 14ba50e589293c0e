"""The token-tree theory: the tokens a tree yields per step from its nodes' acceptance, and the
best tree of each size for a measured acceptance (Sequoia's positional model).

A node is named by its path of child ranks from the root (`decoding.trees`). The verifier
tries a node's children in rank order until one is accepted, so the tokens a step yields are

    tau = 1 + sum over nodes n of P(n accepted) = 1 + sum_n prod over m on n's root path of a(m)

with a(m) the probability that m is accepted given that its parent was (the root always
is). The model behind the prediction is Sequoia's positional acceptance (Chen et al., 2024):
a(m) depends only on m's rank k among its siblings, not on its depth or its text,

    a(k) = p_k prod_{j < k} (1 - p_j),   p_k = P(rank k accepted | ranks < k rejected),

p_k estimated by maximum likelihood from the per-node counts (accepted / tried over the nodes
of rank k). A chain is the tree whose nodes all have rank 0: a(0) = p_0 is Leviathan's alpha
and tau the chain formula. A node present in only some steps' drafts (an n-gram table or a
suffix trie that cannot fill it, EAGLE-2's dynamic choice) counts with the share of its
parent's drafts that held it (`presence`), as if whether it is drafted did not depend on
whether it is accepted: for a dynamic tree, which drafts the nodes it is most confident of,
that is optimistic about the ranks it rarely drafts and pessimistic about those it favours.
"""

from __future__ import annotations

import heapq
import math
from typing import Mapping, Sequence

from specdec.job.metrics import MetricsError
from specdec.result import NodeCount, PositionCount

Path = tuple[int, ...]


def positional_acceptance(nodes: Sequence[NodeCount]) -> tuple[float, ...]:
    """p_0, p_1, ...: per sibling rank, accepted / tried over the nodes of that rank, up to
    the first rank never tried."""
    tried: dict[int, int] = {}
    accepted: dict[int, int] = {}
    for node in nodes:
        rank = node.path[-1]
        tried[rank] = tried.get(rank, 0) + node.tried
        accepted[rank] = accepted.get(rank, 0) + node.accepted
    p = []
    for rank in range(len(tried)):
        if not tried.get(rank):
            break
        p.append(accepted[rank] / tried[rank])
    return tuple(p)


def rank_acceptance(p: Sequence[float], rank: int) -> float:
    """a(k): the probability that a node's rank-k child is accepted, given the node was."""
    return p[rank] * math.prod(1 - q for q in p[:rank])


def chain_nodes(per_position: Sequence[PositionCount]) -> list[NodeCount]:
    """A chain's per-position counts as its nodes' (node i: the path of i zeros). Position i
    was tried when drafted and position i - 1 accepted; as `leviathan.per_token_alpha` counts
    it, min(accepted_(i-1), drafted_i), so p_0 is that alpha."""
    nodes, before = [], None
    for i, entry in enumerate(per_position, start=1):
        tried = entry.drafted if before is None else min(before, entry.drafted)
        nodes.append(NodeCount((0,) * i, entry.drafted, tried, entry.accepted))
        before = entry.accepted
    return nodes


def presence(nodes: Sequence[NodeCount], drafts: int) -> dict[Path, float]:
    """Each node's share of its parent's drafts that held it (a depth-1 node's: of the
    `drafts`, the steps that drafted): 1 everywhere for a static tree every step fills."""
    drafted = {node.path: node.drafted for node in nodes}
    return {path: count / (drafted.get(path[:-1], 0) if len(path) > 1 else drafts) if count else 0.0
            for path, count in drafted.items()}


def tree_tau(paths: Sequence[Path], p: Sequence[float], present: Mapping[Path, float] | None = None) -> float:
    """Tokens a drafting step yields: 1 + sum over nodes of the product of `rank_acceptance`
    (times `present`, where given) along each node's root path. Every path's prefix must be
    among `paths` and every rank within `p`."""
    reach: dict[Path, float] = {(): 1.0}
    for path in sorted(paths, key=lambda x: (len(x), x)):
        if path[:-1] not in reach:
            raise MetricsError(f"tree path {list(path)} has no parent path {list(path[:-1])}")
        if path[-1] >= len(p):
            raise MetricsError(f"tree path {list(path)}: no acceptance measured for rank {path[-1]}")
        share = 1.0 if present is None else present.get(path, 0.0)
        reach[path] = reach[path[:-1]] * share * rank_acceptance(p, path[-1])
    return sum(reach.values())


def best_tree(p: Sequence[float], nodes: int, max_depth: int) -> list[tuple[Path, float]]:
    """The best tree of every size up to `nodes` at most `max_depth` deep, for positional
    acceptance `p`: greedily, the node of highest root-path probability among those whose
    parent and elder sibling are in the tree (as Sequoia's and Medusa's tree searches). The
    first N nodes of the returned list are the tree of size N; each with its probability of
    being accepted, so tau(N) = 1 + the sum of the first N."""
    if not p or nodes < 1 or max_depth < 1:
        return []
    reach: dict[Path, float] = {(): 1.0}
    frontier = [(-rank_acceptance(p, 0), (0,))]
    while frontier and len(reach) <= nodes:
        negative, path = heapq.heappop(frontier)
        reach[path] = -negative
        if path[-1] + 1 < len(p):
            sibling = path[:-1] + (path[-1] + 1,)
            heapq.heappush(frontier, (-reach[path[:-1]] * rank_acceptance(p, sibling[-1]), sibling))
        if len(path) < max_depth:
            heapq.heappush(frontier, (-reach[path] * rank_acceptance(p, 0), path + (0,)))
    del reach[()]
    return list(reach.items())
