"""Where a cell's decode time goes, measured in the run: the target's prefill forwards, the
drafter's forwards, the target's verification (decode) forwards, the accept/sample step, and
everything else (host, Python, transfers) = decode wall time less the rest.

Only the measured window counts (`begin` .. `end`, the warm-up stays out). Forwards are timed
by forward hooks on the target's and the drafter's top-level modules, so one recorder serves
our engine and transformers' `generate()` alike; a compiled step (`decoding.compiled`) calls
the compiled forward, not the module, so no hook fires and the same marks go around the
compiled call instead (its static setup's `step`). A forward whose KV cache is empty (none
given, or one holding nothing yet) is a prefill, any other is keyed by its width (new tokens
per row) with its count, seconds and batch rows, from which the theory's costs follow (mean
one-token target forward = target_decode["1"] total_s / count). On the CPU the marks are host
clock readings, which bracket the work because the CPU computes synchronously. On CUDA they
are `torch.cuda.Event` pairs recorded on the model's stream and read only after the window
(the power window's edge synchronises), so the timed loop gains no synchronisation; an
event pair measures the device's time from the forward's first queued kernel to its last,
idle gaps included. Decode wall time is host time around the engine's decode calls, which
end with the host transfer of their last tokens.

vLLM runs its forwards in its engine-core process and 0.32 hands none of their times to
the client (`collect_detailed_traces` feeds only OpenTelemetry spans), so a vLLM cell's
block has the wall time of each `step()` (split by whether it emitted a request's first
token) and no parts.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch

from specdec.decoding.cache import static_setup

PARTS = ("prefill", "drafter", "verify", "accept", "other")
GENERATE_ACCEPTS = "transformers' generate() samples and accepts inside its own loop: no hook point, so it is inside other"
MODEL_FREE_DRAFTER = "a model-free drafter (n-gram table, prompt lookup) runs no forwards: its proposals are host work, inside other"
VLLM_SPLIT = "vLLM runs its forwards in its engine-core process and 0.32 exposes no forward or sampling time to the client"


@dataclass
class Bucket:
    """Forwards of one kind (and width): how many, their seconds, their batch rows in all."""

    count: int = 0
    total_s: float = 0.0
    rows: int = 0

    def add(self, seconds: float, rows: int) -> None:
        self.count += 1
        self.total_s += seconds
        self.rows += rows

    def to_dict(self) -> dict:
        return {"count": self.count, "total_s": self.total_s, "rows": self.rows}


def unavailable(reason: str) -> dict:
    return {"available": False, "reason": reason}


class _HostMarks:
    name = "host clock"

    def __init__(self, clock: Callable[[], int]):
        self.clock = clock

    def mark(self, device: torch.device) -> int:
        return self.clock()

    def seconds(self, start: int, end: int) -> float:
        return (end - start) / 1e9


class _CudaMarks:
    name = "cuda events"

    def mark(self, device: torch.device) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))
        return event

    def seconds(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        end.synchronize()  # after the window: the loop itself never waits on an event
        return start.elapsed_time(end) / 1e3


def _rows_and_width(args: tuple, kwargs: dict) -> tuple[int, int]:
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs["inputs_embeds"]
    return tokens.shape[0], tokens.shape[1]


def _is_prefill(kwargs: dict) -> bool:
    # transformers 5.23 renamed the forward's `past_key_values` to `cache` (decoding/cache.py).
    # A module that takes no cache at all (Medusa's heads) has no prefill.
    if "cache" not in kwargs and "past_key_values" not in kwargs:
        return False
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return cache is None or cache.get_seq_length() == 0


def _single_device(model) -> torch.device | None:
    devices = {p.device for p in model.parameters()}
    return devices.pop() if len(devices) == 1 else None


class Attribution:
    """Times the forwards of `target` and `drafter` (a model, or None) and the engine's decode
    calls and accept steps inside the measured window. `drafts` without a drafter model is a
    model-free drafter, whose proposals cannot be told apart; `hidden` names the parts the
    engine does not let us time, and why (transformers' accept step). `clock` (ns) is the
    host clock, injectable for tests."""

    def __init__(self, target, drafter=None, *, drafts: bool, hidden: Mapping[str, str] | None = None,
                 clock: Callable[[], int] = time.perf_counter_ns):
        self.models = {"target": target} | ({"drafter": drafter} if drafter is not None else {})
        self.drafts, self.hidden, self.clock = drafts, dict(hidden or {}), clock
        self.devices = {name: _single_device(model) for name, model in self.models.items()}
        self.reason = _why_not(self.models, self.devices)
        on_cuda = any(d is not None and d.type == "cuda" for d in self.devices.values())
        self.marks = _CudaMarks() if on_cuda else _HostMarks(clock)
        self.active = False
        self._handles: list = []
        self._compiled: list = []  # (static setup, its own compiled step) while the window wraps it
        self._open: dict[str, list] = {name: [] for name in self.models}
        self._pending: list[tuple[str, int | None, int, object, object]] = []  # kind, width, rows, start, end
        self.decode_ns, self.decode_calls = 0, 0
        self.buckets: dict[tuple[str, int | None], Bucket] = {}

    @property
    def enabled(self) -> bool:
        return self.reason is None

    def begin(self) -> None:
        """Start the window: hooks go on now, so nothing before (warm-up) is timed."""
        if not self.enabled:
            return
        for name, model in self.models.items():
            self._handles += [model.register_forward_pre_hook(self._opener(name), with_kwargs=True),
                              model.register_forward_hook(self._closer(name), with_kwargs=True)]
            setup = static_setup(model)
            if setup is not None and setup.compiled:
                self._compiled.append((setup, setup.step))
                setup.step = self._timed_step(name, setup.step)
        self.active = True

    def end(self) -> None:
        """End the window, take the hooks off and read the marks (CUDA events are complete
        once the power window's edge has synchronised; `seconds` waits otherwise)."""
        self.active = False
        for handle in self._handles:
            handle.remove()
        for setup, step in self._compiled:
            setup.step = step
        self._handles, self._compiled = [], []
        for kind, width, rows, start, end in self._pending:
            self.buckets.setdefault((kind, width), Bucket()).add(self.marks.seconds(start, end), rows)
        self._pending = []

    def _opener(self, name: str):
        device = self.devices[name]

        def before(module, args, kwargs):
            if not self.active:  # paused (`paused`): another decode shares the models
                return
            rows, width = _rows_and_width(args, kwargs)
            prefill = _is_prefill(kwargs)
            self._open[name].append((f"{name}_prefill" if prefill else name, None if prefill else width, rows,
                                     self.marks.mark(device)))

        return before

    def _closer(self, name: str):
        device = self.devices[name]

        def after(module, args, kwargs, output):
            if not self.active:
                return
            kind, width, rows, start = self._open[name].pop()
            self._pending.append((kind, width, rows, start, self.marks.mark(device)))

        return after

    def _timed_step(self, name: str, step: Callable) -> Callable:
        """`step` (model kwargs -> logits) between the marks the hooks would set: a compiled
        step runs the model's forward without its hooks."""
        before, after = self._opener(name), self._closer(name)

        def timed(**kwargs):
            before(None, (), kwargs)
            logits = step(**kwargs)
            after(None, (), kwargs, logits)
            return logits

        return timed

    @contextmanager
    def decode(self) -> Iterator[None]:
        """Around one decode call of the engine: its host wall time, inside the window."""
        if not self.active:
            yield
            return
        began = self.clock()
        yield
        self.decode_ns += self.clock() - began
        self.decode_calls += 1

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing inside is timed: an interleaved AR reference decodes on the same target
        inside the window, and its forwards are not the cell's."""
        active, self.active = self.active, False
        try:
            yield
        finally:
            self.active = active

    @contextmanager
    def accept(self) -> Iterator[None]:
        """Around our engine's accept/sample step (`generate(accept_timer=...)`)."""
        if not self.active:
            yield
            return
        device = self.devices["target"]
        start = self.marks.mark(device)
        yield
        self._pending.append(("accept", None, 0, start, self.marks.mark(device)))

    def _bucket(self, kind: str) -> Bucket:
        return self.buckets.get((kind, None), Bucket())

    def _widths(self, kind: str) -> dict[str, Bucket]:
        return {str(width): b for (k, width), b in sorted(self.buckets.items(), key=lambda kv: kv[0][1] or 0) if k == kind}

    def block(self) -> dict:
        """The result's `attribution` block (schema `result.schema.json`)."""
        if not self.enabled:
            return unavailable(self.reason)
        verify, drafter = self._widths("target"), self._widths("drafter")
        parts = {"prefill": self._bucket("target_prefill").total_s,
                 "verify": sum(b.total_s for b in verify.values()),
                 "drafter": self._bucket("drafter_prefill").total_s + sum(b.total_s for b in drafter.values()),
                 "accept": self._bucket("accept").total_s}
        missing = {}
        if self.drafts and "drafter" not in self.models:
            missing["drafter"] = MODEL_FREE_DRAFTER
        missing |= self.hidden
        for part in missing:
            parts[part] = None
        decode_s = self.decode_ns / 1e9
        parts["other"] = decode_s - sum(v for v in parts.values() if v is not None)
        return {
            "available": True, "clock": self.marks.name, "decode_s": decode_s, "decode_calls": self.decode_calls,
            "parts_s": {part: parts[part] for part in PARTS}, "not_separable": missing,
            "forwards": {"target_prefill": self._bucket("target_prefill").to_dict(),
                         "target_decode": {w: b.to_dict() for w, b in verify.items()},
                         "drafter_prefill": self._bucket("drafter_prefill").to_dict(),
                         "drafter": {w: b.to_dict() for w, b in drafter.items()}},
            "steps": sum(b.count for b in verify.values()),
        }


def _why_not(models: dict, devices: dict) -> str | None:
    if len({id(m) for m in models.values()}) < len(models):
        return "the drafter is the target's own module: hooks on it cannot tell the two apart"
    for name, device in devices.items():
        if device is None:
            return (f"the {name} spans several devices: one device's CUDA events cannot time its forwards, "
                    "and synchronising inside the loop would change what is measured")
    return None


class EngineSteps:
    """A vLLM cell's recorder: the host wall time of each engine `step()` inside the window, a
    step that emitted some request's first token counted as `prefill` (it ran that prompt's
    last chunk; decode rows may share it), any other as `decode`, with the rows it emitted for."""

    enabled = True

    def __init__(self):
        self.active = False
        self.steps = {"prefill": Bucket(), "decode": Bucket()}

    def begin(self) -> None:
        self.active = True

    def end(self) -> None:
        self.active = False

    def record(self, seconds: float, first_token: bool, rows: int) -> None:
        if self.active:
            self.steps["prefill" if first_token else "decode"].add(seconds, rows)

    def block(self) -> dict:
        decode_s = sum(b.total_s for b in self.steps.values())
        return {
            "available": True, "clock": "host clock", "decode_s": decode_s,
            "decode_calls": sum(b.count for b in self.steps.values()),
            "parts_s": dict.fromkeys(PARTS), "not_separable": dict.fromkeys(PARTS, VLLM_SPLIT),
            "forwards": None, "engine_steps": {kind: b.to_dict() for kind, b in self.steps.items()},
            "steps": sum(b.count for b in self.steps.values()),
        }


class Off:
    """Attribution switched off (`attribution: false`): nothing is hooked or timed."""

    enabled = False
    active = False

    def begin(self) -> None:
        pass

    def end(self) -> None:
        pass

    @contextmanager
    def decode(self) -> Iterator[None]:
        yield

    paused = decode

    def block(self) -> dict:
        return unavailable("attribution is off for this experiment (attribution: false)")

