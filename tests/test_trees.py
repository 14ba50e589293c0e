"""Token trees: a tree is scored in one target forward as each of its root paths alone
(growing and static cache, ragged rows) and its accepted path kept without recompute; greedy
tree decoding equals AR for the model and n-gram drafters (static and EAGLE-2's dynamic
trees) and through a config's cells; the model drafter's cached tree equals its drafts from
scratch, a dynamic tree EAGLE-2's choice; multi-candidate verification keeps the target distribution
exactly (siblings with and without replacement, point masses, ragged rows, end to end)."""

import contextlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from specdec.decoding import Draft, GenerationSettings, ModelDrafter, NgramDrafter, RowResult, Sampler, generate, verify
from specdec.decoding.cache import open_cache
from specdec.decoding.head_formats import save_eagle3
from specdec.decoding.trees import DynamicTree, TreeShape, ancestry, best_nodes, expansion, key_path, rank_paths
from specdec.gate.config import expand_matrix, validate
from specdec.job import runner
from specdec.prepare.head_training import new_eagle3

from conftest import cell_inputs, chi_square_p, exact_joint, static_caches
from test_decoding import tiny_random_llama
from test_heads import _Recorded, dynamic_reference, node_paths
from test_sampling import PROMPT, VOCAB, tiny_model

TREE = TreeShape.from_branching([2, 2])  # fed: root, 1 2 (its children), 3 4 (of 1), 5 6 (of 2)
DYNAMIC = DynamicTree(top_k=3, depth=3, nodes=8)  # EAGLE-2's, for the model drafter


def test_shapes_number_nodes_breadth_first_and_refuse_what_is_not_a_tree():
    assert TREE.parents == (0, 0, 1, 1, 2, 2) and (TREE.nodes, TREE.depth, TREE.branching) == (6, 2, 2)
    assert TreeShape.chain(3).parents == (0, 1, 2) and TreeShape.chain(3).is_chain()
    assert TreeShape.of([(1,), (0,), (0, 0)]).parents == (0, 0, 1)
    assert TREE.truncated(1) == TreeShape.from_branching([2]) and TREE.truncated(5) is TREE
    assert ancestry(torch.tensor([TREE.parents])).tolist() == [TREE.ancestry()]
    assert TREE.ancestry()[4] == [True, True, False, False, True, False, False]
    with pytest.raises(ValueError, match=r"tree path \[1, 0\] has no parent path \[1\]"):
        TreeShape.of([(0,), (1, 0)])
    with pytest.raises(ValueError, match=r"tree path \[1\] has no elder sibling \[0\]"):
        TreeShape.of([(1,)])
    levels, slots = expansion(TREE)
    assert [level.nodes for level in levels] == [(0,), (1, 2)] and slots == {0: 0, 1: 1, 2: 2}
    assert levels[1].sees == ((True, True, False), (True, False, True)) and levels[1].children == ((3, 4), (5, 6))
    assert expansion(TreeShape.chain(3))[0][2].sees is None  # a chain's levels see their whole window


