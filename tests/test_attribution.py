"""Time attribution (specdec.job.attribution) on the embedded model: the parts add up to the
decode time, forwards are counted and classified as the engines run them, only the window
counts, a fake clock gives hand-computed parts, and the setting switches it off."""

import dataclasses
import json

import pytest
import torch
from conftest import TINY_CONFIG, cell_inputs

from specdec.job.attribution import GENERATE_ACCEPTS, Attribution, Off
from specdec.decoding import GenerationSettings, ModelDrafter, NgramDrafter, generate
from specdec.decoding.kernels import tuned_linears
from specdec.engines.transformers import TransformersEngine, hf_generate

SETTINGS = GenerationSettings(max_new_tokens=6, gamma=3, eos_token_ids=(), pad_token_id=2)


@pytest.fixture(scope="module")
def models(embedded_model):
    from specdec.prepare.models import quantized_copy

    target, tokenizer = embedded_model
    drafter = quantized_copy(target, "int8")
    for model in (target, drafter):  # the kernel choice's own forwards, made up front as SpecdecEngine.open does
        tuned_linears(model)
    batch = tokenizer(["def add(a, b):", "The capital of France is"], return_tensors="pt", padding=True)
    return target, drafter, batch


class Counter:
    """Counts a model's forwards independently of the recorder."""

    def __init__(self, model):
        self.count = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.count += 1


def parts_sum(block):
    return sum(v for v in block["parts_s"].values() if v is not None)


def test_our_engine_parts_add_up_and_forwards_match_the_engines_counts(models):
    target, drafter, batch = models
    recorder = Attribution(target, drafter, drafts=True)

    def run():
        with recorder.decode():
            return generate(target, batch.input_ids, batch.attention_mask, SETTINGS, drafter=ModelDrafter(drafter),
                            accept_timer=recorder.accept)

    run()  # warm-up: before the window, not counted
    counter = Counter(drafter)
    recorder.begin()
    rows = run()
    recorder.end()
    counter.handle.remove()
    block = recorder.block()
    assert block["available"] and block["clock"] == "host clock" and block["not_separable"] == {}
    assert block["decode_calls"] == 1
    assert parts_sum(block) == pytest.approx(block["decode_s"], abs=1e-9)
    assert all(v > 0 for v in block["parts_s"].values())  # the CPU brackets its own work: other is positive
    forwards = block["forwards"]
    # One prefill of both rows; every later target forward is a decode of 1 + drafts tokens.
    assert forwards["target_prefill"]["count"] == 1 and forwards["target_prefill"]["rows"] == 2
    decode_rows = sum(b["rows"] for b in forwards["target_decode"].values())
    assert forwards["target_prefill"]["rows"] + decode_rows == sum(r.target_forwards for r in rows)
    assert block["steps"] == sum(b["count"] for b in forwards["target_decode"].values())
    assert set(forwards["target_decode"]) <= {"2", "3", "4"}  # [last token, 1 .. 3 drafts]
    drafter_forwards = forwards["drafter_prefill"]["count"] + sum(b["count"] for b in forwards["drafter"].values())
    assert forwards["drafter_prefill"]["count"] == 1 and drafter_forwards == counter.count
    assert block["parts_s"]["verify"] == pytest.approx(sum(b["total_s"] for b in forwards["target_decode"].values()))


def test_a_fake_clock_gives_the_hand_computed_parts(models):
    """Each clock reading advances 1 ms and nothing but the recorder reads it: AR of 4 tokens
    for one row is 1 prefill + 3 decode forwards and 4 accept steps, 8 brackets of 1 ms each,
    in a decode call of 17 readings apart (its start, the 16 bracket readings, its end), so
    other is the 9 ms between brackets."""
    target, _, batch = models
    ticks = iter(range(0, 10**9, 1_000_000))
    recorder = Attribution(target, drafts=False, clock=lambda: next(ticks))
    recorder.begin()
    with recorder.decode():
        generate(target, batch.input_ids[:1], batch.attention_mask[:1], dataclasses.replace(SETTINGS, max_new_tokens=4),
                 accept_timer=recorder.accept)
    recorder.end()
    block = recorder.block()
    assert block["decode_s"] == pytest.approx(0.017)
    assert block["parts_s"] == pytest.approx({"prefill": 0.001, "drafter": 0.0, "verify": 0.003, "accept": 0.004,
                                              "other": 0.009})
    assert block["forwards"]["target_decode"] == {"1": {"count": 3, "total_s": pytest.approx(0.003), "rows": 3}}


