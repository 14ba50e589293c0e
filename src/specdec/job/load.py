"""Load generation: closed- and open-loop request schedules driven against an engine.

Closed loop: the first `num_requests` conversations (default: one per prompt) all wait at
t0 and are served with at most `batch_size` in the engine; a request's arrival is when the
engine takes it (queueing delay 0).
Open loop: conversations arrive at seeded random times (Poisson, or gamma inter-arrivals
with shape = burstiness and mean 1/rate; burstiness 1 is Poisson, below 1 burstier) for a
count or a duration. Arrived requests queue, first come, first served, until the engine has
a free slot; the wait counts into TTFT and E2E.

Engines are `Server`s: a static-batching one (`BatchServer`: our engine, transformers) takes
up to `batch_size` requests when idle and serves them to the end; a continuous-batching one
(vLLM) takes a request whenever fewer than `batch_size` are in it and advances one engine
step at a time.

Multi-turn conversations: turn k+1 needs the model's answer to turn k, so it arrives when
turn k finishes (in both modes) and carries the earlier turns' row results in `history`.

Conversations are used in order and cycled when more are needed than given; a repeated
conversation gets a distinct request id (`prompt@copy#turn`).
"""

from __future__ import annotations

import heapq
import itertools
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence, TextIO

import numpy as np
from rich import progress as rp
from rich.console import Console

from specdec.gate.cells import Cell, Load

# Row-result fields copied into the per-request record when the engine reports them (not None).
_ROW_FIELDS = (
    "finish_reason",
    "drafted_tokens",
    "accepted_tokens",
    "target_forwards",
    "drafted_per_position",
    "accepted_per_position",
    "per_node",
    "tokenize_s",
    "output_ids",
)


class EngineOutputError(RuntimeError):
    """The engine returned rows that cannot be turned into request records."""


@dataclass(frozen=True)
class Request:
    """One turn of one conversation, as handed to the engine."""

    conversation: dict  # prompt record: id, category, system, turns
    turn: int = 1  # 1-based
    history: tuple = ()  # the engine's row results for turns 1..turn-1, in order
    copy: int = 0  # how many times the conversation was used before (cycling)
    warmup: bool = False

    @property
    def prompt_id(self) -> str:
        return self.conversation["id"]

    @property
    def request_id(self) -> str:
        base = self.prompt_id if self.copy == 0 else f"{self.prompt_id}@{self.copy}"
        return f"{'warmup:' if self.warmup else ''}{base}#{self.turn}"

    @property
    def message(self) -> str:
        """This turn's user message."""
        return self.conversation["turns"][self.turn - 1]

    @property
    def is_last_turn(self) -> bool:
        return self.turn >= len(self.conversation["turns"])

    def follow_up(self, row: dict) -> "Request":
        return Request(self.conversation, self.turn + 1, (*self.history, row), self.copy, self.warmup)


# -------------------------------------------------------------------- schedules


def arrival_times(load: Load, seed: int) -> list[float]:
    """Open-loop arrival times in seconds after t0; the same seed gives the same times."""
    rng = np.random.default_rng(seed)
    shape = load.burstiness
    scale = 1.0 / (load.rate * shape)  # mean inter-arrival = shape * scale = 1 / rate
    times, now = [], 0.0
    while True:
        now += float(rng.gamma(shape, scale))
        if load.duration_s is not None and now > load.duration_s:
            return times
        times.append(now)
        if len(times) == load.num_requests:
            return times


