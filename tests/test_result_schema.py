import copy
import json

import pytest

from specdec.job.acceptance import acceptance
from specdec.gate.cells import Cell, DrafterSpec, Generation, Load, ModelSpec, Placement
from specdec.job.leviathan import draft_length_shares, theory
from specdec.metadata import collect_metadata
from specdec.job.metrics import summarize
from specdec.records import (
    POWER_FIELDS,
    POWER_KEYS,
    RESULT_SCHEMA_VERSION,
    RecordError,
    read_interrupted,
    read_power_samples,
    read_result,
    result_from_dict,
    validate,
    write_interrupted,
    write_power_samples,
    write_result,
)
from specdec.result import Status

CELL = Cell(
    experiment="default",
    dataset="humaneval",
    target=ModelSpec(name="smollm2", source="embedded"),
    method="speculative",
    drafter=DrafterSpec(name="int8", kind="quantized", dtype="int8"),
    gamma=2,
    batch_size=1,
    generation=Generation(max_new_tokens=64),
    placement=Placement(strategy="cpu"),
    load=Load(),
    repeat=0,
    seed=1234,
)


def request(rid, emissions, warmup=False):
    return {"request_id": rid, "warmup": warmup, "prompt_tokens": 12,
            "output_tokens": sum(n for _, n in emissions), "arrival_s": 0.0, "start_s": 0.0,
            "first_token_s": emissions[0][0], "finish_s": emissions[-1][0],
            "emissions": emissions, "drafted_tokens": 4, "accepted_tokens": 2,
            "target_forwards": 3, "drafted_per_position": [2, 2],
            "accepted_per_position": [1, 1]}


@pytest.fixture(scope="module")
def valid():
    records = [request("a#1", [[0.1, 1], [0.2, 3], [0.3, 1]]), request("b#1", [[0.2, 1]]),
               request("warmup:a#1", [[-0.5, 2]], warmup=True)]
    block = acceptance(records, gamma=2)
    shares = draft_length_shares(block["per_position"], steps=block["target_forwards"])
    return {
        "schema_version": RESULT_SCHEMA_VERSION,
        "cell_id": CELL.id,
        "group_id": CELL.group_id,
        "status": "ok",
        "config": CELL.to_dict(),
        "engine": {"name": "specdec", "version": "0.1.0", "settings": {}},
        "metrics": summarize(records),
        "acceptance": block,
        "theory": theory(block["acceptance_rate"], 2, shares),
        "energy": {"available": False, "reason": "NVML: library not found"},
        "attribution": {"available": True, "clock": "host clock", "decode_s": 2.0, "decode_calls": 2,
                        "parts_s": {"prefill": 0.2, "drafter": 0.4, "verify": 1.0, "accept": 0.1, "other": 0.3},
                        "not_separable": {},
                        "forwards": {"target_prefill": {"count": 2, "total_s": 0.2, "rows": 2},
                                     "target_decode": {"3": {"count": 4, "total_s": 1.0, "rows": 4}},
                                     "drafter_prefill": {"count": 2, "total_s": 0.1, "rows": 2},
                                     "drafter": {"1": {"count": 6, "total_s": 0.3, "rows": 6}}},
                        "steps": 4},
        "correctness": {"checked": True, "reference": CELL.ar_counterpart().id,
                        "identical": True, "requests_compared": 2, "divergences": []},
        "parity": {"checked": False, "reason": "our engine is the reference"},
        "failure": None,
        "metadata": collect_metadata(1234, "2026-01-02T03:04:05+00:00"),
    }


def test_the_typed_result_reads_what_the_job_wrote_and_writes_it_back_key_for_key(valid, tmp_path):
    valid = valid | {"memory": {"weights_mb": 641.4, "kv_cache_mb": 3.4, "device": "cpu", "peak_mb": 1080.2,
                                "peak_over_needed": 1.68, "baseline_rss_mb": 244.4, "growth_over_needed": 1.3}}
    result = result_from_dict(valid, "result")
    assert result.status is Status.OK and result.ok and result.config == CELL
    assert result.metrics.ttft_s.count == 2 and result.acceptance.per_position[0].drafted == 4
    assert result.attribution.forward("target_decode", 3).mean_s == 0.25 and result.attribution.forward("drafter", 2) is None
    assert result.theory.longest_draft == 2 and not result.energy.available and result.correctness.identical
    assert result.memory.growth_over_needed == 1.3 and result.cotenants is None and result.reference is None
    write_result(tmp_path / "result.json", result)
    assert json.loads((tmp_path / "result.json").read_text()) == valid
    assert read_result(tmp_path / "result.json") == result


def test_a_typed_result_that_breaks_the_schema_is_not_written(valid, tmp_path):
    result = result_from_dict(valid, "result")
    with pytest.raises(RecordError, match=r"\$\.status"):
        write_result(tmp_path / "result.json", result.__class__(**{**vars(result), "status": Status.INTERRUPTED}))
    assert not (tmp_path / "result.json").exists()


