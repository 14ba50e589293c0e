"""Run one benchmark cell: place and load the models, decode the prompts under the configured
load, measure, and write `result.json` and `requests.jsonl` atomically."""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from specdec import metrics
from specdec.config import METHODS_WITH_GAMMA
from specdec.io import read_jsonl, write_json, write_jsonl

log = logging.getLogger("specdec.run")

SCHEMA_VERSION = 1


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived (as SLURM sends at a time limit)."""


class CellTimeout(Exception):
    """The cell ran past its configured `timeout_s`."""


@dataclass
class Phase:
    """The part of a cell that is running, recorded with a failure."""

    name: str = "setup"
    history: list = field(default_factory=list)

    def enter(self, name: str) -> None:
        self.name = name
        self.history.append((name, time.time()))
        log.info("phase: %s", name)


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


def _memory_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _raise_on_signal(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def _raise_timeout(signum, frame):
    raise CellTimeout("the cell ran past its timeout_s")


def failure_record(exc: BaseException, phase: str) -> dict:
    record = {"type": type(exc).__name__, "message": str(exc) or repr(exc), "phase": phase, "memory_mb": _memory_mb()}
    try:
        import torch

        if torch.cuda.is_available():
            record["cuda_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    except Exception:  # memory is context for the failure; never hide the failure itself
        pass
    return record


@dataclass
class Session:
    """Everything a cell decodes with, loaded once."""

    cell: dict
    target: object
    tokenizer: object
    drafter: object | None  # a decoding Drafter, or the assistant model for hf_assisted
    drafter_model: object | None
    placement: object
    settings: object
    devices: list
    prompt_ids: dict = field(default_factory=dict)  # request id -> unpadded prompt token ids


def load_session(cell: dict, models_dir: Path) -> Session:
    """Place and load the target and the drafter named by the cell."""
    from specdec import models, placement
    from specdec.decoding import ModelDrafter, NgramDrafter, check_same_vocabulary

    target_name = cell["target"]
    drafter_spec = cell["drafters"].get(cell["drafter"]) if cell["drafter"] else None
    plan = placement.plan_for_cell(cell, models_dir)
    target, tokenizer = models.load_model(
        target_name, cell["models"][target_name], models_dir, device_map=plan.target.device_map
    )
    drafter_model = None
    if drafter_spec and drafter_spec["kind"] == "quantized":
        drafter_model = models.quantized_copy(target, drafter_spec["dtype"])
        if plan.drafter is not None and plan.drafter.input_device != plan.target.input_device:
            drafter_model = drafter_model.to(plan.drafter.input_device)
    elif drafter_spec and drafter_spec["kind"] == "model":
        name = drafter_spec["model"]
        drafter_model, drafter_tokenizer = models.load_model(
            name, cell["models"][name], models_dir, device_map=plan.drafter.device_map
        )
        check_same_vocabulary(target, drafter_model, tokenizer, drafter_tokenizer)
    eos = _eos_ids(target, tokenizer)
    settings = generation_settings(cell, eos, tokenizer.pad_token_id)
    if cell["method"] == "speculative":
        drafter = ModelDrafter(drafter_model)
    elif cell["method"] == "ngram":
        drafter = NgramDrafter(n=drafter_spec["n"], top_k=drafter_spec["top_k"])
    else:
        drafter = drafter_model
    return Session(cell, target, tokenizer, drafter, drafter_model, plan, settings, plan.devices)


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
    messages.append({"role": "user", "content": conversation["turns"][request.turn - 1]})
    return messages


def make_engine(session: Session, generator):
    """engine(batch of load.Request) -> row dicts: tokenise (timed apart), decode, detokenise."""
    from dataclasses import asdict

    from specdec.decoding import generate
    from specdec.peers import hf_generate

    tokenizer, target, cell = session.tokenizer, session.target, session.cell
    device = session.placement.target.input_device

    def decode(input_ids, attention_mask):
        if cell["method"] == "hf_assisted":
            return hf_generate(target, input_ids, attention_mask, session.settings, assistant_model=session.drafter)
        if cell["method"] == "hf_prompt_lookup":
            return hf_generate(target, input_ids, attention_mask, session.settings, prompt_lookup_num_tokens=cell["gamma"])
        return generate(target, input_ids, attention_mask, session.settings, drafter=session.drafter, generator=generator)

    def engine(batch) -> list[dict]:
        began = time.perf_counter()
        encoded = tokenizer.apply_chat_template(
            [chat_messages(request) for request in batch],
            add_generation_prompt=True,
            padding=True,
            return_tensors="pt",
            return_dict=True,
        )
        input_ids, attention_mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
        tokenize_s = time.perf_counter() - began
        decode_start_ns = time.perf_counter_ns()
        for request, ids, mask in zip(batch, input_ids.tolist(), attention_mask.tolist()):
            session.prompt_ids[request.request_id] = [t for t, m in zip(ids, mask) if m]
        rows = []
        for row, prompt_tokens in zip(decode(input_ids, attention_mask), attention_mask.sum(dim=1).tolist()):
            record = asdict(row)
            record.update(prompt_tokens=prompt_tokens, tokenize_s=tokenize_s / len(batch), decode_start_ns=decode_start_ns)
            record["output_text"] = tokenizer.decode(row.output_ids, skip_special_tokens=True)
            if cell["temperature"] > 0:
                del record["output_ids"]  # only greedy outputs are comparable token for token
            rows.append(record)
        return rows

    return engine


def _synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def forward_costs(session: Session, prompt_ids, repeats: int = 5) -> dict:
    """Median seconds of one cached forward: target with 1 and gamma + 1 new tokens, drafter with 1.

    These are the c and verification-cost inputs of the Leviathan et al. (2023) prediction."""
    import statistics

    import torch

    gamma = session.cell["gamma"] or 1

    def timed(model, new_tokens: int) -> float:
        device = next(model.parameters()).device
        ids = prompt_ids.to(device)
        with torch.no_grad():
            cache = model(ids, use_cache=True).past_key_values
            step = ids[:, -1:].repeat(1, new_tokens)
            times = []
            for _ in range(repeats):
                _synchronize(device)
                began = time.perf_counter()
                model(step, past_key_values=cache, use_cache=True)
                _synchronize(device)
                times.append(time.perf_counter() - began)
                cache.crop(-new_tokens)
        return statistics.median(times)

    target_one = timed(session.target, 1)
    costs = {"target_forward_s": target_one, "verify_forward_s": timed(session.target, gamma + 1)}
    costs["drafter_forward_s"] = timed(session.drafter_model, 1) if session.drafter_model is not None else 0.0
    return costs


def compare_with_reference(session: Session, records: list[dict], reference: Path) -> dict:
    """Greedy outputs must equal the AR cell's token for token; a divergence is reported with
    its position and the target's top-2 logit gap there (a near-tie is floating point, not a bug)."""
    ours = {r["request_id"]: r for r in records if not r["warmup"]}
    theirs = {r["request_id"]: r for r in read_jsonl(reference) if not r["warmup"]}
    shared = sorted(set(ours) & set(theirs))
    divergences = []
    for request_id in shared:
        a, b = ours[request_id]["output_ids"], theirs[request_id]["output_ids"]
        position = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if position is None and len(a) == len(b):
            continue
        position = min(len(a), len(b)) if position is None else position
        divergences.append({"request_id": request_id, "position": position, "ours": a[position:position + 1],
                            "reference": b[position:position + 1],
                            "target_top2_gap": _top2_gap(session, ours[request_id], a[:position])})
    return {"checked": True, "reference": str(reference), "identical": not divergences and len(shared) == len(ours),
            "requests_compared": len(shared), "divergences": divergences}


