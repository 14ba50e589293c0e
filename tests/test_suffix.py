"""Model-free drafters from earlier text: the suffix tries and output cache of suffix decoding,
the adjacency table of token recycling, the chains and token trees they draft, each lossless
on a tiny model and exact under sampling, trees through the tree verifier (the embedded
model's greedy check is in test_decoding.py)."""

import pytest
import torch

from specdec.decoding import GenerationSettings, RecyclingDrafter, StepOutcome, SuffixDrafter, generate
from specdec.decoding.suffix import OutputCache, SuffixTrie
from specdec.decoding.trees import TreeShape

from conftest import chi_square_p, exact_joint
from test_sampling import PROMPT, VOCAB, tiny_model
from test_trees import assert_node_counts_agree


def counts(trie: SuffixTrie) -> dict[tuple[int, ...], int]:
    """Every substring the trie holds, with its count."""
    found, stack = {}, [((), trie.root)]
    while stack:
        path, node = stack.pop()
        for token, child in node.children.items():
            found[path + (token,)] = child.count
            stack.append((path + (token,), child))
    return found


def substrings(texts: list[list[int]], depth: int) -> dict[tuple[int, ...], int]:
    found: dict[tuple[int, ...], int] = {}
    for text in texts:
        for start in range(len(text)):
            for end in range(start + 1, min(start + depth, len(text)) + 1):
                found[tuple(text[start:end])] = found.get(tuple(text[start:end]), 0) + 1
    return found


def test_trie_counts_every_substring_up_to_its_depth_within_each_text():
    trie = SuffixTrie(3)
    trie.extend([1, 2, 3])
    trie.extend([1, 2])  # the same text, appended in two parts
    trie.open_text()
    trie.extend([2, 3, 4])
    assert counts(trie) == substrings([[1, 2, 3, 1, 2], [2, 3, 4]], 3)
    assert trie.nodes == len(counts(trie))


def test_trie_remove_undoes_one_text_exactly():
    trie = SuffixTrie(4)
    for text in ([1, 2, 3, 1, 2, 4], [2, 3, 5], [1, 2, 3, 1, 2, 4]):
        trie.open_text()
        trie.extend(text)
    trie.remove([2, 3, 5])
    assert counts(trie) == substrings([[1, 2, 3, 1, 2, 4]] * 2, 4)
    trie.remove([1, 2, 3, 1, 2, 4])
    trie.remove([1, 2, 3, 1, 2, 4])
    assert counts(trie) == {} and trie.nodes == 0


def test_match_is_the_longest_suffix_with_a_continuation():
    trie = SuffixTrie(8)
    trie.extend([7, 1, 2, 3, 9, 1, 2, 3])
    # "1 2 3" last occurs at the end (no continuation yet) and earlier followed by 9
    node, length = trie.match([5, 1, 2, 3])
    assert length == 3 and list(node.children) == [9]
    assert trie.match([5, 6])[1] == 0  # nothing matches: the root


def chain(trie: SuffixTrie, text: list[int], gamma: int, factor: float, min_prob: float) -> tuple[list[int], float]:
    """A chain draft's tokens (each hanging from the one before) and score."""
    tokens, parents, score = trie.draft(text, TreeShape.chain(gamma), factor, min_prob)
    assert parents == list(range(len(tokens)))
    return tokens, score


def test_a_chain_follows_the_most_frequent_token_and_its_probability():
    trie = SuffixTrie(8)
    trie.extend([1, 2, 3, 0, 1, 2, 4, 0, 1, 2, 3, 0])
    # after "1 2": 3 twice, 4 once -> 3 (p 2/3), then "1 2 3" -> 0 (p 2/3 x 1)
    drafted, score = chain(trie, [5, 1, 2], gamma=8, factor=1.0, min_prob=0.0)
    assert drafted == [3, 0] and score == pytest.approx(4 / 3)  # at most factor x match length = 2
    assert chain(trie, [5, 1, 2], gamma=8, factor=2.0, min_prob=0.0)[0] == [3, 0, 1, 2]
    assert chain(trie, [5, 1, 2], gamma=1, factor=2.0, min_prob=0.0)[0] == [3]
    assert chain(trie, [5, 1, 2], gamma=8, factor=2.0, min_prob=0.7)[0] == []  # 2/3 < 0.7