def test_interrupted_record_round_trips_and_is_validated(tmp_path):
    write_interrupted(tmp_path, CELL.id, signal="SIGTERM", phase="measure", at="2026-01-02T03:04:05+00:00")
    assert read_interrupted(tmp_path / "interrupted.json") == {
        "cell_id": CELL.id, "status": "interrupted", "signal": "SIGTERM", "phase": "measure", "at": "2026-01-02T03:04:05+00:00"}
    with pytest.raises(RecordError, match=r"interrupted\.json: \$\.phase"):
        write_interrupted(tmp_path / "other", CELL.id, signal="SIGTERM", phase="", at="2026-01-02T03:04:05+00:00")
    (tmp_path / "interrupted.json").write_text('{"cell_id": "x", "status": "ok"}')
    with pytest.raises(RecordError, match="interrupted.json"):
        read_interrupted(tmp_path / "interrupted.json")


def test_power_samples_round_trip_and_a_bad_value_names_its_line(tmp_path):
    path = tmp_path / "power.csv"
    empty = (None,) * len(POWER_FIELDS)
    write_power_samples(path, [("-1.000000", "idle", "cuda:0", 60.0, *empty), ("0.000000", "window", "cuda:0", None, *empty)])
    assert path.read_text().splitlines()[0] == ",".join((*POWER_KEYS, *POWER_FIELDS))
    assert read_power_samples(path) == [{"t_s": -1.0, "phase": "idle", "device": "cuda:0", "power_w": 60.0},
                                        {"t_s": 0.0, "phase": "window", "device": "cuda:0", "power_w": None}]
    path.write_text("t_s,phase,device,power_w\n0.5,window,cuda:0,12\nlater,window,cuda:0,13\n")
    with pytest.raises(RecordError, match=r"power\.csv:3: t_s is not a number: 'later'"):
        read_power_samples(path)
    with pytest.raises(RecordError, match="4 values for 10 columns"):
        write_power_samples(path, [("0", "window", "cuda:0", 1.0)])


def broken(valid, change):
    result = copy.deepcopy(valid)
    change(result)
    return result


def test_valid_result_passes(valid):
    json.dumps(valid, allow_nan=False)
    validate("result", valid, "result.json")


def test_wrong_type_names_the_path(valid):
    result = broken(valid, lambda r: r["metrics"]["ttft_s"].update(p50="fast"))
    with pytest.raises(RecordError, match=r"\$\.metrics\.ttft_s\.p50"):
        validate("result", result, "result.json")


def test_an_attribution_part_is_a_number_or_null_never_missing(valid):
    validate("result", broken(valid, lambda r: r["attribution"]["parts_s"].update(accept=None)), "result.json")
    result = broken(valid, lambda r: r["attribution"]["parts_s"].pop("other"))
    with pytest.raises(RecordError, match=r"\$\.attribution\.parts_s: 'other' is a required property"):
        validate("result", result, "result.json")


def test_missing_key_names_the_path(valid):
    result = broken(valid, lambda r: r["metrics"].pop("e2e_s"))
    with pytest.raises(RecordError, match=r"\$\.metrics: 'e2e_s' is a required property"):
        validate("result", result, "result.json")


def test_unknown_metric_is_rejected(valid):
    result = broken(valid, lambda r: r["acceptance"]["per_position"][0].update(ratio=1))
    with pytest.raises(RecordError, match=r"\$\.acceptance\.per_position\[0\]"):
        validate("result", result, "result.json")


def test_failed_result_with_null_metrics_passes(valid):
    def fail(r):
        r.update(status="failed", metrics=None, acceptance=None, theory=None, correctness=None,
                 failure={"type": "OutOfMemoryError", "message": "CUDA out of memory",
                          "phase": "decode", "memory_mb": 80000})

    validate("result", broken(valid, fail), "result.json")


def test_not_supported_result_passes(valid):
    def unsupported(r):
        r.update(status="not_supported", metrics=None, acceptance=None, theory=None, correctness=None,
                 failure={"type": "NotSupported", "message": "batch size 1 only", "phase": "measure"})

    validate("result", broken(valid, unsupported), "result.json")
    with pytest.raises(RecordError, match=r"\$\.status"):
        validate("result", broken(valid, lambda r: r.update(status="interrupted")), "result.json")


def test_failed_status_needs_a_failure(valid):
    result = broken(valid, lambda r: r.update(status="failed", metrics=None))
    with pytest.raises(RecordError, match=r"\$\.failure"):
        validate("result", result, "result.json")


def test_ok_status_needs_metrics(valid):
    with pytest.raises(RecordError, match=r"\$\.metrics"):
        validate("result", broken(valid, lambda r: r.update(metrics=None)), "result.json")


def test_energy_branches(valid):
    measured = {"available": True, "method": "nvml_energy_counter", "energy_j": 12.5}
    validate("result", broken(valid, lambda r: r.update(energy=measured)), "result.json")
    with pytest.raises(RecordError, match=r"\$\.energy: 'method' is a required"):
        validate("result", broken(valid, lambda r: r.update(energy={"available": True})), "result.json")
    with pytest.raises(RecordError, match=r"\$\.energy: 'reason' is a required"):
        validate("result", broken(valid, lambda r: r.update(energy={"available": False})), "result.json")


def test_bad_metadata_commit_is_rejected(valid):
    result = broken(valid, lambda r: r["metadata"].update(git_commit="not-a-sha"))
    with pytest.raises(RecordError, match=r"\$\.metadata\.git_commit"):
        validate("result", result, "result.json")