def test_a_model_free_drafter_has_no_drafter_part(models):
    target, _, batch = models
    recorder = Attribution(target, drafts=True)
    recorder.begin()
    with recorder.decode():
        generate(target, batch.input_ids, batch.attention_mask, SETTINGS, drafter=NgramDrafter(n=3),
                 accept_timer=recorder.accept)
    recorder.end()
    block = recorder.block()
    assert block["parts_s"]["drafter"] is None and "n-gram" in block["not_separable"]["drafter"]
    assert block["forwards"]["drafter"] == {} and block["forwards"]["drafter_prefill"]["count"] == 0
    assert parts_sum(block) == pytest.approx(block["decode_s"], abs=1e-9)


def test_transformers_generate_has_its_forwards_but_no_accept_step(models):
    target, drafter, batch = models
    recorder = Attribution(target, drafter, drafts=True, hidden=TransformersEngine.hidden_parts)
    counter = Counter(drafter)
    recorder.begin()
    with recorder.decode():
        rows = hf_generate(target, batch.input_ids[:1], batch.attention_mask[:1], SETTINGS, assistant_model=drafter)
    recorder.end()
    counter.handle.remove()
    block = recorder.block()
    assert block["parts_s"]["accept"] is None and block["not_separable"] == {"accept": GENERATE_ACCEPTS}
    forwards = block["forwards"]
    # generate() verifies its first draft with the prompt: that forward is the prefill.
    assert forwards["target_prefill"]["count"] == 1
    assert 1 + block["steps"] == rows[0].target_forwards
    assert forwards["drafter_prefill"]["count"] + sum(b["count"] for b in forwards["drafter"].values()) == counter.count
    assert parts_sum(block) == pytest.approx(block["decode_s"], abs=1e-9) and block["parts_s"]["other"] > 0


def test_outside_the_window_nothing_is_hooked(models):
    target, drafter, _ = models
    recorder = Attribution(target, drafter, drafts=True)
    recorder.begin()
    recorder.end()
    assert not target._forward_pre_hooks and not target._forward_hooks and not drafter._forward_hooks


def test_the_setting_is_carried_on_the_cell_without_renaming_it():
    from specdec.gate.config import expand_matrix, validate
    from specdec.records import cell_from_dict

    on = expand_matrix(validate(json.loads(json.dumps(TINY_CONFIG))))
    config = json.loads(json.dumps(TINY_CONFIG))
    config["experiments"]["tiny"]["attribution"] = False
    off = expand_matrix(validate(config))
    assert all(c.attribution for c in on) and not any(c.attribution for c in off)
    assert [c.id for c in on] == [c.id for c in off]
    assert cell_from_dict(off[0].to_dict(), "cell") == off[0]


def test_attribution_off_writes_unavailable_with_a_reason(tmp_path, embedded_model_dir):
    from specdec.job import runner
    from specdec.gate.config import expand_matrix, validate
    from specdec.records import read_result

    config = validate(json.loads(json.dumps(TINY_CONFIG)))
    cell = dataclasses.replace(next(c for c in expand_matrix(config) if c.method == "ar"), attribution=False)
    models_dir, prompts = cell_inputs(tmp_path, embedded_model_dir, config["datasets"]["sample"], seed=3)
    runner.run_cell(cell, prompts, tmp_path / "out", models_dir=models_dir)
    typed = read_result(tmp_path / "out" / "result.json")
    result, written = typed.to_dict(), typed.config
    assert result["status"] == "ok" and written.attribution is False
    assert result["attribution"] == {"available": False, "reason": Off().block()["reason"]}
    assert "attribution: false" in result["attribution"]["reason"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events need a GPU")
def test_cuda_events_time_the_forwards_without_changing_the_counts(tmp_path):
    from transformers import AutoModelForCausalLM
    from conftest import tiny_llama

    tiny_llama(tmp_path / "m", vocab_size=64)
    target = AutoModelForCausalLM.from_pretrained(tmp_path / "m").to("cuda").eval()
    drafter = AutoModelForCausalLM.from_pretrained(tmp_path / "m").to("cuda").eval()
    ids = torch.randint(3, 64, (2, 5), device="cuda")
    recorder = Attribution(target, drafter, drafts=True)
    recorder.begin()
    with recorder.decode():
        rows = generate(target, ids, torch.ones_like(ids), SETTINGS, drafter=ModelDrafter(drafter), accept_timer=recorder.accept)
    torch.cuda.synchronize()
    recorder.end()
    block = recorder.block()
    assert block["clock"] == "cuda events" and all(v > 0 for v in block["parts_s"].values())
    forwards = block["forwards"]
    assert forwards["target_prefill"]["rows"] + sum(b["rows"] for b in forwards["target_decode"].values()) == sum(
        r.target_forwards for r in rows)
