"""The `specdec` command: what the Snakemake rules call, and what a user runs for one cell."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

# Before transformers and huggingface_hub load: they read these once, when imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn  # noqa: E402

from specdec.decoding.kernels import probe  # noqa: E402
from specdec.engines import unsupported  # noqa: E402
from specdec.gate.cells import ModelSpec  # noqa: E402
from specdec.gate.config import ConfigError, check_inputs, expand_matrix, load_config  # noqa: E402
from specdec.job.gpus import lease_gpus  # noqa: E402
from specdec.job.runner import now_iso, run_cell  # noqa: E402
from specdec.metadata import cpu_model  # noqa: E402
from specdec.prepare.datasets import prepare_dataset_file  # noqa: E402
from specdec.prepare.models import load_model, load_tokenizer, model_location, prepare_embedded  # noqa: E402
from specdec.prepare.head_training import train_head  # noqa: E402
from specdec.records import head_job_from_json, read_cell, read_prompts, write_kernel_choice, write_training  # noqa: E402


def _prepare_model(args) -> int:
    print(f"prepared {prepare_embedded(Path(args.out))}")
    return 0


def _prepare_dataset(args) -> int:
    spec = ModelSpec(name=args.model, **json.loads(args.model_spec))
    location, kwargs = model_location(spec, Path(args.models_dir))
    tokenizer = load_tokenizer(location, spec.name, **kwargs)
    prepared = prepare_dataset_file(json.loads(args.spec), tokenizer, args.out, seed=args.seed, name=args.name,
                                    skipped_path=args.skipped, skipped_html_path=args.skipped_html)
    print(json.dumps(prepared.stats, indent=2, default=str))
    return 0


def _choose_kernels(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = ModelSpec(name=args.model, **json.loads(args.model_spec))
    model, _ = load_model(spec, Path(args.models_dir), dtype=args.dtype)
    choice = {"model": args.model, "dtype": args.dtype, "batch_size": args.batch_size, "threads": args.threads,
              **probe(model, rows=args.batch_size), "cpu": cpu_model(), "torch": torch.__version__, "measured_at": now_iso()}
    write_kernel_choice(args.out, choice)
    print(json.dumps(choice, indent=2))
    return 0


def _kernel_files(values: list[str]) -> dict[str, Path]:
    """`--kernels ROLE=PATH` options as a dict."""
    files = {}
    for value in values:
        role, sep, path = value.partition("=")
        if not sep or role not in ("target", "drafter"):
            raise ValueError(f"--kernels {value!r}: expected target=PATH or drafter=PATH")
        files[role] = Path(path)
    return files


def _cell_from_args(args):
    if args.cell:
        return read_cell(args.cell)
    cells = {c.id: c for c in expand_matrix(load_config(args.config))}
    if args.cell_id not in cells:
        raise ConfigError(f"no cell {args.cell_id!r} in {args.config}; run `specdec cells --config {args.config}` to list them")
    return cells[args.cell_id]


def _log_to(path: str):
    """Send everything this process and its children (vLLM's engine process) write to `path`,
    and return the stream the console was on: Snakemake shows a job's console output, so a
    cell's few progress lines go there while its full log stays in the file."""
    console = os.fdopen(os.dup(2), "w", buffering=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    return console


def _run(args) -> int:
    console = _log_to(args.log) if args.log else None
    try:
        cell = _cell_from_args(args)
        result = run_cell(
            cell,
            prompts_path=Path(args.prompts),
            out_dir=Path(args.out_dir),
            models_dir=Path(args.models_dir),
            reference=Path(args.reference) if args.reference else None,
            parity_reference=Path(args.parity_reference) if args.parity_reference else None,
            threads=args.threads,
            kernels=_kernel_files(args.kernels),
            dataset_files=[Path(path) for path in args.dataset_file],
            console=console,
        )
    except ValueError as exc:  # bad input: the one line belongs on the console too
        if console is not None:
            print(f"specdec run: error: {exc} (log: {args.log})", file=console)
        raise
    # A failed cell is a result (exit 0); an interrupted one exits as a shell reports the signal.
    return 128 + result["signal"] if result["status"] == "interrupted" else 0


def _train_head(args) -> int:
    """Train the head a HeadJob describes (workflow rule train_drafter): its folder gets the
    checkpoint and training.json; the resumable state waits beside it until the head is written."""
    console = _log_to(args.log) if args.log else sys.stderr
    if args.threads:
        torch.set_num_threads(args.threads)
    job = head_job_from_json(args.spec, "--spec")
    prompts = {Path(path).stem: read_prompts(path) for path in args.prompts}
    out = Path(job.drafter.source)
    device = "cuda" if args.gpus else "cpu"

    def say(line: str) -> None:
        print(line, flush=True)
        if console is not sys.stderr:
            print(f"train {job.drafter.name}: {line}", file=console, flush=True)

    columns = (TextColumn(f"train {job.drafter.name}"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} tokens"),
               TimeElapsedColumn(), TimeRemainingColumn())
    # the GPUs the rule declared, held as a benchmark cell holds its own (Snakemake pins none)
    with lease_gpus(args.gpus, label=f"train {job.drafter.name}"), Progress(*columns, console=Console(file=console)) as bar:
        target, tokenizer = load_model(job.target, Path(args.models_dir), device_map=device)
        task = bar.add_task("train", total=job.drafter.train.tokens)
        record = train_head(target, tokenizer, job.drafter.kind, job.drafter.train, job.seed, prompts, out,
                            out.with_name(out.name + ".state.pt"),
                            report=lambda done, total: bar.update(task, completed=done, total=total), log=say)
    record = {"drafter": job.drafter.name, "target": job.target.name, **record, "device": device, "finished_at": now_iso()}
    write_training(out / "training.json", record)
    last = record["curve"][-1]
    say(f"head written to {out}: {record['tokens']:,} tokens in {record['seconds']:.0f} s, held-out acceptance {last['acceptance']}")
    return 0


def _cells(args) -> int:
    for cell in expand_matrix(load_config(args.config)):
        print(cell.id)
    return 0


def _check_config(args) -> int:
    config = load_config(args.config)
    check_inputs(config)
    cells = expand_matrix(config)
    print(f"{args.config}: valid, {len(cells)} cells in {len({c.experiment for c in cells})} experiment(s)")
    gaps = [(cell.id, reason) for cell in cells if (reason := unsupported(cell))]
    if gaps:
        print(f"{len(gaps)} cell(s) will be recorded not_supported, without running:")
        for cell_id, reason in gaps:
            print(f"  {cell_id}: {reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-model", help="convert the embedded GGUF model into a transformers folder")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_prepare_model)

    p = sub.add_parser("prepare-dataset", help="normalise, filter and sample a dataset into prompts JSONL")
    p.add_argument("--name", required=True)
    p.add_argument("--spec", required=True, help="the dataset's config entry as JSON")
    p.add_argument("--model", required=True, help="name of the model whose tokenizer measures prompt lengths")
    p.add_argument("--model-spec", required=True, help="that model's config entry as JSON")
    p.add_argument("--models-dir", default="resources/models", help="where embedded models are prepared")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--skipped", help="CSV of the records skipped (file, line, reason)")
    p.add_argument("--skipped-html", help="the same as an HTML table (needs --skipped)")
    p.set_defaults(func=_prepare_dataset)

    p = sub.add_parser("choose-kernels", help="choose the CPU decoding kernels of a model, dtype and batch size once")
    p.add_argument("--model", required=True, help="the model's name in the config")
    p.add_argument("--model-spec", required=True, help="that model's config entry as JSON")
    p.add_argument("--dtype", required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--models-dir", default="resources/models")
    p.add_argument("--threads", type=int, help="CPU threads for torch (the cells')")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_choose_kernels)

    p = sub.add_parser("run", help="run one benchmark cell")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--cell", help="a cell file (cell.json, written by the workflow's cell rule)")
    which.add_argument("--cell-id", help="EXPERIMENT/CELL from --config (see `specdec cells`)")
    p.add_argument("--config", default="config.yaml")
    p.add_argument("--prompts", required=True, help="prompts JSONL from prepare-dataset")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--models-dir", default="resources/models")
    p.add_argument("--reference", help="requests.jsonl of the same engine's AR cell that greedy outputs must equal")
    p.add_argument("--parity-reference", help="requests.jsonl of our engine's AR cell, for a cell another engine runs")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--kernels", action="append", default=[], metavar="ROLE=PATH",
                   help="the CPU kernel choice (choose-kernels) of the target or the drafter; probed at load if absent")
    p.add_argument("--dataset-file", action="append", default=[], metavar="PATH",
                   help="a file the prompts were prepared from (its sha256 goes into the result)")
    p.add_argument("--log", help="write the full log here; the console gets only start, progress and end lines")
    p.set_defaults(func=_run)

    p = sub.add_parser("train-head", help="train a learned draft head (EAGLE-3, Medusa) for its target")
    p.add_argument("--spec", required=True, help="the head job as JSON (the workflow's train_drafter rule writes it)")
    p.add_argument("--prompts", nargs="*", default=[], help="prompts JSONL of every evaluation dataset: none may share a prompt with the training text")
    p.add_argument("--models-dir", default="resources/models")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--gpus", type=int, default=0, help="GPUs to hold and train on (0: the CPU)")
    p.add_argument("--log", help="write the full log here; the console gets the progress bar and the curve's points")
    p.set_defaults(func=_train_head)

    p = sub.add_parser("cells", help="list the cells of a config")
    p.add_argument("--config", default="config.yaml")
    p.set_defaults(func=_cells)

    p = sub.add_parser("check-config", help="validate a config file (errors name the file, line and key)")
    p.add_argument("--config", default="config.yaml")
    p.set_defaults(func=_check_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # every bad-input error of specdec is a ValueError subclass
        print(f"specdec {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