def test_a_dynamic_tree_keeps_its_best_nodes_by_joint_probability():
    """Candidates numbered depth by depth (root children a b c, then a's a0 a1, b's b0): the
    best N by joint probability, in candidate order, each parent's fed index; b0 ties its
    parent b (a child of probability 1) and is never chosen without it."""
    joint = torch.tensor([[0.6, 0.3, 0.1, 0.3, 0.24, 0.3],  # a b c a0 a1 b0
                          [0.2, 0.5, 0.3, 0.1, 0.05, 0.45]]).log()
    parents = torch.tensor([[-1, -1, -1, 0, 0, 1]] * 2)
    chosen, fed_parents = best_nodes(joint, parents, 4)
    assert chosen.tolist() == [[0, 1, 3, 5], [0, 1, 2, 5]]
    assert fed_parents.tolist() == [[0, 0, 1, 2], [0, 0, 0, 2]]
    assert best_nodes(joint, parents, 2)[0].tolist() == [[0, 1], [1, 5]]
    tree = DynamicTree(top_k=3, depth=4, nodes=20)
    assert tree.candidates == 30 and tree.truncated(2) == DynamicTree(3, 2, 12) and tree.truncated(9) is tree
    with pytest.raises(ValueError, match="dynamic.nodes 31 exceeds the 30 candidates"):
        DynamicTree(top_k=3, depth=4, nodes=31)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_a_tree_is_scored_in_one_forward_as_its_paths_alone_and_its_path_kept(cache):
    """Ragged rows, one forward over [root, 6 nodes] under the tree mask: each node's logits
    equal its root path run from scratch; rows then keep different paths (gathered into
    place) and the next logits equal the kept text's."""
    model = tiny_random_llama()
    prompt = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    fed = torch.tensor([[11, 20, 21, 30, 31, 32, 33], [12, 22, 23, 34, 35, 36, 37]])
    sees = ancestry(torch.tensor([TREE.parents] * 2))
    with static_caches(model, max_length=16) if cache == "static" else contextlib.nullcontext(), torch.no_grad():
        opened, _ = open_cache(model, prompt, mask, "target")
        logits = opened.extend(fed, torch.ones_like(fed, dtype=torch.bool), ancestry=sees)
        for row in range(2):
            text = prompt[row][mask[row].bool()].tolist()
            for node in range(7):
                path = fed[row, sees[row, node]].tolist()
                fresh = model(torch.tensor([text + path])).logits[0, -1]
                torch.testing.assert_close(logits[row, node], fresh, atol=1e-5, rtol=1e-4)
        # row 0 keeps root, fed 2, fed 6; row 1 keeps root, fed 1
        opened.rollback(torch.tensor([3, 2]), window=7, max_keep=3, order=torch.tensor([[0, 2, 6], [0, 1, 0]]))
        assert opened.lengths.tolist() == [5, 6]
        last = opened.extend(torch.tensor([[40], [41]]), torch.ones(2, 1, dtype=torch.bool))[:, -1]
        for row, kept in enumerate([[5, 6, 11, 21, 33, 40], [7, 8, 9, 10, 12, 22, 41]]):
            torch.testing.assert_close(last[row], model(torch.tensor([kept])).logits[0, -1], atol=1e-5, rtol=1e-4)


def test_greedy_verify_keeps_the_longest_path_the_argmax_follows():
    """Row 0: the argmax follows fed 2 then its second child (fed 6); row 1: nothing matches
    after the root; row 2 (4 nodes, the rest filler): fed 1, then fed 4."""
    logits = torch.full((3, 7, 50), -1.0)
    best = torch.tensor([[20, 0, 33, 0, 0, 0, 44], [25, 0, 0, 0, 0, 0, 0], [20, 31, 0, 0, 0, 0, 0]])
    logits.scatter_(2, best[..., None], 1.0)
    tokens = torch.tensor([[19, 20, 30, 31, 32, 33], [20, 21, 30, 31, 32, 33], [20, 21, 30, 31, 31, 31]])
    draft = Draft(tokens, torch.tensor([6, 6, 4]), parents=torch.tensor([TREE.parents] * 3), branching=2)
    accepted, nxt, path = verify(logits, draft, Sampler(0.0, 0, 1.0, None))
    assert accepted.tolist() == [2, 0, 2] and nxt.tolist() == [44, 25, 0]
    assert path[:, :2].tolist() == [[1, 5], [0, 0], [0, 3]]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_chain_verifies_as_the_tree_of_width_one(temperature):
    """A chain (parents None: the closed form) and the same chain given as an explicit tree
    accept the same paths and draw the same next tokens (same seed), ragged rows included."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 5, 16, generator=gen)
    tokens = torch.randint(0, 16, (64, 4), generator=gen)
    tokens[::2] = logits[::2, :4].argmax(-1)  # half the rows match the target's choices
    lengths = torch.randint(0, 5, (64,), generator=gen)
    probs = torch.softmax(torch.randn(64, 4, 16, generator=gen), -1) if temperature else None
    chain = Draft(tokens, lengths, probs)
    tree = Draft(tokens, lengths, probs, parents=torch.arange(4).expand(64, 4))
    as_chain, as_tree = (verify(logits, d, Sampler(temperature, 0, 1.0, torch.Generator().manual_seed(1)))
                         for d in (chain, tree))
    assert torch.equal(as_chain[0], as_tree[0]) and torch.equal(as_chain[1], as_tree[1])
    assert 0 < int(as_chain[0].sum()) and bool((as_chain[0] < lengths).any())
    kept = torch.arange(4) < as_chain[0][:, None]
    assert torch.equal(as_chain[2][kept], as_tree[2][kept])


def tiny_pair(seed: int, vocab: int = 6):
    """A target's first token p1 and next-token table P2[x1], a drafter's q1 and Q2[x1]."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.softmax(1.5 * torch.randn(*shape, generator=gen), -1)
            for shape in ((vocab,), (vocab, vocab), (vocab,), (vocab, vocab))]


