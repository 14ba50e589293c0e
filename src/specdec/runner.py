"""Run one benchmark cell: lease GPUs, place and load the models, decode the prompts under the
configured load beside the power monitor, check greedy outputs against the AR cell, and write
`result.json` and `requests.jsonl` atomically.

Bad input (settings, prompts, models, placement) raises before anything is written, so the
job exits non-zero with a message naming the problem. A cell that fails later (an exception,
out of memory, its `timeout_s`) writes a result with status `failed` and the phase it was in,
so the rest of the matrix goes on. SIGTERM/SIGINT (a SLURM time limit) ends the cell without
its outputs, so that Snakemake reruns it, and leaves `interrupted.json` saying where it stopped.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from specdec import metrics, models, placement
from specdec.config import METHODS_WITH_GAMMA, ConfigError
from specdec.io import read_jsonl, write_json, write_jsonl

log = logging.getLogger("specdec.run")

SCHEMA_VERSION = 1
METHODS = ("ar", *sorted(METHODS_WITH_GAMMA))
PEER_METHODS = ("hf_assisted", "hf_prompt_lookup")  # transformers' generate()
OUTPUTS = ("result.json", "requests.jsonl")


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` (ours or a library's) records it as a failure."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class CellTimeout(Exception):
    """The cell ran past its configured `timeout_s`."""


class ContextTooLong(ValueError):
    """A conversation and its new tokens do not fit a model's context window."""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def generation_settings(cell: dict, eos_token_ids=(), pad_token_id: int = 0):
    from specdec.decoding import GenerationSettings

    return GenerationSettings(
        max_new_tokens=cell["max_new_tokens"],
        temperature=cell["temperature"],
        top_k=cell["top_k"],
        top_p=cell["top_p"],
        gamma=cell["gamma"] if cell["method"] in METHODS_WITH_GAMMA else 1,
        eos_token_ids=tuple(eos_token_ids),
        pad_token_id=pad_token_id,
    )


@dataclass
class Session:
    """Everything a cell decodes with, loaded once."""

    cell: dict
    target: object
    tokenizer: object
    drafter: object | None  # a decoding Drafter, or the assistant model of hf_assisted
    drafter_model: object | None
    plan: placement.Placement
    settings: object
    rss_before_weights: int | None = None  # bytes: interpreter, libraries and tokenizer
    prompt_ids: dict = field(default_factory=dict)  # request id -> unpadded prompt token ids

    @property
    def device(self) -> str:
        return self.plan.target.input_device


def _drafter_model_source(cell: dict) -> tuple[str, dict, str] | None:
    """(model name, model spec, dtype) of a drafter that is a model of its own, else None."""
    spec = cell["drafters"].get(cell["drafter"]) if cell["drafter"] else None
    if spec is None or spec["kind"] == "ngram":
        return None
    if spec["kind"] == "model":
        return spec["model"], cell["models"][spec["model"]], cell["models"][spec["model"]]["dtype"]
    dtype = {"bf16": "bfloat16", "int8": "float32"}[spec["dtype"]]  # int8 is quantised after loading
    return cell["target"], cell["models"][cell["target"]], dtype


