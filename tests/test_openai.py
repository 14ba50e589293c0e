"""The `openai` engine against a small fake OpenAI-compatible server on loopback: streamed
chunks become emissions, tokens are counted by the server's ids or our tokenizer, the
server's spec-decode counters are differenced over the window, and every kind of failed
request is counted with its reason while the cell finishes."""

import json
import sys
import threading
import time

import pytest
from conftest import REPO, cell_inputs
from fake_openai import TOKENS, FakeServer

from specdec.job import runner
from specdec.gate.config import ConfigError, expand_matrix, validate
from specdec.engines.openai import OpenAIEngine, RequestFailed, _Stream, chunk_drafts, scrape_counters
from specdec.job.load import Request

@pytest.fixture
def fake():
    """fake(modes) -> a running FakeServer on a free loopback port, shut down after the test."""
    servers = []

    def start(modes=("ok",)):
        server = FakeServer(modes)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def openai_config(openai: dict, method: dict | None = None, **experiment) -> dict:
    return validate({
        "seed": 1, "models": {"smollm2": {"source": "embedded"}},
        "drafters": {"ngram": {"kind": "ngram", "n": 3}, "int8": {"kind": "quantized", "dtype": "int8"}},
        "datasets": {"sample": {"source": "sample", "num_prompts": 3, "turns": "first"}},
        "experiments": {"srv": {"target": "smollm2", "datasets": ["sample"], "engine": "openai",
                                "methods": [method or {"method": "ar"}], "max_new_tokens": TOKENS, "warmup": 1,
                                "batch_size": 2} | experiment},
        "power": {"enabled": False},
        "openai": openai,
    })


def run(tmp_path, embedded_model_dir, config):
    (cell,) = expand_matrix(config)
    models_dir, prompts = cell_inputs(tmp_path, embedded_model_dir, config["datasets"]["sample"], seed=1)
    return runner.run_cell(cell, prompts, tmp_path / "out", models_dir=models_dir)


def test_a_cell_streams_from_the_server_with_its_token_ids(tmp_path, embedded_model_dir, fake, monkeypatch):
    server = fake()
    monkeypatch.setenv("FAKE_KEY", "sk-secret")
    config = openai_config({"base_url": server.url, "model": "m", "api_key_env": "FAKE_KEY"})
    result = run(tmp_path, embedded_model_dir, config)
    assert result["status"] == "ok", result["failure"]
    assert result["served"]["failed_requests"] == 0 and result["served"]["token_count"] == "server token ids"
    assert "outside this process" in result["attribution"]["reason"]
    assert result["metrics"]["num_requests"] == 3
    records = [json.loads(line) for line in (tmp_path / "out" / "requests.jsonl").read_text().splitlines()]
    assert all(r["output_tokens"] == TOKENS and len(r["emissions"]) == TOKENS for r in records)
    assert records[-1]["output_ids"] == [100, 101, 102, 103, 104]
    # the prompt is the target's chat template as token ids; the key goes in the header only
    assert all(isinstance(b["prompt"], list) and b["authorization"] == "Bearer sk-secret" for b in server.bodies)
    written = (tmp_path / "out" / "result.json").read_text() + (tmp_path / "out" / "requests.jsonl").read_text()
    assert "sk-secret" not in written and "FAKE_KEY" in written


def test_without_token_ids_the_tokenizer_counts_and_the_result_says_so(tmp_path, embedded_model_dir, fake):
    server = fake(["no-ids"])
    result = run(tmp_path, embedded_model_dir, openai_config({"base_url": server.url, "model": "m", "api": "chat"}))
    assert result["status"] == "ok", result["failure"]
    assert result["served"]["token_count"] == "tokenizer"
    assert all("messages" in b for b in server.bodies)
    records = [json.loads(line) for line in (tmp_path / "out" / "requests.jsonl").read_text().splitlines()]
    assert all(r["output_tokens"] >= TOKENS for r in records)  # " w0 w1 ..." is at least a token a word