def tree_draft(kind: str, rows: int, q1, q2, gen) -> Draft:
    """Draft trees of shape (3, 2) per row: 3 children of the root, 2 of each, drawn from
    q1 / q2[parent token] with replacement, without it, or fixed tokens (a point mass)."""
    shape = TreeShape.from_branching([3, 2])
    vocab = q1.shape[0]
    sampler = Sampler(1.0, 0, 1.0, gen)
    if kind == "point mass":
        tokens = torch.tensor([[0, 1, 2, 3, 4, 0, 5, 1, 2]]).expand(rows, -1)
        probs = None
    elif kind == "with replacement":
        first = sampler.sample(q1.expand(rows, 3, vocab))
        second = sampler.sample(q2[first][:, :, None].expand(-1, -1, 2, -1))
        tokens = torch.cat([first, second.reshape(rows, 6)], 1)
        probs = torch.cat([q1.expand(rows, 3, vocab), q2[first].repeat_interleave(2, 1)], 1)
    else:
        first, first_probs = sampler.children(q1.log().expand(rows, vocab), 3)
        second, second_probs = sampler.children(q2[first].log(), 2)
        tokens = torch.cat([first, second.reshape(rows, 6)], 1)
        probs = torch.cat([first_probs, second_probs.reshape(rows, 6, vocab)], 1)
    return Draft(tokens, torch.full((rows,), shape.nodes), probs, torch.tensor([shape.parents]).expand(rows, -1),
                 shape.branching)


def verified_pairs(kind: str, ragged: bool, seed: int = 2, rows: int = 20000, draft_probs=None):
    """((rows,) x1 * V + x2 for the first two tokens a tree step emits (x2 drawn from the
    target's P2 when the step emitted one token, as the next step would), their exact
    distribution (V * V,))."""
    p1, p2, q1, q2 = tiny_pair(seed)
    vocab = p1.shape[0]
    gen = torch.Generator().manual_seed(seed + 1)
    draft = tree_draft(kind, rows, q1, q2, gen)
    if draft_probs is not None:
        draft.probs = draft_probs(draft, q1, q2)
    if ragged:  # odd rows: 5 nodes (the root's 3 children, the first one's 2), the rest filler
        draft.lengths[1::2] = 5
    logits = torch.cat([p1.log().expand(rows, 1, vocab), p2[draft.tokens[:, :3]].log(),
                        torch.zeros(rows, 6, vocab)], 1)
    accepted, nxt, path = verify(logits, draft, Sampler(1.0, 0, 1.0, gen))
    kept = draft.tokens.gather(1, path)
    first = torch.where(accepted > 0, kept[:, 0], nxt)
    second = torch.where(accepted > 1, kept[:, 1], torch.where(accepted == 1, nxt, -1))
    completed = Sampler(1.0, 0, 1.0, gen).sample(p2[first])
    second = torch.where(second >= 0, second, completed)
    return first * vocab + second, torch.outer(p1, torch.ones(vocab)).mul(p2).reshape(-1)


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("kind", ["with replacement", "without replacement", "point mass"])
def test_tree_verification_keeps_the_target_distribution(kind, ragged):
    pairs, expected = verified_pairs(kind, ragged)
    assert chi_square_p(torch.bincount(pairs, minlength=expected.numel()), expected) > 1e-3