def _top2_gap(session: Session, record: dict, prefix: list[int]) -> float:
    import torch

    ids = session.prompt_ids[record["request_id"]] + prefix
    with torch.no_grad():
        logits = session.target(torch.tensor([ids], device=session.placement.target.input_device)).logits[0, -1]
    top = torch.topk(logits.float(), 2).values
    return float(top[0] - top[1])


def measure(session: Session, prompts: list[dict], out_dir: Path) -> tuple[list[dict], dict]:
    """Warm up, then decode every prompt under the cell's load inside one power window."""
    import torch

    from specdec.load import progress, run_load, total_requests, schedule
    from specdec.power import PowerMonitor

    cell = session.cell
    generator = torch.Generator(device=session.placement.target.input_device).manual_seed(cell["seed"])
    torch.manual_seed(cell["seed"])
    engine = make_engine(session, generator)
    def sync() -> None:
        _synchronize(device)

    device = session.placement.target.input_device
    monitor = PowerMonitor.for_job(cell["power"], torch.device(device).type, devices=session.devices or None)
    total = total_requests(schedule(prompts, cell["load"], cell["seed"]))
    with monitor, progress(total, cell["cell"]) as bar:
        monitor.measure_idle(sync=sync)
        records = run_load(
            prompts, engine, cell["load"], cell["batch_size"], seed=cell["seed"], warmup=cell["warmup"],
            on_window_start=lambda: monitor.begin_window(sync=sync), on_window_end=lambda: monitor.end_window(sync=sync),
            on_record=bar.update,
        )
    measured = [r for r in records if not r["warmup"]]
    energy = monitor.energy(sum(r["output_tokens"] for r in measured), len(measured))
    if energy["available"]:
        monitor.write_timeline(out_dir / "power.csv")
    return records, energy