def test_a_chain_goes_on_past_the_tries_depth():
    trie = SuffixTrie(3)
    trie.extend([1, 2, 3, 4, 5, 6])
    # depth 3 holds "2 3 4" but nothing longer: the path re-matches as it goes
    assert chain(trie, [9, 1, 2], gamma=4, factor=2.0, min_prob=0.0)[0] == [3, 4, 5, 6]


def test_a_tree_branches_over_the_most_frequent_continuations_in_rank_order():
    """After "1 2": 3 (x3, first seen), 4 (x3), 5 (x1); after "1 2 3": 7 (x2), 8 (x1); after
    "1 2 4": 9 (x3). Template: 3 children of the root, 2 of each: the ranks fill breadth-first,
    a rank with no continuation (the second child of 4, any child of 5 below min_prob) is left
    out with its subtree, and nothing goes deeper than factor x the match length."""
    trie = SuffixTrie(8)
    trie.extend([1, 2, 3, 7, 0, 1, 2, 4, 9, 0, 1, 2, 3, 8, 0, 1, 2, 4, 9, 0, 1, 2, 3, 7, 0, 1, 2, 4, 9, 0, 1, 2, 5, 6])
    shape = TreeShape.from_branching([3, 2, 1])
    tokens, parents, score = trie.draft([6, 1, 2], shape, factor=1.0, min_prob=0.0)
    assert tokens == [3, 4, 5, 7, 8, 9, 6] and parents == [0, 0, 0, 1, 1, 2, 3]  # 5's one child: 6
    assert score == pytest.approx(3 / 7 + 3 / 7 + 1 / 7 + 3 / 7 * 2 / 3 + 3 / 7 * 1 / 3 + 3 / 7 + 1 / 7)
    tokens, parents, _ = trie.draft([6, 1, 2], shape, factor=1.0, min_prob=0.2)
    assert tokens == [3, 4, 7, 9] and parents == [0, 0, 1, 2]  # 5 (1/7) and 8 (1/7) fall, 6 with 5
    tokens, parents, _ = trie.draft([6, 1, 2], shape, factor=1.5, min_prob=0.2)  # 1.5 x 2: depth 3
    assert tokens == [3, 4, 7, 9, 0, 0] and parents == [0, 0, 1, 2, 3, 4]
    assert trie.draft([6, 1, 2], shape, factor=0.4, min_prob=0.0)[0] == []  # 0.4 x 2 < one token
    with pytest.raises(ValueError, match=r"a tree 3 deep reaches past the longest draft, int\(max_spec_factor x \(max_depth - 1\)\) = 2 tokens"):
        SuffixDrafter(max_depth=5, max_spec_factor=0.6, tree=shape)  # matches of <= 4 tokens, drafts of <= 2


def test_output_cache_evicts_the_oldest_outputs_and_holds_its_cap_over_a_long_run():
    cache = OutputCache(depth=4, cap_tokens=50)
    generator = torch.Generator().manual_seed(0)
    outputs = [torch.randint(0, 20, (int(torch.randint(1, 30, (1,), generator=generator)),), generator=generator).tolist()
               for _ in range(300)]
    for i, output in enumerate(outputs):
        cache.add(output)
        assert cache.tokens <= 50
        kept = list(cache.outputs)
        assert kept == outputs[i - len(kept) + 1 : i + 1]  # the newest ones, in order
        assert counts(cache.trie) == substrings(kept, 4)
    state = cache.state()
    assert state["cache_tokens_cap"] == 50 and state["outputs_added"] == 300
    assert state["outputs_evicted"] == 300 - len(cache.outputs) and state["cached_tokens"] == cache.tokens
    long = list(range(80))
    cache.add(long)  # longer than the cap: its last 50 tokens
    assert list(cache.outputs) == [long[-50:]] and cache.tokens == 50