def test_the_test_detects_siblings_verified_against_the_wrong_distribution():
    """Power check: children drawn without replacement but verified as if each were drawn
    from the parent's full q (with replacement) are rejected by the same test."""
    def as_if_with_replacement(draft, q1, q2):
        return torch.cat([q1.expand(draft.tokens.shape[0], 3, -1), q2[draft.tokens[:, :3]].repeat_interleave(2, 1)], 1)

    pairs, expected = verified_pairs("without replacement", False, draft_probs=as_if_with_replacement)
    assert chi_square_p(torch.bincount(pairs, minlength=expected.numel()), expected) < 1e-6


def early_stopping(target):
    """A ragged batch, settings under which row 0 meets its EOS early and row 1 runs to the
    length limit, and AR's rows."""
    ids = torch.tensor([[0, 0, 0, 4, 11, 7, 3], PROMPT])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    ar = generate(target, ids, mask, GenerationSettings(max_new_tokens=30))
    eos = next(t for t in ar[0].output_ids[3:] if t not in ar[1].output_ids)
    settings = GenerationSettings(max_new_tokens=30, gamma=3, eos_token_ids=(eos,))
    return ids, mask, settings, generate(target, ids, mask, settings)


@pytest.mark.parametrize("kind, cache", [("model", "dynamic"), ("model", "static"), ("self", "static"), ("ngram", "dynamic"),
                                         ("model dynamic", "dynamic"), ("model dynamic", "static")])
def test_greedy_trees_decode_tokens_identical_to_ar(kind, cache):
    """Batch 2, left-padded, rows keeping different paths, row 0 leaving early."""
    target = tiny_model(0)
    ids, mask, settings, ar = early_stopping(target)
    tree = TreeShape.from_branching([3, 2, 1])
    drafter = {"model": lambda: ModelDrafter(tiny_model(1), tree), "self": lambda: ModelDrafter(target, tree),
               "ngram": lambda: NgramDrafter(n=3, min_context=1, tree=tree),
               "model dynamic": lambda: ModelDrafter(tiny_model(1), DYNAMIC)}[kind]()
    models = [target] + ([drafter.model] if kind.startswith("model") else [])
    room = drafter.max_nodes(settings.gamma)
    with static_caches(*models, max_length=ids.shape[1] + 30 + room + 1) if cache == "static" else contextlib.nullcontext():
        rows = generate(target, ids, mask, settings, drafter)
    assert [r.output_ids for r in rows] == [r.output_ids for r in ar]
    assert [r.finish_reason for r in rows] == ["eos", "length"]
    assert sum(r.target_forwards for r in rows) < sum(r.target_forwards for r in ar)
    assert sum(r.accepted_tokens for r in rows) > 0
    for row in rows:
        assert sum(row.accepted_per_position) == row.accepted_tokens
        assert row.accepted_per_position == sorted(row.accepted_per_position, reverse=True)
        assert_node_counts_agree(row, tree if kind in ("model", "self") else None)


def assert_node_counts_agree(row, shape: TreeShape | None) -> None:
    """A row's per-node counts add up to its per-depth counts; a node is tried no more often
    than drafted and accepted no more often than tried; a static tree's nodes are its paths
    (near the length limit, of the tree cut shallower)."""
    nodes = {key_path(key): counts for key, counts in row.per_node.items()}
    assert sum(c[0] for c in nodes.values()) == row.drafted_tokens
    for depth, accepted in enumerate(row.accepted_per_position, start=1):
        assert sum(c[2] for p, c in nodes.items() if len(p) == depth) == accepted
    assert all(drafted >= tried >= accepted for drafted, tried, accepted in nodes.values())
    if shape is not None:
        assert sorted(nodes, key=lambda p: (len(p), p)) == list(shape.paths)
        assert nodes[(0,)][0] == nodes[(0,)][1] == row.drafted_per_position[0]  # the first child: tried every step