def analyse(session: Session, records: list[dict], reference: Path | None, first_prompt_ids) -> dict:
    cell = session.cell
    summary = {"metrics": metrics.summarize(records), "acceptance": None, "theory": None}
    if cell["method"] == "ar":
        summary["correctness"] = {"checked": False, "reason": "AR is the reference"}
    elif cell["temperature"] > 0:
        summary["correctness"] = {"checked": False, "reason": "sampling: losslessness is a property of the distribution, tested statistically"}
    elif reference is None:
        summary["correctness"] = {"checked": False, "reason": "no greedy AR cell with the same settings in the matrix"}
    else:
        summary["correctness"] = compare_with_reference(session, records, reference)
    if cell["gamma"] is not None:
        summary["acceptance"] = metrics.acceptance(records, cell["gamma"])
        costs = forward_costs(session, first_prompt_ids)
        summary["theory"] = metrics.theory(
            alpha=summary["acceptance"]["acceptance_rate"],
            gamma=cell["gamma"],
            cost_ratio=costs["drafter_forward_s"] / costs["target_forward_s"],
            verify_cost_ratio=costs["verify_forward_s"] / costs["target_forward_s"],
        ) | costs
    return summary


def run_cell(cell: dict, prompts_path: Path, out_dir: Path, models_dir: Path = Path("resources/models"),
             reference: Path | None = None, threads: int | None = None) -> dict:
    """Run one cell and write `result.json` (always, recording any failure) and `requests.jsonl`.

    Bad input (settings, prompts, models, placement) raises before anything is written.
    SIGTERM/SIGINT end the cell as `interrupted`: its outputs are not written (so Snakemake
    reruns it) and `interrupted.json` says where it stopped."""
    import torch

    from specdec.datasets import read_prompts
    from specdec.gpus import lease_gpus
    from specdec.metadata import collect_metadata
    from specdec.schema import validate_result

    out_dir = Path(out_dir)
    started = now_iso()
    if threads:
        torch.set_num_threads(threads)
    generation_settings(cell)  # bad settings fail here, before any model loads
    prompts = read_prompts(prompts_path)
    lease = lease_gpus(placement_gpus(cell))
    phase = Phase()
    records: list[dict] = []
    result = {"schema_version": SCHEMA_VERSION, "cell_id": f"{cell['experiment']}/{cell['cell']}", "status": "ok",
              "config": cell, "metrics": None, "acceptance": None, "theory": None,
              "energy": {"available": False, "reason": "the cell did not reach its measured window"},
              "correctness": {"checked": False, "reason": "the cell did not finish"}, "failure": None}
    handlers = {sig: signal.signal(sig, _raise_on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    if cell.get("timeout_s"):
        signal.signal(signal.SIGALRM, _raise_timeout)
        signal.setitimer(signal.ITIMER_REAL, cell["timeout_s"])
    try:
        phase.enter("load")
        session = load_session(cell, models_dir)
        phase.enter("measure")
        records, result["energy"] = measure(session, prompts, out_dir)
        phase.enter("analyse")
        first = torch.tensor([session.prompt_ids[records[0]["request_id"]]])
        result.update(analyse(session, records, reference, first))
    except Interrupted as exc:
        signal.setitimer(signal.ITIMER_REAL, 0)
        write_json(out_dir / "interrupted.json", {"cell_id": result["cell_id"], "signal": str(exc), "phase": phase.name,
                                                  "requests_done": len(records), "at": now_iso()})
        log.error("interrupted by %s during %s; outputs not written", exc, phase.name)
        return {"status": "interrupted"}
    except Exception as exc:  # a failing cell is recorded, so the rest of the matrix goes on
        from specdec.peers import NotSupported

        log.exception("cell failed during %s", phase.name)
        result["status"] = "not_supported" if isinstance(exc, NotSupported) else "failed"
        result["failure"] = failure_record(exc, phase.name)
        result["metrics"] = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    result["metadata"] = collect_metadata(seed=cell["seed"], started_at=started, gpus=lease.uuids)
    validate_result(result)
    write_jsonl(out_dir / "requests.jsonl", records)
    write_json(out_dir / "result.json", result)
    (out_dir / "interrupted.json").unlink(missing_ok=True)
    log.info("\n%s", metrics.summary_table(result["metrics"]) if result["metrics"] else result["failure"])
    return result