def test_suffix_drafter_drafts_from_earlier_outputs_and_forgets_them():
    drafter = SuffixDrafter(max_depth=8, max_spec_factor=4.0, min_token_prob=0.0)
    ids = torch.tensor([[1, 2, 3]])
    session = drafter.start(ids, torch.ones_like(ids), None, 20)
    session.commit(StepOutcome(torch.tensor([0]), [0], torch.tensor([4]), [[4]]))
    assert session.propose(torch.tensor([4]), 4).lengths.tolist() == [0]  # nothing seen after "4"
    drafter.start(ids, torch.ones_like(ids), None, 20).finish({0: [4, 5, 6, 7, 8]})  # an earlier request's output
    assert session.propose(torch.tensor([4]), 4).tokens.tolist() == [[5, 6, 7, 8]]
    assert drafter.state()["cached_outputs"] == 1
    drafter.cache.add([4, 9, 6])
    drafter.tree = TreeShape.from_branching([2, 2])  # after "4": 5 (first seen), 9; each then 6
    draft = session.propose(torch.tensor([4]), 4)
    assert draft.tokens.tolist() == [[5, 9, 6, 6]] and draft.parents.tolist() == [[0, 0, 1, 2]] and draft.branching == 2
    drafter.forget()
    assert session.propose(torch.tensor([4]), 4).lengths.tolist() == [0]
    assert drafter.state()["cached_outputs"] == 0


def test_suffix_drafter_prefers_the_more_likely_of_its_two_tries():
    drafter = SuffixDrafter(max_depth=8, max_spec_factor=4.0, min_token_prob=0.0)
    for output in ([1, 2, 9, 9], [1, 2, 9, 9], [1, 2, 7, 7]):
        drafter.cache.add(output)
    ids = torch.tensor([[1, 2, 7, 0, 1, 2]])  # its own text says 7, the cache 9 twice out of three
    session = drafter.start(ids, torch.ones_like(ids), None, 20)
    assert session.propose(torch.tensor([2]), 2).tokens.tolist() == [[7, 0]]  # p 1 beats p 2/3


def test_recycling_table_takes_the_targets_top_k_after_each_fed_token():
    drafter = RecyclingDrafter(top_k=2)
    ids = torch.tensor([[0, 5], [6, 7]])
    session = drafter.start(ids, torch.tensor([[0, 1], [1, 1]]), None, 10)
    logits = torch.zeros(2, 1, 10)
    logits[0, 0, 3], logits[0, 0, 4] = 2.0, 1.0  # after 5: 3, then 4
    logits[1, 0, 8], logits[1, 0, 1] = 2.0, 1.0  # after 7: 8, then 1
    session.commit(StepOutcome(torch.tensor([0, 0]), [0, 0], torch.tensor([3, 8]), [[3], [8]], logits=logits))
    assert drafter.table[5].tolist() == [3, 4] and drafter.table[7].tolist() == [8, 1]
    assert drafter.state()["tokens_seen"] == 2
    # a chain from 5 runs 5 -> 3 and stops (3 never seen); from 8 (never seen) there is none
    draft = session.propose(torch.tensor([5, 8]), 3)
    assert draft.lengths.tolist() == [1, 0] and draft.tokens.tolist() == [[3], [0]]
    # the next step fed [5, 3] and [8, filler]: the filler teaches nothing
    logits = torch.zeros(2, 2, 10)
    logits[:, :, 9] = 1.0
    session.commit(StepOutcome(torch.tensor([1, 0]), [1, 0], torch.tensor([9, 9]), [[3, 9], [9]], logits=logits))
    assert drafter.table[3].tolist()[0] == drafter.table[8].tolist()[0] == 9 and drafter.table[0].tolist() == [-1, -1]
    assert drafter.table[5].tolist()[0] == 9  # refreshed: the most recent context wins
    drafter.forget()
    assert drafter.state()["tokens_seen"] == 0


