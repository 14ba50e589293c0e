"""Learned draft heads on a tiny random Llama: the target's hidden states equal transformers',
EAGLE-3 and Medusa heads decode greedy tokens identical to AR (batched, ragged, growing and
static caches; chains, static token trees and EAGLE-2's dynamic trees) and sample the
target's distribution exactly (a reduced draft vocabulary included), the EAGLE-3 session's
cached drafts (chains and trees) equal the head run from scratch, checkpoints round-trip in
vLLM's and the speculators' forms, and heads that do not fit are refused."""

import contextlib
import functools
import itertools
import json
import random
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from specdec.decoding import GenerationSettings, generate, head_formats
from specdec.decoding.cache import open_cache
from specdec.decoding.drafters import on_target_vocab
from specdec.decoding.eagle3 import Eagle3Drafter, Eagle3Head, Eagle3Spec, default_aux_ids
from specdec.decoding.head_formats import EAGLE3_FORMS, HeadMismatch, head_spec, load_head, save_eagle3, save_medusa
from specdec.decoding.medusa import MedusaDrafter, MedusaHeads, MedusaSpec
from specdec.decoding.trees import DynamicTree, TreeShape
from specdec.gate.cells import HeadTraining
from specdec.prepare.head_training import draft_vocabulary, train_head
from specdec.prepare import training_corpus
from specdec.prepare.training_corpus import TrainingDataError

from conftest import chi_square_p, exact_joint, static_caches

VOCAB, HIDDEN, LAYERS = 16, 32, 8  # 8 layers: vLLM's default aux ids (2, 4, 5) are distinct
PROMPT = [5, 9, 3, 7, 5, 9, 3]
NEW_TOKENS = 40
# What the heads draft: chains, a static tree (3 deep: a 3-head Medusa's reach), EAGLE-2's dynamic tree.
TREES = {"chain": None, "static": TreeShape.from_branching([2, 2, 1]), "dynamic": DynamicTree(top_k=3, depth=3, nodes=8)}


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.3,  # peaked distributions: drafts are rejected often, and accepted
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def random_eagle3(target, draft_vocab: int, seed: int = 1, tree=None) -> Eagle3Drafter:
    """A random-weight EAGLE-3 head sharing `target`'s embedding; its draft vocabulary is a
    random subset of the target's (all of it when `draft_vocab` is the target's)."""
    torch.manual_seed(seed)
    layer = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        attn_implementation="sdpa")
    head = Eagle3Head(Eagle3Spec(layer, default_aux_ids(LAYERS), draft_vocab, HIDDEN), target.get_input_embeddings())
    for weight in (head.fc.weight, head.lm_head.weight):
        torch.nn.init.normal_(weight, std=0.3)
    kept = torch.randperm(VOCAB)[:draft_vocab].sort().values
    head.d2t.copy_(kept - torch.arange(draft_vocab))
    head.t2d[kept] = True
    return Eagle3Drafter(head.eval(), tree)


def random_medusa(target, heads: int = 3, seed: int = 2, as_initialised: bool = False, tree=None) -> MedusaDrafter:
    """Random-weight Medusa heads, or, `as_initialised`, heads as Medusa training starts them
    (zero blocks, the target's lm_head): they guess the target's next token again."""
    torch.manual_seed(seed)
    medusa = MedusaHeads(MedusaSpec(HIDDEN, VOCAB, heads, 1))
    with torch.no_grad():
        for name, weight in medusa.named_parameters():
            if not as_initialised:
                torch.nn.init.normal_(weight, std=0.3)
            else:
                weight.copy_(target.lm_head.weight if name.startswith("lm_heads.") else torch.zeros_like(weight))
    return MedusaDrafter(medusa.eval(), LAYERS, tree)


def ragged_batch():
    ids = torch.tensor([[0, 0, 0, 4, 11, 7, 3], PROMPT])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    return ids, mask


