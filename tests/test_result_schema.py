import copy
import json

import pytest

from specdec.metadata import collect_metadata
from specdec.metrics import acceptance, summarize, theory
from specdec.schema import ResultSchemaError, validate_result


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
    return {
        "schema_version": 1,
        "cell_id": "default/humaneval--spec-int8-g2--b1-n64-t0-cpu--r0",
        "status": "ok",
        "config": {"method": "speculative", "gamma": 2},
        "metrics": summarize(records),
        "acceptance": block,
        "theory": theory(block["acceptance_rate"], 2, 0.3, 1.3),
        "energy": {"available": False, "reason": "NVML: library not found"},
        "correctness": {"checked": True, "reference": "default/humaneval--ar--b1-n64-t0-cpu--r0",
                        "identical": True, "requests_compared": 2, "divergences": []},
        "failure": None,
        "metadata": collect_metadata(1234, "2026-01-02T03:04:05+00:00"),
    }


def broken(valid, change):
    result = copy.deepcopy(valid)
    change(result)
    return result


def test_valid_result_passes(valid):
    json.dumps(valid, allow_nan=False)
    validate_result(valid)


def test_wrong_type_names_the_path(valid):
    result = broken(valid, lambda r: r["metrics"]["ttft_s"].update(p50="fast"))
    with pytest.raises(ResultSchemaError, match=r"\$\.metrics\.ttft_s\.p50"):
        validate_result(result)


def test_missing_key_names_the_path(valid):
    result = broken(valid, lambda r: r["metrics"].pop("e2e_s"))
    with pytest.raises(ResultSchemaError, match=r"\$\.metrics: 'e2e_s' is a required property"):
        validate_result(result)


def test_unknown_metric_is_rejected(valid):
    result = broken(valid, lambda r: r["acceptance"]["per_position"][0].update(ratio=1))
    with pytest.raises(ResultSchemaError, match=r"\$\.acceptance\.per_position\[0\]"):
        validate_result(result, source="result.json")


def test_failed_result_with_null_metrics_passes(valid):
    def fail(r):
        r.update(status="failed", metrics=None, acceptance=None, theory=None, correctness=None,
                 failure={"type": "OutOfMemoryError", "message": "CUDA out of memory",
                          "phase": "decode", "memory_mb": 80000})

    validate_result(broken(valid, fail))


def test_failed_status_needs_a_failure(valid):
    result = broken(valid, lambda r: r.update(status="failed", metrics=None))
    with pytest.raises(ResultSchemaError, match=r"\$\.failure"):
        validate_result(result)


def test_ok_status_needs_metrics(valid):
    with pytest.raises(ResultSchemaError, match=r"\$\.metrics"):
        validate_result(broken(valid, lambda r: r.update(metrics=None)))


def test_energy_branches(valid):
    measured = {"available": True, "method": "nvml_energy_counter", "energy_j": 12.5}
    validate_result(broken(valid, lambda r: r.update(energy=measured)))
    with pytest.raises(ResultSchemaError, match=r"\$\.energy: 'method' is a required"):
        validate_result(broken(valid, lambda r: r.update(energy={"available": True})))
    with pytest.raises(ResultSchemaError, match=r"\$\.energy: 'reason' is a required"):
        validate_result(broken(valid, lambda r: r.update(energy={"available": False})))


def test_bad_metadata_commit_is_rejected(valid):
    result = broken(valid, lambda r: r["metadata"].update(git_commit="not-a-sha"))
    with pytest.raises(ResultSchemaError, match=r"\$\.metadata\.git_commit"):
        validate_result(result)