def test_recycling_tree_expands_its_template_over_the_table_and_learns_from_every_node():
    """Template 2 x 2: a node's children are its token's first and second successors; a
    token never seen has none, so its subtree is left out and the nodes after it move up,
    their parents renumbered; a row whose last token was never seen drafts nothing."""
    drafter = RecyclingDrafter(top_k=2, tree=TreeShape.from_branching([2, 2]))
    ids = torch.tensor([[1, 5], [1, 8], [1, 9]])
    session = drafter.start(ids, torch.ones_like(ids), None, 12)
    for token, successors in {5: [3, 4], 3: [6, 7], 8: [1, 2], 2: [10, 11]}.items():  # 4, 1, 9 never seen
        drafter.table[token] = torch.tensor(successors)
    draft = session.propose(torch.tensor([5, 8, 9]), 2)
    assert draft.lengths.tolist() == [4, 4, 0] and draft.branching == 2
    assert draft.tokens.tolist() == [[3, 4, 6, 7], [1, 2, 10, 11], [0, 0, 0, 0]]
    assert draft.parents.tolist() == [[0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 0, 0]]
    assert session.propose(torch.tensor([5, 8, 9]), 1).tokens.tolist() == [[3, 4], [1, 2], [0, 0]]  # cut at depth 1
    draft = session.propose(torch.tensor([5, 8, 9]), 2)
    logits = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(0))
    session.commit(StepOutcome(torch.tensor([0, 0, 0]), [0, 0, 0], torch.tensor([0, 0, 0]), [[0]] * 3, logits=logits))
    for row, fed in enumerate([[5, 3, 4, 6, 7], [8, 1, 2, 10, 11], [9]]):  # every node, on or off the kept path
        for position, token in enumerate(fed):
            assert drafter.table[token].tolist() == logits[row, position].topk(2).indices.tolist()
    assert drafter.table[0].tolist() == [-1, -1]  # the empty row's filler taught nothing
    with pytest.raises(ValueError, match="a node with 3 children needs as many successors per token; top_k is 2"):
        RecyclingDrafter(top_k=2, tree=TreeShape.from_branching([3]))


@pytest.mark.parametrize("kwargs", [{"max_spec_factor": 0}, {"min_token_prob": 1.5}, {"max_depth": 1}, {"cache_tokens": -1}])
def test_suffix_drafter_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError, match="SuffixDrafter|SuffixTrie|OutputCache"):
        SuffixDrafter(**kwargs)


def test_recycling_drafter_rejects_bad_settings():
    with pytest.raises(ValueError, match="RecyclingDrafter top_k"):
        RecyclingDrafter(top_k=0)


@pytest.fixture(scope="module")
def target():
    return tiny_model(0)


TREE = TreeShape.from_branching([2, 2, 1])
DRAFTERS = {"suffix": lambda: SuffixDrafter(max_depth=6, min_token_prob=0.0),
            "recycling": lambda: RecyclingDrafter(top_k=2),
            "suffix_tree": lambda: SuffixDrafter(max_depth=6, max_spec_factor=2.0, min_token_prob=0.0, tree=TREE),
            "recycling_tree": lambda: RecyclingDrafter(top_k=2, tree=TREE)}


def branched(rows) -> bool:
    """Whether some step verified more nodes than its depth: siblings, a tree's."""
    return sum(r.drafted_tokens for r in rows) > sum(sum(r.drafted_per_position) for r in rows)


@pytest.mark.parametrize("name", DRAFTERS)
def test_greedy_output_is_the_targets_alone_request_after_request(target, name):
    """Each request drafts from what earlier ones left (cache, table): still the AR tokens."""
    drafter = DRAFTERS[name]()
    settings = GenerationSettings(max_new_tokens=24, gamma=4)
    ids = torch.tensor([PROMPT, PROMPT[::-1]])
    reference = [r.output_ids for r in generate(target, ids, torch.ones_like(ids), settings)]
    accepted = []
    for _ in range(2):
        rows = generate(target, ids, torch.ones_like(ids), settings, drafter)
        assert [r.output_ids for r in rows] == reference
        accepted.append(sum(r.accepted_tokens for r in rows))
    assert accepted[1] > 0
    assert branched(rows) == name.endswith("_tree")
    for row in rows:  # a tree drafter's rows count per node, a chain's do not
        if name.endswith("_tree"):
            assert_node_counts_agree(row, None)
        else:
            assert row.per_node is None


@pytest.mark.parametrize("name", DRAFTERS)
def test_sampling_keeps_the_target_distribution(target, name):
    """Warmed by one run (so that the first speculative step drafts), then 6000 draws: the
    joint of tokens 2 and 3 (the first speculative step's) is the target's; through the
    tree verifier for a tree."""
    drafter = DRAFTERS[name]()
    settings = GenerationSettings(max_new_tokens=3, gamma=3, temperature=1.0)
    ids = torch.tensor([PROMPT] * 64)
    generate(target, ids, torch.ones_like(ids), settings, drafter, torch.Generator().manual_seed(3))
    ids = torch.tensor([PROMPT] * 6000)
    rows = generate(target, ids, torch.ones_like(ids), settings, drafter, torch.Generator().manual_seed(11))
    assert sum(r.drafted_tokens for r in rows) > 1000  # the test exercises the drafts
    assert branched(rows) == name.endswith("_tree")
    tokens = torch.tensor([r.output_ids for r in rows])
    joint = exact_joint(target, settings, PROMPT, 3).reshape(VOCAB, VOCAB, VOCAB)
    assert chi_square_p(torch.bincount(tokens[:, 1] * VOCAB + tokens[:, 2], minlength=VOCAB**2), joint.sum(0).reshape(-1)) > 1e-3
    assert chi_square_p(torch.bincount(tokens[:, 0] * VOCAB + tokens[:, 1], minlength=VOCAB**2), joint.sum(2).reshape(-1)) > 1e-3