@pytest.fixture(scope="module")
def early_stop(target):
    """Greedy settings under which row 0 of `ragged_batch` meets its EOS a few tokens in and
    row 1 runs to the length limit (row 0 leaves the batch mid-decode), and AR's rows."""
    ids, mask = ragged_batch()
    ar = generate(target, ids, mask, GenerationSettings(max_new_tokens=NEW_TOKENS))
    eos = next(t for t in ar[0].output_ids[3:] if t not in ar[1].output_ids)
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS, gamma=3, eos_token_ids=(eos,))
    return settings, generate(target, ids, mask, settings)


def reference_states(target, tokens: list[int], ids) -> torch.Tensor:
    with torch.no_grad():
        states = target(torch.tensor([tokens]), output_hidden_states=True).hidden_states
    return torch.cat([states[i][0] for i in ids], dim=-1)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_the_target_steps_return_the_hidden_states_transformers_does(target, cache):
    """Ids 0 (embeddings), inner layers and L (final normed) after a ragged prefill and a
    ragged step equal `output_hidden_states` of each row run alone; without ids, none."""
    ids, mask = ragged_batch()
    hidden_ids = (0, 2, 4, 5, LAYERS)
    step = torch.tensor([[12, 13, 14], [6, 8, 10]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    with static_caches(target, max_length=16) if cache == "static" else contextlib.nullcontext(), torch.no_grad():
        plain, _ = open_cache(target, ids, mask, "target")
        assert plain.hidden is None
        opened, _ = open_cache(target, ids, mask, "target", hidden_ids=hidden_ids)
        prefill = opened.hidden
        opened.extend(step, valid)
        stepped = opened.hidden
    for row in range(2):
        prompt = ids[row][mask[row].bool()].tolist()
        text = prompt + step[row][valid[row]].tolist()
        expected = reference_states(target, text, hidden_ids)
        torch.testing.assert_close(prefill[row][mask[row].bool()], expected[: len(prompt)], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(stepped[row][valid[row]], expected[len(prompt):], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("kind, tree", [(kind, tree) for kind in ("eagle3", "eagle3 reduced", "medusa") for tree in TREES
                                        if (kind, tree) != ("medusa", "dynamic")])
def test_heads_decode_greedy_tokens_identical_to_ar(target, early_stop, kind, tree, cache):
    """Batch 2, left-padded, rows accepting different counts (trees: different paths), row 0
    leaving early: each row's tokens equal AR's."""
    ids, mask = ragged_batch()
    settings, ar = early_stop
    drafter = (random_medusa(target, as_initialised=True, tree=TREES[tree]) if kind == "medusa"
               else random_eagle3(target, 8 if "reduced" in kind else VOCAB, tree=TREES[tree]))
    room = drafter.max_nodes(settings.gamma)
    with static_caches(target, max_length=ids.shape[1] + NEW_TOKENS + room + 1) if cache == "static" else contextlib.nullcontext():
        rows = generate(target, ids, mask, settings, drafter)
    assert [r.output_ids for r in rows] == [r.output_ids for r in ar]
    assert [r.finish_reason for r in rows] == ["eos", "length"]
    assert all(r.drafted_tokens > 0 for r in rows) and sum(r.accepted_tokens for r in rows) > 0
    assert sum(r.target_forwards for r in rows) < sum(r.target_forwards for r in ar)
    for row in rows:
        assert row.accepted_per_position == sorted(row.accepted_per_position, reverse=True)
    if tree != "chain":  # several candidates a step, not one chain
        assert sum(r.drafted_tokens for r in rows) > settings.gamma * sum(r.target_forwards - 1 for r in rows)


class _Recorded:
    """Wraps a drafter's sessions: each proposal with each row's text at that time (and, in
    `shapes`, each proposal's node parents and the gamma it was asked for)."""

    model = None

    def __init__(self, drafter):
        self.drafter, self.hidden_ids, self.proposals, self.shapes = drafter, drafter.hidden_ids, [], []
        self.tree, self.dynamic = drafter.tree, drafter.dynamic  # the engine counts a tree drafter's nodes

    def max_nodes(self, gamma):
        return self.drafter.max_nodes(gamma)

    def start(self, input_ids, attention_mask, sampler, vocab_size):
        session = self.drafter.start(input_ids, attention_mask, sampler, vocab_size)
        texts = [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask)]
        recorded = self

        class Session:
            def propose(self, last_tokens, gamma):
                draft = session.propose(last_tokens, gamma)
                recorded.proposals += [(list(t), d) for t, d in zip(texts, draft.tokens.tolist())]
                recorded.shapes += [(parents, gamma) for parents in draft.tree_parents.tolist()]
                return draft

            def commit(self, outcome):
                for text, new in zip(texts, outcome.new_tokens):
                    text.extend(new)
                session.commit(outcome)

            def finish(self, outputs):
                session.finish(outputs)

            def select(self, rows):
                texts[:] = [texts[r] for r in rows]
                session.select(rows)

        return Session()


@functools.lru_cache(maxsize=4)
def fused_states(drafter: Eagle3Drafter, target, text: tuple[int, ...]) -> torch.Tensor:
    """(1, len(text) - 1, H) the head's fused target states of `text` but its last token
    (cached: a proposal's nodes share their row's text)."""
    return drafter.head.fc(reference_states(target, list(text), drafter.head.spec.aux_ids)[None, :-1])


def uncached_logits(drafter: Eagle3Drafter, target, text: list[int], path: list[int]) -> torch.Tensor:
    """The head's logits (V,) on the target's vocabulary after `text` and then the draft tokens
    `path`, run from scratch: slot j pairs the target's state at token j with token j + 1;
    each draft token is fed with the head's own state of the slot before it."""
    head = drafter.head
    fused = fused_states(drafter, target, tuple(text))
    cache = DynamicCache(config=head.config)
    tokens, positions = torch.tensor([text[1:]]), torch.arange(len(text) - 1)[None]
    for token in path:
        _, state = head(tokens, torch.ones(1, int(positions[0, -1]) + 1, dtype=torch.bool), positions, cache, fused)
        tokens, fused, positions = torch.tensor([[token]]), state[:, -1:], positions[:, -1:] + 1
    logits, _ = head(tokens, torch.ones(1, int(positions[0, -1]) + 1, dtype=torch.bool), positions, cache, fused)
    return on_target_vocab(logits[0, -1], head.target_ids(), VOCAB)


def node_paths(tokens: list[int], parents: list[int]) -> list[list[int]]:
    """Each fed index's root path of draft tokens (the root's: empty)."""
    paths = [[]]
    for token, parent in zip(tokens, parents):
        paths.append(paths[parent] + [token])
    return paths


def dynamic_reference(logits_after, tree: DynamicTree) -> set[tuple[int, ...]]:
    """EAGLE-2's tree from a drafter run from scratch (`logits_after(path)`: its logits (V,)
    after the row's text and the draft tokens `path`), as root paths: the top_k nodes of
    each depth by joint draft probability expanded into their top_k children, the best
    `nodes` of all candidates kept."""
    scores, frontier = {(): 0.0}, [()]
    for _ in range(tree.depth):
        grown = {}
        for path in frontier:
            best = torch.log_softmax(logits_after(list(path)), -1).topk(tree.top_k)
            grown |= {path + (int(t),): scores[path] + float(v) for v, t in zip(best.values, best.indices)}
        scores |= grown
        frontier = sorted(grown, key=grown.get, reverse=True)[: tree.top_k]
    del scores[()]
    return set(sorted(scores, key=scores.get, reverse=True)[: tree.nodes])


@pytest.mark.parametrize("tree", list(TREES))
def test_eagle3_cached_drafts_equal_the_head_run_from_scratch(target, early_stop, tree):
    """What the session drafts through its ragged cache (rolled back, re-fed with the target's
    states along the kept path, rows leaving) is what the head computes on each row's text
    from scratch: each node's children are the best tokens after its path (a chain's, the
    best one), and a dynamic tree is EAGLE-2's choice."""
    ids, mask = ragged_batch()
    recorded = _Recorded(random_eagle3(target, 8, tree=TREES[tree]))
    rows = generate(target, ids, mask, early_stop[0], recorded)
    assert [r.finish_reason for r in rows] == ["eos", "length"]
    assert len(recorded.proposals) > 10 and sum(r.accepted_tokens for r in rows) > 0
    with torch.no_grad():
        for (text, tokens), (parents, gamma) in zip(recorded.proposals, recorded.shapes):
            paths = node_paths(tokens, parents)
            if tree == "dynamic":
                logits_after = functools.partial(uncached_logits, recorded.drafter, target, text)
                assert set(map(tuple, paths[1:])) == dynamic_reference(logits_after, TREES[tree].truncated(gamma))
                continue
            for node, path in enumerate(paths):
                children = [paths[j + 1][-1] for j, parent in enumerate(parents) if parent == node]
                if children:
                    logits = uncached_logits(recorded.drafter, target, text, path)
                    assert children == logits.topk(len(children)).indices.tolist()


@pytest.mark.parametrize("kind, tree", [("eagle3 reduced", "chain"), ("medusa", "chain"), ("eagle3 reduced", "static"),
                                        ("eagle3 reduced", "dynamic"), ("medusa", "static")])
def test_heads_sample_the_target_distribution_exactly(target, kind, tree):
    """Draft probabilities live on the full vocabulary (zero outside a reduced draft
    vocabulary); a static tree's siblings are draws without replacement, a dynamic tree's
    nodes point masses: the verifier keeps the target's joint distribution of tokens 1-3."""
    settings = GenerationSettings(max_new_tokens=3, gamma=3, temperature=1.0)
    drafter = random_medusa(target, tree=TREES[tree]) if kind == "medusa" else random_eagle3(target, 8, tree=TREES[tree])
    draws = 6000
    ids = torch.tensor([PROMPT] * draws)
    rows = generate(target, ids, torch.ones_like(ids), settings, drafter, torch.Generator().manual_seed(11))
    tokens = torch.tensor([r.output_ids for r in rows])
    assert sum(r.accepted_tokens for r in rows) > draws // 10  # the drafts matter
    joint = exact_joint(target, settings, PROMPT, 3).reshape(VOCAB, VOCAB, VOCAB)
    pairs = torch.bincount(tokens[:, 1] * VOCAB + tokens[:, 2], minlength=VOCAB**2)
    assert chi_square_p(pairs, joint.sum(0).reshape(-1)) > 1e-3
    firsts = torch.bincount(tokens[:, 0] * VOCAB + tokens[:, 1], minlength=VOCAB**2)
    assert chi_square_p(firsts, joint.sum(2).reshape(-1)) > 1e-3


@pytest.mark.parametrize("form", EAGLE3_FORMS)
def test_eagle3_checkpoints_round_trip_in_both_forms(target, tmp_path, form):
    drafter = random_eagle3(target, 8)
    folder = save_eagle3(drafter, tmp_path / "head", form, verifier="tiny-llama")
    config, weights = json.loads((folder / "config.json").read_text()), load_file(folder / "model.safetensors")
    layer = "layers.0" if form == "speculators" else "midlayer"
    assert "embed_tokens.weight" not in weights  # the target's is shared
    assert weights["fc.weight"].shape == (HIDDEN, 3 * HIDDEN) and weights["lm_head.weight"].shape == (8, HIDDEN)
    assert weights[f"{layer}.self_attn.q_proj.weight"].shape[1] == 2 * HIDDEN
    assert weights["d2t"].dtype == torch.long and weights["t2d"].sum() == 8
    if form == "llama_eagle3":
        assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["num_hidden_layers"] == 1
        assert config["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [2, 4, 5], "use_aux_hidden_state": True}
        assert (config["draft_vocab_size"], config["target_hidden_size"], config["vocab_size"]) == (8, HIDDEN, VOCAB)
    else:
        assert config["speculators_model_type"] == "eagle3" and config["architectures"] == ["Eagle3Speculator"]
        assert config["speculators_config"]["verifier"]["name_or_path"] == "tiny-llama"
        assert config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5] and config["norm_before_residual"] is False
        assert config["transformer_layer_config"]["hidden_size"] == HIDDEN
    loaded = load_head(folder, target, kind="eagle3")
    assert loaded.head.embed_tokens is target.get_input_embeddings() and loaded.hidden_ids == (2, 4, 5)
    assert load_head(folder, target, "eagle3", TREES["dynamic"]).dynamic == TREES["dynamic"]
    assert replace(loaded.head.spec, layer=None) == replace(drafter.head.spec, layer=None)
    assert loaded.head.spec.layer.to_dict() == drafter.head.spec.layer.to_dict()
    original = drafter.head.state_dict()
    assert all(torch.equal(tensor, original[name]) for name, tensor in loaded.head.state_dict().items())


def test_medusa_checkpoints_round_trip(target, tmp_path):
    drafter = random_medusa(target)
    folder = save_medusa(drafter, tmp_path / "medusa")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["MedusaModel"] and config["model_type"] == "medusa"
    assert (config["num_heads"], config["num_hidden_layers"], config["vocab_size"]) == (3, 1, VOCAB)
    assert sorted(load_file(folder / "model.safetensors"))[:2] == ["blocks.0.layers.0.weight", "blocks.1.layers.0.weight"]
    loaded = load_head(folder, target)
    assert loaded.hidden_ids == (LAYERS,) and loaded.heads.spec == drafter.heads.spec
    assert load_head(folder, target, "medusa", TREES["static"]).tree == TREES["static"]
    with pytest.raises(ValueError, match="4 deep, but a Medusa head drafts one depth per head and this one has 3"):
        load_head(folder, target, "medusa", TreeShape.from_branching([1, 1, 1, 1]))
    with pytest.raises(ValueError, match="Medusa drafts static token trees"):
        load_head(folder, target, "medusa", TREES["dynamic"])
    original = drafter.heads.state_dict()
    assert all(torch.equal(tensor, original[name]) for name, tensor in loaded.heads.state_dict().items())


def test_a_hub_id_loads_through_the_same_code(target, tmp_path, monkeypatch):
    """A hub id goes through huggingface_hub's cached snapshot (here stood in by the local
    folder: nothing downloads); offline and uncached, it is refused in one line."""
    folder = save_eagle3(random_eagle3(target, 8), tmp_path / "head")
    with monkeypatch.context() as patched:
        patched.setattr(head_formats, "snapshot_download", lambda repo_id, allow_patterns: str(folder))
        assert load_head("someone/tiny-eagle3", target).head.spec.draft_vocab_size == 8
    with pytest.raises(HeadMismatch, match="someone/no-such-head: not a local folder, and the hub snapshot failed"):
        load_head("someone/no-such-head", target)


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[last] = value
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("kind, changes, message", [
    ("eagle3", {"hidden_size": 48}, "hidden_size 48 does not fit the target"),
    ("eagle3", {"target_hidden_size": 64}, "target_hidden_size 64 does not fit the target"),
    ("eagle3", {"vocab_size": 32}, "vocab_size 32 does not fit the target"),
    ("eagle3", {"eagle_config.eagle_aux_hidden_state_layer_ids": [2, 4, 8]}, "eagle_aux_hidden_state_layer_ids"),
    ("eagle3", {"num_hidden_layers": 2}, "num_hidden_layers 2"),
    ("eagle3", {"architectures": ["GPT2LMHeadModel"]}, "architectures"),
    ("eagle3", {"draft_vocab_size": 4}, r"(d2t|lm_head.weight) has shape \[8.*\], the config says \[4"),
    ("eagle3", {"norm_before_fc": True}, "norm_before_fc"),
    ("speculators", {"transformer_layer_config.hidden_size": 48}, "hidden_size 48"),
    ("speculators", {"speculators_model_type": "mlp"}, "speculators_model_type"),
    ("medusa", {"hidden_size": 48}, "hidden_size 48 does not fit the target"),
    ("medusa", {"vocab_size": 32}, "vocab_size 32 does not fit the target"),
    ("medusa", {"truncated_vocab_size": 8}, "truncated_vocab_size"),
])
def test_heads_that_do_not_fit_are_refused_by_field(target, tmp_path, kind, changes, message):
    folder = tmp_path / "head"
    if kind == "medusa":
        save_medusa(random_medusa(target), folder)
    else:
        save_eagle3(random_eagle3(target, 8), folder, "llama_eagle3" if kind == "eagle3" else kind)
    _edit_config(folder, **changes)
    with pytest.raises(HeadMismatch, match=message) as refused:
        load_head(folder, target)
    assert "\n" not in str(refused.value)
    if "has shape" not in message:  # the gate's check reads the config alone
        with pytest.raises(HeadMismatch, match=message):
            head_spec(folder, target.config)


def test_heads_of_another_kind_or_without_safetensors_are_refused(target, tmp_path):
    folder = save_medusa(random_medusa(target), tmp_path / "medusa")
    with pytest.raises(HeadMismatch, match="a medusa head, not the eagle3 head expected"):
        load_head(folder, target, kind="eagle3")
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    with pytest.raises(HeadMismatch, match="no \\*.safetensors weights"):
        load_head(folder, target)
    save_file({**weights, "extra.weight": torch.zeros(1)}, folder / "model.safetensors")
    with pytest.raises(HeadMismatch, match="unexpected \\['extra.weight'\\]"):
        load_head(folder, target)


def test_the_draft_vocabulary_is_the_most_frequent_tokens():
    assert draft_vocabulary(torch.tensor([[7, 3, 3, 5], [5, 1, 9, 9]]), 3, VOCAB).tolist() == [3, 5, 9]
    assert draft_vocabulary(torch.tensor([4, 2]), 1, VOCAB).tolist() == [2]  # a tie: the lower id


class CharTokenizer:
    """A stand-in tokenizer for the tiny target: one token per character (ids 3 .. VOCAB - 1)."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(ch) % (VOCAB - 3) for ch in text]}


def corpus_file(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def texts(count: int, seed: int = 5) -> list[str]:
    rng = torch.Generator().manual_seed(seed)
    return ["".join(chr(97 + int(i)) for i in torch.randint(0, 13, (40,), generator=rng)) for _ in range(count)]


def training(path: str, **changes) -> HeadTraining:
    settings = dict(target="tiny", path=path, tokens=2400, held_out_tokens=320, evaluations=3, draft_vocab=12,
                    sequence_tokens=20, batch_size=8, lr=3e-3, num_heads=2)
    return HeadTraining(**settings | changes)


@pytest.mark.parametrize("kind", ["eagle3", "medusa"])
def test_self_distillation_lowers_the_held_out_loss_and_writes_a_head_that_loads(target, tmp_path, kind):
    """A head trained on text the target labels itself (EAGLE-3: training-time test, 3 steps,
    decayed weights; Medusa: 2 heads) in one pass over left-padded batches: its held-out loss
    falls, the target stays frozen, and the head it writes loads and decodes losslessly."""
    settings = training(corpus_file(tmp_path / "corpus.jsonl", texts(80)))
    record = train_head(target, CharTokenizer(), kind, settings, 3, {}, tmp_path / "head", tmp_path / "head.state.pt")
    curve = record["curve"]
    assert [point["tokens"] for point in curve][0] == 0 and len(curve) == 4
    assert curve[-1]["held_out_loss"] < 0.97 * curve[0]["held_out_loss"]
    assert record["tokens"] >= settings.tokens and record["resumed"] == 0
    assert all(p.grad is None for p in target.parameters())  # the target stayed frozen
    assert not (tmp_path / "head.state.pt").exists()
    drafter = load_head(tmp_path / "head", target, kind)
    ids, mask = ragged_batch()
    greedy = GenerationSettings(max_new_tokens=12, gamma=2)
    ar = generate(target, ids, mask, GenerationSettings(max_new_tokens=12))
    assert [r.output_ids for r in generate(target, ids, mask, greedy, drafter=drafter)] == [r.output_ids for r in ar]


def test_training_text_that_shares_a_prompt_with_an_evaluation_dataset_is_refused(target, tmp_path):
    prompt = "Write a function that returns the sum of the squares of a list of integers."
    corpus = corpus_file(tmp_path / "corpus.jsonl", texts(10) + [f"Question: {prompt}  Answer: ..."])
    prompts = {"humaneval": [{"id": "humaneval-3", "turns": [prompt]}]}
    with pytest.raises(TrainingDataError, match="path corpus.jsonl:11 shares a prompt with evaluation dataset 'humaneval' "
                                                "\\(request humaneval-3\\)"):
        train_head(target, CharTokenizer(), "eagle3", training(corpus, tokens=1000), 3, prompts, tmp_path / "h", tmp_path / "s")


def test_a_killed_training_resumes_where_it_stopped_and_ends_as_an_uninterrupted_one(target, tmp_path):
    settings = training(corpus_file(tmp_path / "corpus.jsonl", texts(80)), evaluations=4)
    whole = train_head(target, CharTokenizer(), "eagle3", settings, 3, {}, tmp_path / "whole", tmp_path / "whole.pt")

    def kill_after_two_evaluations(line):
        if line.startswith(f"{whole['curve'][2]['tokens']:,} tokens"):
            raise KeyboardInterrupt

    state = tmp_path / "killed.pt"
    with pytest.raises(KeyboardInterrupt):
        train_head(target, CharTokenizer(), "eagle3", settings, 3, {}, tmp_path / "killed", state, log=kill_after_two_evaluations)
    assert state.is_file() and not (tmp_path / "killed").exists()
    resumed = train_head(target, CharTokenizer(), "eagle3", settings, 3, {}, tmp_path / "killed", state)
    assert resumed["resumed"] == 1 and resumed["tokens"] == whole["tokens"]
    assert [p["held_out_loss"] for p in resumed["curve"]] == pytest.approx([p["held_out_loss"] for p in whole["curve"]], rel=1e-4)
    ours, theirs = load_file(tmp_path / "killed" / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-5) for k in theirs)


def test_the_targets_own_answers_are_its_greedy_continuations_of_each_prompt(embedded_model):
    """Source `responses`: each document is a prompt's chat and the answer the target writes to
    it alone (left-padded batches change nothing), made lazily in the seed's order, and its
    prompt is the passage checked against the evaluation datasets."""
    target, tokenizer = embedded_model
    docs = list(itertools.islice(training_corpus.responses(tokenizer, target, random.Random(3), batch=3, max_tokens=6), 3))
    assert len({doc.id for doc in docs}) == 3 and all(doc.source == "responses" for doc in docs)
    for doc in docs:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": doc.passages[0]}], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(chat, add_special_tokens=False, return_tensors="pt")["input_ids"]
        alone = target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
        assert doc.text == chat + tokenizer.decode(alone[0, ids.shape[1]:])
    again = itertools.islice(training_corpus.responses(tokenizer, target, random.Random(3), batch=3, max_tokens=6), 1)
    assert next(again) == docs[0]