def test_the_servers_counters_are_differenced_over_the_window(tmp_path, embedded_model_dir, fake):
    server = fake()
    config = openai_config({"base_url": server.url, "model": "m"}, {"method": "ngram", "drafter": "ngram", "gamma": 2})
    result = run(tmp_path, embedded_model_dir, config)
    assert result["status"] == "ok", result["failure"]
    # three measured requests; the warm-up's drafts are before the window
    assert result["served"]["server_counters"] == {"num_drafts": 9, "num_draft_tokens": 18, "num_accepted_tokens": 12,
                                                   "num_accepted_tokens_per_pos": [9, 3]}
    # the acceptance block in every engine's typed form, from the counters (the rows carry no drafts)
    block = result["acceptance"]
    assert block["engine_counters"] == result["served"]["server_counters"]
    assert (block["drafted_tokens"], block["accepted_tokens"], block["num_drafts"]) == (18, 12, 9)
    assert block["acceptance_rate"] == pytest.approx(12 / 18) and block["mean_acceptance_length"] == pytest.approx(1 + 12 / 9)
    assert [(p["drafted"], p["accepted"]) for p in block["per_position"]] == [(9, 9), (9, 3)]
    assert block["accepted_per_step"] == [0, 6, 3] and block["target_forwards"] == 3 * TOKENS  # a chunk a step


@pytest.mark.parametrize("mode", ["llama.cpp", "ok"])
def test_without_counters_acceptance_is_the_chunks_counts_else_none_with_the_reason(tmp_path, embedded_model_dir, fake, mode):
    server = fake([mode])
    config = openai_config({"base_url": server.url, "model": "m", "metrics": False}, {"method": "ngram", "drafter": "ngram", "gamma": 2})
    result = run(tmp_path, embedded_model_dir, config)
    assert result["status"] == "ok", result["failure"]
    assert result["served"]["server_counters"] == {"available": False, "reason": "openai.metrics is false: the server's /metrics were not read"}
    if mode == "ok":  # neither counters nor per-request fields: n/a, never zero
        assert result["acceptance"] is None
        return
    records = [json.loads(line) for line in (tmp_path / "out" / "requests.jsonl").read_text().splitlines()]
    assert all(r["drafted_tokens"] == 8 and r["accepted_tokens"] == 3 for r in records)  # llama.cpp's per-request fields
    assert result["acceptance"]["drafted_tokens"] == 24 and result["acceptance"]["acceptance_rate"] == pytest.approx(3 / 8)
    assert "engine_counters" not in result["acceptance"]


def test_failed_requests_are_counted_with_their_reasons_and_the_cell_finishes(tmp_path, embedded_model_dir, fake):
    server = fake(["ok", "http500", "ok", "cut"])  # warm-up ok, then 500, ok, cut
    result = run(tmp_path, embedded_model_dir, openai_config({"base_url": server.url, "model": "m"}))
    assert result["status"] == "ok", result["failure"]
    served = result["served"]
    assert served["failed_requests"] == 2 and served["succeeded_requests"] == 1
    reasons = sorted(f["reason"] for f in served["failures"])
    assert reasons[0].startswith("HTTP 500: engine died") and reasons[1].startswith("stream cut after 2 chunks")
    assert result["metrics"]["num_requests"] == 1
    assert "2 requests failed" in runner._ending(result, 1.0)


def test_a_server_that_is_down_fails_the_cell_with_the_reason(tmp_path, embedded_model_dir, fake):
    server = fake()
    url = server.url
    server.shutdown()
    server.server_close()  # nothing listens on the port now: connections are refused
    result = run(tmp_path, embedded_model_dir, openai_config({"base_url": url, "model": "m", "connect_timeout_s": 1}))
    assert result["status"] == "failed" and result["failure"]["phase"] == "measure"
    assert "all 3 measured requests failed; the first: connection failed" in result["failure"]["message"]


