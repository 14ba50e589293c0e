"""What our engine and transformers' `generate()` share: models placed and loaded in this
process (`session.load_models`), served in static batches (`load.BatchServer`), timed by
forward hooks (`attribution.Attribution`), with memory measured against need. An
interleaved cell (`Cell.interleaved`) also decodes every request with AR on the same loaded
target, batch by batch."""

from __future__ import annotations

import dataclasses
import resource
import time
from abc import abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch

from specdec.decoding import GenerationSettings, RowResult
from specdec.engines.base import Engine
from specdec.engines.placement import PlacementPlan
from specdec.engines.session import chat_messages, load_models
from specdec.gate.cells import Cell
from specdec.job import attribution
from specdec.job.load import BatchServer, Request
from specdec.prepare import models


@dataclass
class InProcessEngine(Engine):
    """Everything a cell decodes with, loaded once in this process."""

    cell: Cell
    target: object
    tokenizer: object
    drafter: object | None  # a decoding Drafter, or generate()'s assistant model (engine transformers)
    drafter_model: object | None
    plan: PlacementPlan
    settings: GenerationSettings
    rss_before_weights: int | None = None  # bytes: interpreter, libraries and tokenizer
    prompt_ids: dict = field(default_factory=dict)  # request id -> unpadded prompt token ids

    # Parts of the decode time the engine does not let the forward hooks tell apart, and why.
    hidden_parts: ClassVar[dict[str, str]] = {}

    @classmethod
    def open(cls, cell: Cell, models_dir: Path, kernels: dict[str, Path] | None = None,
             reference: Path | None = None) -> InProcessEngine:
        loaded = load_models(cell, models_dir)
        return cls(cell, loaded.target, loaded.tokenizer, loaded.drafter_model, loaded.drafter_model, loaded.plan,
                   loaded.settings, rss_before_weights=loaded.rss_before_weights)

    @property
    def device(self) -> str:
        return self.plan.target.input_device

    @property
    def context_limit(self) -> int | None:
        """The shortest context window of the models (max_position_embeddings)."""
        limits = [getattr(m.config, "max_position_embeddings", None) for m in (self.target, self.drafter_model) if m is not None]
        return min((limit for limit in limits if limit), default=None)

    def register_prompt(self, request_id: str, prompt_ids: list[int]) -> None:
        """Record a request's prompt ids."""
        self.prompt_ids[request_id] = prompt_ids

    @abstractmethod
    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generator: torch.Generator,
               recorder) -> list[RowResult]:
        """Decode a left-padded batch with the cell's method."""

    @property
    def timed_drafter(self):
        """The drafter's module whose forwards attribution times (the draft model)."""
        return self.drafter_model

    def recorder(self) -> attribution.Attribution:
        return attribution.Attribution(self.target, self.timed_drafter, drafts=self.cell.drafts, hidden=self.hidden_parts)

    def server(self, recorder) -> BatchServer:
        generator = torch.Generator(device=self.device).manual_seed(self.cell.seed)
        reference = self._reference_decoder(recorder) if self.cell.interleaved else None
        return BatchServer(self.batch_decoder(generator, recorder), self.cell.batch_size, time.perf_counter_ns, reference)

    def batch_decoder(self, generator: torch.Generator, recorder=None) -> Callable[[list[Request]], list[dict]]:
        """decode(batch of load.Request) -> row dicts: template and tokenise (outside the timed
        region, reported as `decode_start_ns`), decode with the cell's method, detokenise.
        `recorder` (an `attribution` recorder) times the decode calls and our accept steps."""
        tokenizer, cell = self.tokenizer, self.cell
        recorder = recorder or attribution.Off()

        def decode(batch: list[Request]) -> list[dict]:
            began = time.perf_counter()
            encoded = tokenizer.apply_chat_template(
                [chat_messages(request) for request in batch],
                add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True,
            )
            input_ids, attention_mask = encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device)
            for request, ids, mask in zip(batch, encoded["input_ids"].tolist(), encoded["attention_mask"].tolist()):
                self.register_prompt(request.request_id, [t for t, m in zip(ids, mask) if m])
            tokenize_s = (time.perf_counter() - began) / len(batch)
            decode_start_ns = time.perf_counter_ns()
            with recorder.decode():
                results = self.decode(input_ids, attention_mask, generator, recorder)
            rows = []
            for request, row in zip(batch, results):
                record = asdict(row)
                record.update(
                    prompt_tokens=len(self.prompt_ids[request.request_id]),
                    tokenize_s=tokenize_s,
                    decode_start_ns=decode_start_ns,
                    output_text=tokenizer.decode(row.output_ids, skip_special_tokens=True),
                )
                if not cell.greedy:
                    del record["output_ids"]  # only greedy outputs are compared token for token
                rows.append(record)
            return rows

        return decode

    def ar_copy(self) -> InProcessEngine:
        """The cell's AR counterpart on the same loaded target, kernels and prompts."""
        return dataclasses.replace(self, cell=self.cell.ar_counterpart(), drafter=None, drafter_model=None,
                                   settings=dataclasses.replace(self.settings, gamma=0))

    def _reference_decoder(self, recorder) -> Callable[[list[Request]], list[dict]]:
        """The AR decoder an interleaved cell decodes each request with too: `ar_copy`, a
        generator of its own seeded like the cell's, and nothing of it timed by the cell's
        attribution (`recorder.paused`)."""
        ar = self.ar_copy()
        decode_ar = ar.batch_decoder(torch.Generator(device=self.device).manual_seed(ar.cell.seed))

        def decode(batch: list[Request]) -> list[dict]:
            with recorder.paused():
                return decode_ar(batch)

        return decode

    def memory(self) -> dict:
        """Peak memory against what the models need: their weights plus full KV caches for the
        longest prompt of the cell. On a GPU the peak is CUDA's allocator's; on the CPU it is
        the process's peak RSS, given both whole and less the RSS just before the first weights
        were loaded (`baseline`: the interpreter, torch, transformers and the tokenizer, about
        400 MB, which no engine avoids)."""
        cell, mb = self.cell, 2**20
        tokens = max(map(len, self.prompt_ids.values()), default=0) + cell.generation.max_new_tokens + cell.gamma + 1
        caches = sum(models.kv_cache_bytes(m, cell.batch_size, tokens) for m in (self.target, self.drafter_model) if m is not None)
        needed = models.weight_bytes(self.target, self.drafter_model) + caches
        report = {"weights_mb": (needed - caches) / mb, "kv_cache_mb": caches / mb}
        if any(p.device.type == "cuda" for p in self.target.parameters()):
            peak = sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
            return report | {"device": "cuda", "peak_mb": peak / mb, "peak_over_needed": peak / needed}
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        report |= {"device": "cpu", "peak_mb": peak / mb, "peak_over_needed": peak / needed}
        if self.rss_before_weights is not None:
            baseline = self.rss_before_weights
            report |= {"baseline_rss_mb": baseline / mb, "growth_over_needed": (peak - baseline) / needed}
        return report

    def close(self) -> None:
        self.target = self.drafter = self.drafter_model = None