def load_session(cell: dict, models_dir: Path) -> Session:
    """Place and load the target and the drafter named by the cell."""
    from specdec.decoding import ModelDrafter, NgramDrafter, check_same_vocabulary
    from specdec.decoding.kernels import tuned_linears

    target_name, target_spec = cell["target"], cell["models"][cell["target"]]
    source = _drafter_model_source(cell)
    int8 = cell["drafter"] and cell["drafters"][cell["drafter"]].get("dtype") == "int8"
    strategy = cell["placement"]["strategy"]
    if int8 and strategy != "cpu":
        raise placement.PlacementError(f"drafter {cell['drafter']!r}: int8 dynamic quantisation runs on the CPU only, not with placement {strategy!r}; use a bf16 drafter on GPUs")

    def info(name: str, spec: dict, dtype: str) -> placement.ModelInfo:
        location, load_kwargs = models.model_location(name, spec, models_dir)
        return placement.model_info(location, dtype, name, **load_kwargs)

    plan = placement.plan_placement(
        strategy,
        placement.resolve_local_gpus(),
        info(target_name, target_spec, target_spec["dtype"]),
        info(*source) if source else None,
        cell["placement"],
    )
    baseline = {}
    target, tokenizer = models.load_model(target_name, target_spec, models_dir, **plan.target.load_kwargs(),
                                          before_weights=lambda: baseline.setdefault("rss", _rss_bytes()))
    drafter_model = None
    if int8:
        drafter_model = models.quantized_copy(target, "int8")
    elif source:
        name, spec, dtype = source
        drafter_model, drafter_tokenizer = models.load_model(name, spec, models_dir, dtype=dtype, **plan.drafter.load_kwargs())
        check_same_vocabulary(target, drafter_model, tokenizer, drafter_tokenizer)
    # The engine's CPU kernel choice times a dozen forwards: made here, never inside a measured request.
    tuned = len(tuned_linears(target)) + len(tuned_linears(drafter_model))
    log.info("CPU linear layers computed as W @ x.T (decoding kernels): %d", tuned)
    settings = generation_settings(cell, _eos_ids(target, tokenizer), tokenizer.pad_token_id)
    if cell["method"] == "speculative":
        drafter = ModelDrafter(drafter_model)
    elif cell["method"] == "ngram":
        spec = cell["drafters"][cell["drafter"]]
        drafter = NgramDrafter(n=spec["n"], top_k=spec["top_k"], min_context=spec["min_context"])
    else:
        drafter = drafter_model
    return Session(cell, target, tokenizer, drafter, drafter_model, plan, settings, rss_before_weights=baseline.get("rss"))


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def chat_messages(request) -> list[dict]:
    """The chat context of one turn: earlier turns carry the model's own answers."""
    conversation = request.conversation
    messages = [{"role": "system", "content": conversation["system"]}] if conversation.get("system") else []
    for user, answer in zip(conversation["turns"], request.history):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer["output_text"]}]
    messages.append({"role": "user", "content": request.message})
    return messages