def test_per_node_counts_follow_the_verifiers_order_of_trial():
    """Tree [2, 2]: nodes 1 2 (root's), 3 4 (of 1), 5 6 (of 2). Path [1, 4] (node 2, then
    its second child): node 1 tried and rejected, node 2 accepted, node 5 tried and
    rejected, node 6 accepted; nodes 3 and 4 (under the rejected node 1) never tried."""
    row = RowResult.empty(2, per_node=True)
    row.count_nodes(list(TREE.parents), [1, 5])
    assert row.per_node == {"0": [1, 1, 0], "1": [1, 1, 1], "0.0": [1, 0, 0], "0.1": [1, 0, 0],
                            "1.0": [1, 1, 0], "1.1": [1, 1, 1]}
    row.count_nodes([0, 1, 0], [0, 1])  # an n-gram tree that filled nodes 1, (0, 0), 2
    assert row.per_node["0"] == [2, 2, 1] and row.per_node["0.0"] == [2, 1, 1] and row.per_node["1"] == [2, 1, 1]
    assert rank_paths((0, 1, 0)) == ((0,), (0, 0), (1,)) and rank_paths(TREE.parents) == TREE.paths


def test_the_model_drafters_cached_tree_equals_its_drafts_from_scratch():
    """What the drafter proposes through its ragged cache (paths gathered, leaves carried,
    a row leaving) is each node's best children on the row's text and the node's path."""
    target, draft_model = tiny_model(0), tiny_model(1)
    ids, mask, settings, _ = early_stopping(target)
    tree = TreeShape.from_branching([2, 2])
    recorded = _Recorded(ModelDrafter(draft_model, tree))
    generate(target, ids, mask, settings, recorded)
    assert len(recorded.proposals) > 10
    with torch.no_grad():
        for text, tokens in recorded.proposals:
            # near the length limit a proposal is the tree cut at a smaller depth
            shape = next(tree.truncated(d) for d in (1, 2) if tree.truncated(d).nodes == len(tokens))
            views, fed = shape.ancestry(), [None] + tokens
            for node in range(shape.nodes + 1):
                children = shape.children(node)
                if children:
                    path = [fed[a] for a in range(1, node + 1) if views[node][a]]
                    logits = draft_model(torch.tensor([text + path])).logits[0, -1]
                    assert [fed[c] for c in children] == logits.topk(len(children)).indices.tolist()


def test_the_model_drafters_dynamic_tree_is_eagle2s_choice_from_scratch():
    """A dynamic tree grown through the drafter's ragged cache (frontiers fed under their
    ancestry, the kept path gathered, a node never fed carried, a row leaving) is the tree
    EAGLE-2's rule picks from the draft model run on each row's text from scratch."""
    target, draft_model = tiny_model(0), tiny_model(1)
    ids, mask, settings, _ = early_stopping(target)
    recorded = _Recorded(ModelDrafter(draft_model, DYNAMIC))
    generate(target, ids, mask, settings, recorded)
    assert len(recorded.proposals) > 5
    with torch.no_grad():
        for (text, tokens), (parents, gamma) in zip(recorded.proposals, recorded.shapes):
            logits_after = lambda path: draft_model(torch.tensor([text + path])).logits[0, -1]
            assert set(map(tuple, node_paths(tokens, parents)[1:])) == dynamic_reference(logits_after, DYNAMIC.truncated(gamma))