def stream_one(server_url: str, tmp_path, embedded_model_dir, **openai) -> str | None:
    """One request through the engine's stream; the failure's reason, or None."""
    config = openai_config({"base_url": server_url, "model": "m"} | openai)
    (cell,) = expand_matrix(config)
    models_dir, _ = cell_inputs(tmp_path, embedded_model_dir, config["datasets"]["sample"], seed=1)
    engine = OpenAIEngine.open(cell, models_dir)
    request = Request({"id": "p", "category": "c", "system": None, "turns": ["hi"]})
    body, _ = engine.request_body(request)
    state = _Stream(request, 0, 0, 0)
    try:
        engine.stream(body, state, time.perf_counter_ns)
    except RequestFailed as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("mode, openai, reason", [
    ("http400", {}, "HTTP 400: bad request"),
    ("malformed", {}, "malformed chunk b'{not json'"),
    ("slow-first", {"first_token_timeout_s": 0.3}, "no response in 0.3 s (first_token_timeout_s)"),
    ("stall", {"first_token_timeout_s": 0.3}, "timed out waiting for the next chunk"),
    ("stall", {"first_token_timeout_s": 5, "request_timeout_s": 0.5}, "not done in 0.5 s (request_timeout_s)"),
])
def test_each_fault_fails_its_request_with_its_reason_within_its_timeout(tmp_path, embedded_model_dir, fake, mode, openai, reason):
    server = fake([mode])
    assert stream_one(server.url, tmp_path, embedded_model_dir, **openai).startswith(reason)


def test_a_refused_connection_fails_its_request(tmp_path, embedded_model_dir, fake):
    server = fake()
    url = server.url
    server.shutdown()
    server.server_close()
    assert stream_one(url, tmp_path, embedded_model_dir, connect_timeout_s=1).startswith("connection failed")


def test_the_gate_needs_the_servers_address_and_a_set_key(tmp_path, embedded_model_dir, monkeypatch):
    with pytest.raises(ConfigError, match="config key 'openai.base_url'"):
        expand_matrix(openai_config({"model": "m"}))
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    (cell,) = expand_matrix(openai_config({"base_url": "http://127.0.0.1:9", "model": "m", "api_key_env": "NO_SUCH_KEY"}))
    with pytest.raises(ValueError, match="environment variable NO_SUCH_KEY is not set"):
        OpenAIEngine.open(cell, tmp_path)


def test_prometheus_counters_and_per_request_fields_are_read():
    text = ("# HELP vllm:spec_decode_num_drafts_total drafts\n"
            'vllm:spec_decode_num_drafts_total{engine="0"} 2.0\nvllm:spec_decode_num_drafts_total{engine="1"} 3.0\n'
            'vllm:spec_decode_num_accepted_tokens_per_pos_total{position="1"} 4.0\nother_metric 7\n')
    assert scrape_counters(text) == {"num_drafts": 5, "num_draft_tokens": 0, "num_accepted_tokens": 0,
                                     "num_accepted_tokens_per_pos": [0, 4]}
    assert scrape_counters("process_cpu_seconds_total 3.0\n") is None
    assert chunk_drafts({"timings": {"draft_n": 4, "draft_n_accepted": 2}}) == {"drafted_tokens": 4, "accepted_tokens": 2}
    assert chunk_drafts({"meta_info": {"spec_verify_ct": 7}}) == {"target_forwards": 7}
    assert chunk_drafts({"choices": []}) == {}


def fake_python(tmp_path, monkeypatch, body: str):
    """A stand-in for vLLM's Python, in the environment SPECDEC_VLLM_VENV names: a script that
    gets the server's command line."""
    script = tmp_path / "vllm-venv" / "bin" / "python"
    script.parent.mkdir(parents=True)
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    monkeypatch.setenv("SPECDEC_VLLM_VENV", str(tmp_path / "vllm-venv"))
    return str(script)