ENGINES_CONFIG = {
    "models": {"smollm2": {"source": "embedded"}},
    "drafters": {"suffix": {"kind": "suffix"}, "recycling": {"kind": "recycling"}},
    "datasets": {"sample": {"source": "sample", "num_prompts": 2, "turns": "first"}},
    "experiments": {"e": {
        "target": "smollm2", "datasets": ["sample"], "engine": ["specdec", "transformers", "vllm"],
        "methods": [{"method": "suffix", "drafter": "suffix", "gamma": 8}, {"method": "recycling", "drafter": "recycling"}],
        "max_new_tokens": 12, "warmup": 1, "attribution": False,
    }},
    "power": {"enabled": False},
}


def test_the_gate_types_the_drafters_and_only_our_engine_runs_them():
    from specdec import records
    from specdec.gate.cells import Cell
    from specdec.gate.config import expand_matrix, validate
    from specdec.engines import unsupported

    cells = {(c.engine, c.method): c for c in expand_matrix(validate(ENGINES_CONFIG))}
    suffix, recycling = cells["specdec", "suffix"].drafter, cells["specdec", "recycling"].drafter
    assert (suffix.max_depth, suffix.max_spec_factor, suffix.min_token_prob, suffix.cache_tokens, suffix.top_k) == (24, 1.0, 0.1, 10000, None)
    assert (recycling.top_k, recycling.max_depth) == (8, None)
    for (engine, method), cell in cells.items():
        assert cell.drafter_model is None  # model-free: nothing to load
        assert (unsupported(cell) is None) == (engine == "specdec" or (engine, method) == ("vllm", "suffix"))
        records.validate("cell", cell.to_dict(), cell.name)
        assert Cell.from_dict(cell.to_dict()) == cell
    assert "(recycling) runs through our engine's Drafter interface; vllm" in unsupported(cells["vllm", "recycling"])
    assert "(suffix) runs through our engine's Drafter interface; transformers" in unsupported(cells["transformers", "suffix"])


def test_a_cell_forgets_the_warm_up_and_reports_its_cap(tmp_path, embedded_model_dir):
    """Through the runner, with the config's token trees (`drafters.NAME.tree`): lossless
    against the interleaved AR reference on the embedded model, more nodes verified than
    depths (siblings); the suffix cache holds the measured requests' outputs only (the
    warm-up's were forgotten), with its cap."""
    from conftest import cell_inputs

    from specdec.job import runner
    from specdec.gate.config import expand_matrix, validate

    trees = {"suffix": {"kind": "suffix", "tree": {"branching": [2, 1, 1, 1]}},
             "recycling": {"kind": "recycling", "tree": {"branching": [2, 2]}}}
    config = ENGINES_CONFIG | {"drafters": trees, "experiments": {"e": ENGINES_CONFIG["experiments"]["e"] | {"engine": "specdec"}}}
    models_dir, prompts = cell_inputs(tmp_path, embedded_model_dir, config["datasets"]["sample"], seed=0)
    for cell in expand_matrix(validate(config)):
        result = runner.run_cell(cell, prompts, tmp_path / cell.method, models_dir=models_dir)
        assert result["status"] == "ok" and result["correctness"]["identical"], result.get("correctness")
        acceptance = result["acceptance"]
        assert acceptance["drafted_tokens"] > sum(p["drafted"] for p in acceptance["per_position"]), acceptance
        state = result["engine"]["settings"]["drafter"]
        if cell.method == "suffix":
            assert state["outputs_added"] == 2 and state["cache_tokens_cap"] == 10000
        else:
            assert state["top_k"] == 8 and state["tokens_seen"] > 0