def check_context(session: Session, prompts: list[dict]) -> None:
    """Every conversation must fit the models' context: its templated turns plus
    max_new_tokens for each answer. Known before decoding, so it is bad input."""
    from specdec.load import Request

    limits = [getattr(m.config, "max_position_embeddings", None) for m in (session.target, session.drafter_model) if m is not None]
    limits = [limit for limit in limits if limit]
    if not limits:
        return
    limit, new_tokens = min(limits), session.cell["max_new_tokens"]
    for conversation in prompts:
        turns = len(conversation["turns"])
        # The last turn's context, its earlier answers left empty: they add at most new_tokens each.
        last = Request(conversation, turn=turns, history=({"output_text": ""},) * (turns - 1))
        prompt = len(session.tokenizer.apply_chat_template(chat_messages(last), add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        if prompt + turns * new_tokens > limit:
            raise ContextTooLong(
                f"request {last.request_id}: {prompt} prompt tokens + {turns} x max_new_tokens {new_tokens} = "
                f"{prompt + turns * new_tokens} tokens exceed the models' context of {limit} (max_position_embeddings)"
            )


def check_cell(cell: dict) -> None:
    """The method (which the config schema checks, but a cell may come as JSON) and the
    generation settings, before any model loads."""
    if cell["method"] not in METHODS:
        raise ConfigError(f"cell key 'method': unknown method {cell['method']!r} (expected one of {', '.join(METHODS)})")
    generation_settings(cell)


def make_engine(session: Session, generator: torch.Generator):
    """engine(batch of load.Request) -> row dicts: template and tokenise (outside the timed
    region, reported as `decode_start_ns`), decode with the cell's method, detokenise."""
    from specdec.decoding import generate
    from specdec.peers import hf_generate

    tokenizer, target, cell, settings = session.tokenizer, session.target, session.cell, session.settings

    def decode(input_ids, attention_mask):
        if cell["method"] == "hf_assisted":
            return hf_generate(target, input_ids, attention_mask, settings, assistant_model=session.drafter)
        if cell["method"] == "hf_prompt_lookup":
            return hf_generate(target, input_ids, attention_mask, settings, prompt_lookup_num_tokens=cell["gamma"])
        return generate(target, input_ids, attention_mask, settings, drafter=session.drafter, generator=generator)

    def engine(batch) -> list[dict]:
        began = time.perf_counter()
        encoded = tokenizer.apply_chat_template(
            [chat_messages(request) for request in batch],
            add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True,
        )
        input_ids, attention_mask = encoded["input_ids"].to(session.device), encoded["attention_mask"].to(session.device)
        for request, ids, mask in zip(batch, encoded["input_ids"].tolist(), encoded["attention_mask"].tolist()):
            session.prompt_ids[request.request_id] = [t for t, m in zip(ids, mask) if m]
        tokenize_s = (time.perf_counter() - began) / len(batch)
        decode_start_ns = time.perf_counter_ns()
        rows = []
        for request, row in zip(batch, decode(input_ids, attention_mask)):
            record = asdict(row)
            record.update(
                prompt_tokens=len(session.prompt_ids[request.request_id]),
                tokenize_s=tokenize_s,
                decode_start_ns=decode_start_ns,
                output_text=tokenizer.decode(row.output_ids, skip_special_tokens=True),
            )
            if cell["temperature"] > 0:
                del record["output_ids"]  # only greedy outputs are compared token for token
            rows.append(record)
        return rows

    return engine


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(session: Session, prompts: list[dict], out_dir: Path) -> tuple[list[dict], dict]:
    """Warm up, then decode every prompt under the cell's load inside one power window."""
    from specdec.load import progress, run_load, schedule, total_requests
    from specdec.power import PowerMonitor

    cell = session.cell
    torch.manual_seed(cell["seed"])
    generator = torch.Generator(device=session.device).manual_seed(cell["seed"])
    engine = make_engine(session, generator)

    def sync() -> None:
        _synchronize(session.device)

    monitor = PowerMonitor.for_job(cell["power"], torch.device(session.device).type, devices=list(session.plan.gpus) or None)
    total = total_requests(schedule(prompts, cell["load"], cell["seed"]))

    def begin_window() -> None:
        log.info("warm-up done; measuring %d requests", total)
        monitor.begin_window(sync=sync)

    with monitor, progress(total, cell["cell"]) as bar:
        monitor.measure_idle(sync=sync)
        records = run_load(
            prompts, engine, cell["load"], cell["batch_size"], seed=cell["seed"], warmup=cell["warmup"],
            on_record=bar.update,
            on_window_start=begin_window,
            on_window_end=lambda: monitor.end_window(sync=sync),
        )
    measured = [r for r in records if not r["warmup"]]
    energy = monitor.energy(output_tokens=sum(r["output_tokens"] for r in measured), num_requests=len(measured))
    if energy["available"]:
        monitor.write_timeline(out_dir / "power.csv")
    return records, energy


def forward_costs(session: Session, prompt_ids: list[int], repeats: int = 9) -> dict:
    """Median seconds of one cached forward as the engine runs it: the target with 1 and with
    gamma + 1 new tokens, the drafter with 1. They are c and the verification cost of the
    Leviathan prediction. The three are timed in turn, round after round, so that a machine
    slowing down or speeding up meanwhile moves all three alike."""
    from specdec.decoding.cache import RaggedCache
    from specdec.decoding.kernels import decode_kernels

    forwards = {"target_forward_s": (session.target, 1), "verify_forward_s": (session.target, (session.cell["gamma"] or 1) + 1)}
    if session.drafter_model is not None:
        forwards["drafter_forward_s"] = (session.drafter_model, 1)
    times = {name: [] for name in forwards}
    with torch.inference_mode(), decode_kernels(session.target, session.drafter_model):  # as the engine runs them
        caches = {}
        for model, _ in forwards.values():
            if model not in caches:
                ids = torch.tensor([prompt_ids], device=placement.input_device(model))
                caches[model] = RaggedCache.prefill(model, ids, torch.ones_like(ids, dtype=torch.bool))[0]
        for _ in range(repeats):
            for name, (model, width) in forwards.items():
                device = placement.input_device(model)
                step = torch.full((1, width), prompt_ids[-1], device=device)
                _synchronize(device)
                began = time.perf_counter()
                caches[model].extend(step, torch.ones_like(step, dtype=torch.bool), logits_to_keep=width)
                _synchronize(device)
                times[name].append(time.perf_counter() - began)
                caches[model].rollback(torch.zeros(1, dtype=torch.long, device=device), width, 0)
    return {"drafter_forward_s": 0.0} | {name: statistics.median(values) for name, values in times.items()}


def compare_with_reference(session: Session, records: list[dict], reference: Path) -> dict:
    """Greedy outputs must equal the AR cell's token for token. A divergence is reported with
    its position and the target's top-2 logit gap there: a near-tie is floating point, not a bug."""
    ours = {r["request_id"]: r for r in records if not r["warmup"]}
    theirs = {r["request_id"]: r for r in read_jsonl(reference) if not r["warmup"]}
    shared = sorted(set(ours) & set(theirs))
    divergences = []
    for request_id in shared:
        a, b = ours[request_id]["output_ids"], theirs[request_id]["output_ids"]
        if a == b:
            continue
        position = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        divergences.append({
            "request_id": request_id, "position": position,
            "ours": a[position:position + 1], "reference": b[position:position + 1],
            "target_top2_gap": _top2_gap(session, session.prompt_ids[request_id] + a[:position]),
        })
    return {"checked": True, "reference": str(reference), "identical": not divergences and len(shared) == len(ours),
            "requests_compared": len(shared), "divergences": divergences}


def _top2_gap(session: Session, ids: list[int]) -> float:
    with torch.inference_mode():
        logits = session.target(torch.tensor([ids], device=session.device)).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


def analyse(session: Session, records: list[dict], reference: Path | None) -> dict:
    cell = session.cell
    summary = {"metrics": metrics.summarize(records), "acceptance": None, "theory": None}
    if cell["method"] == "ar":
        summary["correctness"] = {"checked": False, "reason": "AR is the reference"}
    elif cell["temperature"] > 0:
        summary["correctness"] = {"checked": False, "reason": "sampling: losslessness is a property of the output distribution, tested statistically"}
    elif reference is None:
        summary["correctness"] = {"checked": False, "reason": "no greedy AR cell with the same settings in the matrix"}
    else:
        summary["correctness"] = compare_with_reference(session, records, reference)
    if cell["gamma"] is not None:
        acceptance = metrics.acceptance(records, cell["gamma"])
        costs = forward_costs(session, session.prompt_ids[records[-1]["request_id"]])
        alpha = metrics.per_token_alpha(acceptance["per_position"])
        # A decode step is a target forward that could verify drafts: our engine's prefill
        # cannot (TTFT is the target's alone), transformers' verifies its first draft.
        undrafted = 0 if cell["method"] in PEER_METHODS else len(metrics.measured(records))
        summary["acceptance"] = acceptance
        if alpha is not None:
            summary["theory"] = metrics.theory(
                alpha=alpha,
                gamma=cell["gamma"],
                cost_ratio=costs["drafter_forward_s"] / costs["target_forward_s"],
                verify_cost_ratio=costs["verify_forward_s"] / costs["target_forward_s"],
                shares=metrics.draft_length_shares(acceptance["per_position"], acceptance["target_forwards"] - undrafted),
            ) | costs
    return summary


def _rss_bytes() -> int | None:
    """Resident memory of this process now (Linux), or None where /proc is absent."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def memory_report(session: Session) -> dict:
    """Peak memory against what the models need: their weights plus full KV caches for the
    longest prompt of the cell. On a GPU the peak is CUDA's allocator's; on the CPU it is
    the process's peak RSS, given both whole and less the RSS just before the first weights
    were loaded (`baseline`: the interpreter, torch, transformers and the tokenizer, about
    400 MB, which no engine avoids)."""
    cell, mb = session.cell, 2**20
    tokens = max(map(len, session.prompt_ids.values()), default=0) + cell["max_new_tokens"] + (cell["gamma"] or 0) + 1
    caches = sum(models.kv_cache_bytes(m, cell["batch_size"], tokens) for m in (session.target, session.drafter_model) if m is not None)
    needed = models.weight_bytes(session.target, session.drafter_model) + caches
    report = {"weights_mb": (needed - caches) / mb, "kv_cache_mb": caches / mb}
    if any(p.device.type == "cuda" for p in session.target.parameters()):
        peak = sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
        return report | {"device": "cuda", "peak_mb": peak / mb, "peak_over_needed": peak / needed}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report |= {"device": "cpu", "peak_mb": peak / mb, "peak_over_needed": peak / needed}
    if session.rss_before_weights is not None:
        baseline = session.rss_before_weights
        report |= {"baseline_rss_mb": baseline / mb, "growth_over_needed": (peak - baseline) / needed}
    return report


def failure_record(exc: BaseException, phase: str) -> dict:
    record = {"type": type(exc).__name__, "message": str(exc) or repr(exc), "phase": phase,
              "memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        record["cuda_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return record


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def _raise_timeout(signum, frame):
    raise CellTimeout("the cell ran past its timeout_s")


def run_cell(cell: dict, prompts_path: Path, out_dir: Path, models_dir: Path = Path("resources/models"),
             reference: Path | None = None, threads: int | None = None) -> dict:
    """Run one cell; returns the result written, or `{"status": "interrupted", "signal": N}`.

    Bad input raises (a ValueError) before anything is written. SIGTERM/SIGINT at any moment,
    the writing of the outputs included, leaves neither output file."""
    from specdec.datasets import read_prompts
    from specdec.gpus import lease_gpus

    out_dir, started = Path(out_dir), now_iso()
    if threads:
        torch.set_num_threads(threads)
    phase = "setup"
    handlers = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        check_cell(cell)
        prompts = read_prompts(prompts_path)
        strategy = cell["placement"]["strategy"]
        lease = lease_gpus(placement.gpus_required(strategy, cell["placement"], cell["drafter"] is not None), label=cell["cell"])
        session = load_session(cell, Path(models_dir))
        check_context(session, prompts)
        where = {"lease": lease.describe(), "plan": session.plan.describe(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        phase = "measure"
        result, records = _measure_and_analyse(session, prompts, out_dir, reference)
        phase = "write"
        _write_outputs(cell, result, records, where, started, out_dir)
    except Interrupted as exc:
        for name in OUTPUTS:  # one may be in place already if the signal came between the two renames
            (out_dir / name).unlink(missing_ok=True)
        write_json(out_dir / "interrupted.json", {"cell_id": f"{cell['experiment']}/{cell['cell']}", "signal": str(exc), "phase": phase, "at": now_iso()})
        log.error("interrupted by %s during %s; no result written, so the cell reruns", exc, phase)
        return {"status": "interrupted", "signal": exc.signum}
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    log.info("\n%s", metrics.summary_table(result["metrics"], cell["cell"]) if result["metrics"] else result["failure"])
    return result


def _write_outputs(cell: dict, result: dict, records: list[dict], where: dict, started: str, out_dir: Path) -> None:
    """Complete, validate and write the result; result.json goes last, as the mark of a finished cell."""
    from specdec.metadata import collect_metadata
    from specdec.schema import validate_result

    result.update(schema_version=SCHEMA_VERSION, cell_id=f"{cell['experiment']}/{cell['cell']}", config=cell)
    result["metadata"] = collect_metadata(seed=cell["seed"], started_at=started, finished_at=now_iso()) | {"placement": where}
    validate_result(result)
    write_jsonl(out_dir / "requests.jsonl", records)
    write_json(out_dir / "result.json", result)
    (out_dir / "interrupted.json").unlink(missing_ok=True)


def _measure_and_analyse(session: Session, prompts: list[dict], out_dir: Path, reference: Path | None) -> tuple[dict, list[dict]]:
    """The result body and the request records; a failure here (the cell's `timeout_s`
    included) is recorded, not raised, so that the rest of the matrix goes on."""
    from specdec.peers import NotSupported

    result = {"status": "ok", "failure": None, "metrics": None, "acceptance": None, "theory": None,
              "energy": {"available": False, "reason": "the cell did not reach its measured window"},
              "correctness": {"checked": False, "reason": "the cell did not finish"}}
    phase = "measure"
    if session.cell.get("timeout_s"):
        signal.signal(signal.SIGALRM, _raise_timeout)
        signal.setitimer(signal.ITIMER_REAL, session.cell["timeout_s"])
    try:
        records, result["energy"] = measure(session, prompts, out_dir)
        phase = "analyse"
        result.update(analyse(session, records, reference))
        result["memory"] = memory_report(session)
        return result, records
    except Exception as exc:
        log.exception("cell failed during %s", phase)
        status = "not_supported" if isinstance(exc, NotSupported) else "failed"
        result.update(status=status, failure=failure_record(exc, phase))
        session.target = session.drafter = session.drafter_model = None  # free memory before the job ends
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return result, []
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