def test_serve_starts_a_server_on_loopback_runs_the_cell_and_stops_it(tmp_path, monkeypatch, embedded_model_dir):
    fake = REPO / "tests" / "fake_openai.py"
    python = fake_python(tmp_path, monkeypatch, f'echo "$@" > {tmp_path}/argv; exec {sys.executable} {fake} "$@"')
    config = openai_config({"serve": {}}, {"method": "ngram", "drafter": "ngram", "gamma": 2})
    result = run(tmp_path, embedded_model_dir, config)
    assert result["status"] == "ok", result["failure"]
    assert result["served"]["server_counters"]["num_drafts"] == 9
    argv = (tmp_path / "argv").read_text()
    assert "-m vllm.entrypoints.openai.api_server --served-model-name target" in argv
    assert '--speculative-config {"method": "ngram", "num_speculative_tokens": 2' in argv
    assert "--no-enable-prefix-caching" in argv and "--host 127.0.0.1 --port" in argv
    assert "--tensor-parallel-size" not in argv and "--enforce-eager" in argv  # on the CPU
    assert result["engine"]["settings"]["command"][0] == python
    # the server's own log beside the cell's result, named in it
    assert result["engine"]["settings"]["server_log"] == "server.log"
    assert (tmp_path / "out" / "server.log").read_text().startswith("fake server: starting\n")


def test_a_server_that_fails_to_start_fails_the_cell_with_its_last_lines(tmp_path, monkeypatch, embedded_model_dir):
    fake_python(tmp_path, monkeypatch, 'echo "loading the model"; echo "RuntimeError: not enough memory for the KV cache"; exit 3')
    result = run(tmp_path, embedded_model_dir, openai_config({"serve": {"startup_timeout_s": 60}}))
    assert result["status"] == "failed" and result["failure"]["phase"] == "start"
    assert "the server exited with 3 before it was healthy" in result["failure"]["message"]
    assert "not enough memory for the KV cache" in result["failure"]["message"]
    assert str(tmp_path / "out" / "server.log") in result["failure"]["message"]
    assert result["engine"]["settings"]["server_log"] == "server.log"
    written = json.loads((tmp_path / "out" / "result.json").read_text())
    assert written["status"] == "failed" and written["engine"]["settings"]["server_log"] == "server.log"
    assert (tmp_path / "out" / "server.log").read_text() == "loading the model\nRuntimeError: not enough memory for the KV cache\n"


@pytest.mark.parametrize("args, gpus", [
    ([], 0), (["--tensor-parallel-size", "1"], 1), (["-tp", "4", "--max-num-seqs", "8"], 4),
    (["--tensor_parallel_size=2", "--pipeline-parallel-size", "2"], 4), (["-tp=2", "-pp=2", "-dp", "2"], 8),
])
def test_a_started_servers_gpus_are_its_parallel_sizes(args, gpus):
    """The job leases (and on SLURM asks for) the GPUs the served model spans; a server
    elsewhere needs none here."""
    (cell,) = expand_matrix(openai_config({"serve": {"args": args}}))
    assert cell.endpoint.serve_gpus == gpus and OpenAIEngine.gpus_required(cell) == gpus
    (elsewhere,) = expand_matrix(openai_config({"base_url": "http://10.0.0.5:8000", "model": "m"}))
    assert OpenAIEngine.gpus_required(elsewhere) == 0


def test_a_parallel_size_that_is_not_a_count_is_refused_at_the_gate():
    with pytest.raises(ConfigError, match=r"config key 'openai.serve.args': --tensor-parallel-size takes a whole number of at least 1, got 'x'"):
        expand_matrix(openai_config({"serve": {"args": ["-tp", "x"]}}))


def test_on_gpus_the_server_gets_the_vllm_gpu_arguments(tmp_path, embedded_model_dir, monkeypatch):
    """A served model on GPUs: no CPU-only flags; its tensor parallel size is serve.args' own."""
    fake_python(tmp_path, monkeypatch, "exit 0")
    (cell,) = expand_matrix(openai_config({"serve": {"args": ["--tensor-parallel-size", "2"]}}))
    models_dir, _ = cell_inputs(tmp_path, embedded_model_dir, openai_config({})["datasets"]["sample"], seed=1)
    command = OpenAIEngine.open(cell, models_dir).launch
    assert "--enforce-eager" not in command and command.count("--tensor-parallel-size") == 1
    assert command[-2:] == ["--tensor-parallel-size", "2"]