def _conversations(conversations: Sequence[dict], count: int, warmup: bool = False) -> list[Request]:
    n = len(conversations)
    return [Request(conversations[i % n], copy=i // n, warmup=warmup) for i in range(count)]


def schedule(conversations: Sequence[dict], load: Load, seed: int) -> list[tuple[float, Request]]:
    """First turns with their arrival offsets in seconds (closed loop: all at 0)."""
    if not load.is_open:
        requests = _conversations(conversations, load.num_requests or len(conversations))
        return [(0.0, request) for request in requests]
    times = arrival_times(load, seed)
    return list(zip(times, _conversations(conversations, len(times))))


def total_requests(planned: Sequence[tuple[float, Request]]) -> int:
    """Requests a schedule will produce, every turn of every conversation counted."""
    return sum(len(request.conversation["turns"]) for _, request in planned)


@dataclass(frozen=True)
class RequestStream:
    """What the load generator sends: the conversations, under what load, with the
    schedule's seed, after `warmup` first turns served before the measured window."""

    conversations: Sequence[dict]
    load: Load = field(default_factory=Load)
    seed: int = 0
    warmup: int = 1

    @classmethod
    def of(cls, cell: Cell, conversations: Sequence[dict]) -> RequestStream:
        """The stream a cell measures over `conversations`."""
        return cls(conversations, cell.load, cell.seed, cell.warmup)

    def schedule(self) -> list[tuple[float, Request]]:
        return schedule(self.conversations, self.load, self.seed)

    def total_requests(self) -> int:
        return total_requests(self.schedule())


# -------------------------------------------------------------------- scheduler


class Server(Protocol):
    """An engine as the scheduler drives it: it takes requests while it has free slots and
    advances by steps; `step` returns the requests that finished, as
    (request, row, arrival_ns, start_ns)."""

    def free_slots(self) -> int: ...
    def add(self, request: Request, arrival: int) -> None: ...
    def busy(self) -> bool: ...
    def step(self) -> list[tuple[Request, dict, int, int]]: ...


def _record(request: Request, row: dict, arrival: int, start: int, t0: int) -> dict:
    """The per-request record (docs/contracts.md), times in seconds after t0."""
    emissions = row.get("emissions")
    if not emissions:
        raise EngineOutputError(f"request {request.request_id!r}: engine returned no emissions")
    times = [t for t, _ in emissions]
    if times[0] < start or any(b < a for a, b in zip(times, times[1:])):
        raise EngineOutputError(f"request {request.request_id!r}: emission times out of order")
    if any(n < 1 for _, n in emissions):
        raise EngineOutputError(f"request {request.request_id!r}: an emission of < 1 token")
    output_tokens = sum(n for _, n in emissions)
    if row.get("output_tokens", output_tokens) != output_tokens:
        raise EngineOutputError(
            f"request {request.request_id!r}: output_tokens {row['output_tokens']} != "
            f"{output_tokens} tokens in emissions"
        )
    if "prompt_tokens" not in row:
        raise EngineOutputError(f"request {request.request_id!r}: row has no prompt_tokens")

    def seconds(ns: int) -> float:
        return (ns - t0) / 1e9

    record = {
        "request_id": request.request_id,
        "prompt_id": request.prompt_id,
        "category": request.conversation.get("category"),
        "turn": request.turn,
        "warmup": request.warmup,
        "prompt_tokens": row["prompt_tokens"],
        "output_tokens": output_tokens,
        "arrival_s": seconds(arrival),
        "start_s": seconds(start),
        "first_token_s": seconds(times[0]),
        "finish_s": seconds(times[-1]),
        "emissions": [[seconds(t), n] for t, n in emissions],
    }
    record.update({key: row[key] for key in _ROW_FIELDS if row.get(key) is not None})
    return record


class BatchServer:
    """Static batching: `engine(batch)` serves up to `batch_size` requests at once, start to
    finish (our engine, transformers' generate()); a step is the whole batch. With a
    `reference` engine, each step serves the batch with both, one after the other, the
    reference first on every other step (so that order effects cancel); the reference's
    results collect in `reference_done`."""

    def __init__(self, engine: Callable[[list[Request]], list[dict]], batch_size: int, clock: Callable[[], int],
                 reference: Callable[[list[Request]], list[dict]] | None = None):
        self.engine, self.batch_size, self.clock, self.reference = engine, batch_size, clock, reference
        self.batch: list[tuple[Request, int]] = []
        self.reference_done: list[tuple[Request, dict, int, int]] = []
        self.steps = 0

    def free_slots(self) -> int:
        return self.batch_size - len(self.batch)

    def add(self, request: Request, arrival: int) -> None:
        self.batch.append((request, arrival))

    def busy(self) -> bool:
        return bool(self.batch)

    def step(self) -> list[tuple[Request, dict, int, int]]:
        """Run the batch: [(request, row, arrival_ns, start_ns)] of the engine."""
        batch, self.batch = self.batch, []
        if self.reference is None:
            return self._serve(self.engine, batch)
        reference_first = self.steps % 2 == 1
        self.steps += 1
        if reference_first:
            self.reference_done += self._serve(self.reference, batch)
            return self._serve(self.engine, batch)
        done = self._serve(self.engine, batch)
        self.reference_done += self._serve(self.reference, batch)
        return done

    def _serve(self, engine, batch: list[tuple[Request, int]]) -> list[tuple[Request, dict, int, int]]:
        """An engine that tokenises before decoding reports `decode_start_ns`, so that
        templating stays outside the timed region."""
        start = self.clock()
        rows = engine([request for request, _ in batch])
        if len(rows) != len(batch):
            raise EngineOutputError(f"engine returned {len(rows)} rows for a batch of {len(batch)}")
        start = rows[0].get("decode_start_ns", start) if rows else start
        return [(request, row, arrival, start) for (request, arrival), row in zip(batch, rows)]


class Window(Protocol):
    """The measured window as the load generator reports it: `begin` just before t0, `end`
    after the last measured request (the power monitor's window is the throughput window),
    and each measured record as it finishes."""

    def begin(self) -> None: ...
    def end(self) -> None: ...
    def finished(self, record: dict) -> None: ...


class _Unwatched:
    def begin(self) -> None:
        pass

    def end(self) -> None:
        pass

    def finished(self, record: dict) -> None:
        pass


@dataclass
class Served:
    """What a stream produced: the per-request records, warm-up first, and those of an
    interleaved AR reference (None without one)."""

    records: list[dict]
    reference: list[dict] | None = None


def run_load(stream: RequestStream, server: Server, window: Window | None = None, *,
             clock: Callable[[], int] = time.perf_counter_ns, sleep: Callable[[float], None] = time.sleep) -> Served:
    """Drive `server` in real time with `stream`; return the per-request records.

    The server's rows carry `emissions` [(clock ns, tokens)], `prompt_tokens` and optional
    counts (_ROW_FIELDS); emissions must be taken with the same `clock`. A request's start
    is when the engine takes it, and in the closed loop also its arrival. The first
    `stream.warmup` requests (first turns of the first conversations) run before the
    measured window, flagged `warmup: true`; their times are negative. `window` hears of the
    window's edges and of each measured record.

    A `BatchServer` with a `reference` serves every batch with it too, interleaved; closed
    loops only, where no arrival waits on it. Its records (same t0, schema and warm-up) are
    `Served.reference`.
    """
    interleaved = getattr(server, "reference", None) is not None
    if interleaved and stream.load.is_open:
        raise ValueError("an interleaved reference needs a closed load: it would delay an open load's arrivals")
    window = window or _Unwatched()
    planned = stream.schedule()
    closed = not stream.load.is_open

    warm_done = []
    warm_up = _conversations(stream.conversations, stream.warmup, warmup=True)
    _drive(server, [(0, i, request) for i, request in enumerate(warm_up)],
           closed=True, clock=clock, sleep=sleep, on_done=warm_done.append, later_turns=False)

    window.begin()
    t0 = clock()
    records = [_record(request, row, arrival, start, t0) for request, row, arrival, start in warm_done]

    def finished(done: tuple[Request, dict, int, int]) -> None:
        record = _record(*done, t0)
        records.append(record)
        window.finished(record)

    _drive(server, [(t0 + round(offset * 1e9), i, request) for i, (offset, request) in enumerate(planned)],
           closed=closed, clock=clock, sleep=sleep, on_done=finished)
    window.end()
    if not interleaved:
        return Served(records)
    # closed: arrival is start
    return Served(records, [_record(request, row, start, start, t0) for request, row, _, start in server.reference_done])


def _drive(server: Server, pending: list[tuple[int, int, Request]], *, closed: bool, clock, sleep, on_done,
           later_turns: bool = True) -> None:
    """Serve `pending` (arrival ns, order, first turn) and, with `later_turns`, every later
    turn, which arrives when the turn before it finishes (the warm-up serves first turns
    only); `on_done((request, row, arrival, start))` for each."""
    order = itertools.count(len(pending))
    heapq.heapify(pending)
    queue: deque[tuple[int, Request]] = deque()
    while pending or queue or server.busy():
        now = clock()
        while pending and pending[0][0] <= now:
            arrival, _, request = heapq.heappop(pending)
            queue.append((arrival, request))
        while queue and server.free_slots():
            arrival, request = queue.popleft()
            server.add(request, arrival)
        if not server.busy():
            sleep((pending[0][0] - now) / 1e9)
            continue
        for request, row, arrival, start in server.step():
            on_done((request, row, start if closed else arrival, start))
            if later_turns and not request.is_last_turn:
                heapq.heappush(pending, (row["emissions"][-1][0], next(order), request.follow_up(row)))


# --------------------------------------------------------------------- progress


class RequestProgress:
    """Requests done, output tokens/s so far and ETA: a rich bar on a terminal (unless `bar`
    is False), else a line at most every `log_every_s` and one at the end."""

    def __init__(
        self,
        total: int | None,
        description: str,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        log_every_s: float = 10.0,
        bar: bool | None = None,
    ):
        self.total, self.description = total, description
        self.done = self.tokens = 0
        self._clock, self._log_every_s = clock, log_every_s
        self._started = self._last_line = clock()
        self._console = Console(file=stream or sys.stderr)
        self._bar = self._task = None
        if self._console.is_terminal if bar is None else bar:
            self._bar = rp.Progress(
                rp.TextColumn("{task.description}"),
                rp.BarColumn(),
                rp.MofNCompleteColumn(),
                rp.TextColumn("{task.fields[tok_s]:.1f} tok/s"),
                rp.TimeRemainingColumn(),
                console=self._console,
            )
            self._task = self._bar.add_task(description, total=total, tok_s=0.0)
            self._bar.start()

    def tokens_per_s(self) -> float:
        elapsed = self._clock() - self._started
        return self.tokens / elapsed if elapsed > 0 else 0.0

    def eta_s(self) -> float | None:
        if not self.total or not self.done:
            return None
        return (self._clock() - self._started) / self.done * (self.total - self.done)

    def line(self) -> str:
        eta = self.eta_s()
        total = "?" if self.total is None else self.total
        return (
            f"{self.description}: {self.done}/{total} requests, {self.tokens_per_s():.1f} tok/s, "
            f"ETA {'?' if eta is None else f'{eta:.0f} s'}"
        )

    def update(self, record: dict) -> None:
        self.done += 1
        self.tokens += record["output_tokens"]
        if self._bar is not None:
            self._bar.update(self._task, advance=1, tok_s=self.tokens_per_s())
            return
        now = self._clock()
        if now - self._last_line >= self._log_every_s or self.done == self.total:
            self._last_line = now
            self._console.print(self.line(), markup=False, highlight=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


@contextmanager
def progress(total: int | None, description: str, stream: TextIO | None = None, **options) -> Iterator[RequestProgress]:
    """`with progress(n, "cell") as bar: ...` (`bar.update(record)` for each record)."""
    bar = RequestProgress(total, description, stream, **options)
    try:
        yield bar
    finally:
        bar.close()