@pytest.mark.parametrize("kind, cache", [("model", "dynamic"), ("ngram", "static"), ("model dynamic", "dynamic")])
def test_tree_sampling_through_generation_keeps_the_target_distribution(kind, cache):
    """As test_sampling's chains: tokens 2 and 3 come from the first tree step (a dynamic
    tree's nodes are point masses)."""
    target, draft_model = tiny_model(0), tiny_model(1)
    tree = TreeShape.from_branching([3, 2])
    drafter = {"model": lambda: ModelDrafter(draft_model, tree), "ngram": lambda: NgramDrafter(n=2, min_context=1, tree=tree),
               "model dynamic": lambda: ModelDrafter(draft_model, DYNAMIC)}[kind]()
    settings = GenerationSettings(max_new_tokens=3, gamma=3, temperature=1.0)
    ids = torch.tensor([PROMPT] * 6000)
    with static_caches(target, draft_model, max_length=len(PROMPT) + 3 + tree.nodes + 1) if cache == "static" else contextlib.nullcontext():
        rows = generate(target, ids, torch.ones_like(ids), settings, drafter, torch.Generator().manual_seed(11))
    tokens = torch.tensor([r.output_ids for r in rows])
    joint = exact_joint(target, settings, PROMPT, 3).reshape(VOCAB, VOCAB, VOCAB)
    pair_counts = torch.bincount(tokens[:, 1] * VOCAB + tokens[:, 2], minlength=VOCAB**2)
    assert chi_square_p(pair_counts, joint.sum(0).reshape(-1)) > 1e-3
    assert sum(r.accepted_tokens for r in rows) > 0


def test_a_configs_token_trees_reach_our_engine_and_decode_as_ar(tmp_path, embedded_model_dir):
    """`drafters.NAME.tree` in a config, through the gate and the job: an n-gram tree cell and
    an EAGLE-3 head's dynamic tree cell (a head started from the target's own layers) on the
    embedded model decode their prompts token for token as the AR cell (the job's greedy
    check), eagerly, with more nodes verified than a chain of their depth would hold."""
    target = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32)
    head = save_eagle3(new_eagle3(target, torch.arange(2048)), tmp_path / "eagle")
    config = validate({
        "seed": 3, "models": {"smollm2": {"source": "embedded"}},
        "drafters": {"tree": {"kind": "ngram", "n": 4, "min_context": 1, "top_k": 3, "tree": {"branching": [3, 1, 1]}},
                     "eagle2": {"kind": "eagle3", "source": str(head), "tree": {"dynamic": {"top_k": 3, "depth": 3, "nodes": 8}}}},
        "datasets": {"edit": {"source": "humaneval_edit", "num_prompts": 2, "max_prompt_tokens": 384}},
        "experiments": {"t": {"target": "smollm2", "datasets": ["edit"], "max_new_tokens": 16, "warmup": 0, "reference": "separate",
                              "methods": [{"method": "ar"}, {"method": "ngram", "drafter": "tree", "gamma": 3},
                                          {"method": "eagle3", "drafter": "eagle2", "gamma": 3}]}},
        "power": {"enabled": False},
    })
    ar, *trees = sorted(expand_matrix(config), key=lambda cell: cell.drafts)
    models_dir, prompts = cell_inputs(tmp_path, embedded_model_dir, config["datasets"]["edit"], seed=3)
    assert runner.run_cell(ar, prompts, tmp_path / "ar", models_dir=models_dir)["status"] == "ok"
    for cell in trees:
        result = runner.run_cell(cell, prompts, tmp_path / cell.method, models_dir=models_dir, reference=tmp_path / "ar" / "requests.jsonl")
        assert result["status"] == "ok" and result["correctness"]["identical"], result.get("failure")
        assert not result["engine"]["settings"]["compile"]["target"]["enabled"]  # off on the CPU unless asked (test_compiled)
        acceptance = result["acceptance"]
        assert acceptance["drafted_tokens"] > acceptance["num_drafts"] * 3  # several continuations a step, not one chain
        assert acceptance["nodes_per_draft"] == acceptance["drafted_tokens"] / acceptance["num_drafts"]
        nodes = acceptance["per_node"]  # through the request records into the result
        assert sum(n["drafted"] for n in nodes) == acceptance["drafted_tokens"]
        assert sum(n["accepted"] for n in nodes) == acceptance["accepted_tokens"]