def test_its_gaps_and_its_cells_json_form():
    """A quantised copy of the target cannot be the server's drafter; the endpoint travels in
    the cell's JSON form (the key's variable name only) and other engines' cells have none."""
    from specdec.gate.cells import Cell
    from specdec.engines import unsupported

    config = openai_config({"base_url": "http://127.0.0.1:9", "model": "m", "api_key_env": "K"},
                           {"method": "speculative", "drafter": "int8", "gamma": 2})
    (cell,) = expand_matrix(config)
    assert "the server loads its own drafter" in unsupported(cell)
    data = cell.to_dict()
    assert data["endpoint"]["api_key_env"] == "K" and Cell.from_dict(data) == cell
    config["experiments"]["srv"]["engine"] = "specdec"
    (ours,) = expand_matrix(validate(config))
    assert "endpoint" not in ours.to_dict() and Cell.from_dict(ours.to_dict()) == ours


VLLM_VENV = REPO / ".venv-vllm"


def test_a_real_vllm_server_the_job_starts_decodes_as_our_engine_and_counts_its_drafts(tmp_path, embedded_model_dir, monkeypatch):
    """One real round trip, about a minute (vLLM's engine start): `serve` starts vLLM's OpenAI
    server of the embedded model from vLLM's environment with an n-gram speculative config,
    on code edits (answers that copy their input, so the n-gram drafts). Its greedy outputs
    through the endpoint equal our engine's AR outputs token for token (the parity check), and
    its spec-decode counters, read from /metrics, are the typed acceptance block."""
    assert (VLLM_VENV / "bin" / "python").is_file(), f"{VLLM_VENV} is missing: run `make install-vllm` (make test does)"
    monkeypatch.setenv("SPECDEC_VLLM_VENV", str(VLLM_VENV))
    config = validate({
        "seed": 1, "models": {"smollm2": {"source": "embedded"}},
        "drafters": {"ngram": {"kind": "ngram", "n": 3, "min_context": 1}},
        "datasets": {"edit": {"source": "humaneval_edit", "num_prompts": 2, "max_prompt_tokens": 384}},
        "experiments": {"real": {"target": "smollm2", "datasets": ["edit"], "engine": ["specdec", "openai"],
                                 "methods": [{"method": "ar", "engine": "specdec"},
                                             {"method": "ngram", "drafter": "ngram", "gamma": 3, "engine": "openai"}],
                                 "max_new_tokens": 16, "warmup": 1, "placement": "cpu"}},
        "power": {"enabled": False}, "openai": {"serve": {"startup_timeout_s": 300}},
    })
    ours, served = sorted(expand_matrix(config), key=lambda cell: cell.engine != "specdec")
    models_dir, prompts = cell_inputs(tmp_path, embedded_model_dir, config["datasets"]["edit"], seed=1)
    assert runner.run_cell(ours, prompts, tmp_path / "ar", models_dir=models_dir)["status"] == "ok"
    result = runner.run_cell(served, prompts, tmp_path / "served", models_dir=models_dir,
                             parity_reference=tmp_path / "ar" / "requests.jsonl")
    assert result["status"] == "ok", (result["failure"], (tmp_path / "served" / "server.log").read_text()[-3000:])
    assert result["parity"]["identical"] and result["parity"]["requests_compared"] == 2, result["parity"]
    assert result["served"]["token_count"] == "server token ids" and result["served"]["failed_requests"] == 0
    block = result["acceptance"]
    counters = block["engine_counters"]
    assert counters["num_drafts"] > 0 and counters["num_draft_tokens"] >= counters["num_drafts"]
    assert block["drafted_tokens"] == counters["num_draft_tokens"] and block["accepted_tokens"] == counters["num_accepted_tokens"]
    assert block["mean_acceptance_length"] == 1 + counters["num_accepted_tokens"] / counters["num_drafts"]
    assert "Starting vLLM server on http://127.0.0.1:" in (tmp_path / "served" / "server.log").read_text()
