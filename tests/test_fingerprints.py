"""Content fingerprints: what a folder's digest covers, when the cache rehashes, and the
`metadata.inputs` block every result records."""

import hashlib
import json
import os
from pathlib import Path

import pytest
from conftest import tiny_llama

from specdec import cli
from specdec.gate.cells import Cell, DrafterSpec, Generation, Load, ModelSpec, Placement
from specdec.job.fingerprints import DigestCache
from specdec.records import read_result, write_cell, write_prompts


def folder_sha256(folder: Path) -> str:
    """The documented digest of a folder: sha256 over `relative path NUL sha256 LF` of its
    files in sorted order, hidden ones left out."""
    digest = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(folder).parts))
    for path in files:
        digest.update(f"{path.relative_to(folder).as_posix()}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


@pytest.fixture
def folder(tmp_path):
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "weights.bin").write_bytes(b"\1" * 1000)
    (folder / ".cache").mkdir()
    (folder / ".cache" / "download.lock").write_text("bookkeeping")
    return folder


def test_a_folder_digest_covers_its_files_and_not_hidden_ones(folder, tmp_path):
    cache = DigestCache(tmp_path / "cache.json")
    assert cache.digest(folder) == folder_sha256(folder)
    (folder / ".cache" / "download.lock").write_text("other bookkeeping")
    assert cache.digest(folder) == folder_sha256(folder)
    (folder / "sub" / "extra.txt").write_text("x")
    assert cache.digest(folder) == folder_sha256(folder)
    assert cache.digest(tmp_path / "nowhere") is None


def test_new_content_at_the_same_size_and_time_changes_the_digest(folder, tmp_path):
    cache = DigestCache(tmp_path / "cache.json")
    weights = folder / "sub" / "weights.bin"
    before, stat = cache.digest(folder), weights.stat()
    weights.write_bytes(b"\2" * 1000)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cache.digest(folder) != before
    assert cache.digest(folder) == folder_sha256(folder)


def test_an_unchanged_file_is_not_read_again(folder, tmp_path, monkeypatch):
    first = DigestCache(tmp_path / "cache.json")
    digest = first.digest(folder)
    first.save()
    second = DigestCache(tmp_path / "cache.json")  # another process: the stored cache

    def no_reading(*args, **kwargs):
        raise AssertionError("a cached file was read again")

    monkeypatch.setattr(Path, "open", no_reading)
    assert second.digest(folder) == digest


def test_an_unwritable_cache_is_only_not_kept(folder, tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "cache.json").mkdir()  # a folder where the file should be: cannot be replaced
    cache = DigestCache(tmp_path / "ro" / "cache.json")
    assert cache.digest(folder) == folder_sha256(folder)
    cache.save()


def test_a_result_records_the_fingerprints_of_its_models_prompts_and_dataset_files(tmp_path, monkeypatch, capsys,
                                                                                  embedded_model_dir):
    """A cell its engine cannot run (transformers drafts at batch size 1 only) is written at once,
    without loading a model, and records its inputs all the same."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "tiny"
    tiny_llama(model, vocab_size=49152, tokenizer_of=embedded_model_dir)
    spec = ModelSpec(name="tiny", source="local", path=str(model))
    cell = Cell(experiment="x", dataset="q", target=spec, method="speculative",
                drafter=DrafterSpec(name="tiny", kind="model", model=spec), gamma=2, batch_size=2,
                generation=Generation(max_new_tokens=2), placement=Placement(strategy="cpu"), load=Load(),
                repeat=0, seed=1, engine="transformers")
    write_cell(cell, tmp_path / "cell.json")
    source = tmp_path / "questions.jsonl"
    source.write_text(json.dumps({"question_id": 1, "turns": ["Hi?"]}) + "\n")
    prompts = tmp_path / "prompts.jsonl"
    write_prompts(prompts, [{"id": "q/1", "dataset": "q", "category": "c", "system": None, "turns": ["Hi?"],
                             "prompt_tokens": 3}])
    out = tmp_path / "out"
    assert cli.main(["run", "--cell", str(tmp_path / "cell.json"), "--prompts", str(prompts), "--out-dir", str(out),
                     "--dataset-file", str(source)]) == 0, capsys.readouterr().err
    result = read_result(out / "result.json").to_dict()
    assert result["status"] == "not_supported"
    model_print = {"name": "tiny", "source": "local", "path": str(model), "sha256": folder_sha256(model)}
    assert result["metadata"]["inputs"] == {
        "models": {"target": model_print, "drafter": model_print},
        "prompts": {"path": str(prompts), "sha256": hashlib.sha256(prompts.read_bytes()).hexdigest()},
        "dataset_files": [{"path": str(source), "sha256": hashlib.sha256(source.read_bytes()).hexdigest()}],
    }
