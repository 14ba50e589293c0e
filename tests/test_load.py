import io

import numpy as np
import pytest

import specdec.job.load as load_module
from specdec.gate.cells import Load
from specdec.job.load import (
    BatchServer,
    EngineOutputError,
    RequestStream,
    arrival_times,
    progress,
    run_load,
    schedule,
    total_requests,
)
from specdec.job.metrics import summarize

MS = 1_000_000  # ns


class FakeClock:
    """Nanoseconds that move only when the fake engine works or the scheduler sleeps."""

    def __init__(self, start_ns=5_000 * MS):
        self.ns = start_ns

    def __call__(self):
        return self.ns

    def sleep(self, seconds):
        assert seconds > 0
        self.ns += round(seconds * 1e9)


class FakeEngine:
    """Each batch: first token 100 ms after the call, a second token 100 ms later."""

    def __init__(self, clock):
        self.clock = clock
        self.batches = []
        self.requests = []

    def __call__(self, batch):
        self.batches.append([request.request_id for request in batch])
        self.requests.extend(batch)
        start = self.clock()
        self.clock.ns = start + 200 * MS
        return [
            {"emissions": [(start + 100 * MS, 1), (start + 200 * MS, 1)], "prompt_tokens": 7,
             "output_ids": [1, 2], "finish_reason": "length"}
            for _ in batch
        ]


def conv(name, turns=1):
    return {"id": name, "category": "test", "system": None,
            "turns": [f"{name} turn {i + 1}" for i in range(turns)]}


class Seen:
    """A `load.Window` that keeps the measured records it hears of."""

    def __init__(self):
        self.records, self.edges = [], []

    def begin(self):
        self.edges.append("begin")

    def end(self):
        self.edges.append("end")

    def finished(self, record):
        self.records.append(record)


def drive(conversations, load, batch_size, warmup=1, window=None):
    clock = FakeClock()
    engine = FakeEngine(clock)
    served = run_load(RequestStream(conversations, load, warmup=warmup), BatchServer(engine, batch_size, clock), window,
                      clock=clock, sleep=clock.sleep)
    assert served.reference is None
    return served.records, engine


@pytest.fixture
def arrivals(monkeypatch):
    """Replace the random open-loop arrivals by chosen ones (seconds after t0)."""

    def use(times):
        monkeypatch.setattr(load_module, "arrival_times", lambda load, seed: list(times))

    return use


OPEN = Load(mode="open", rate=10.0, num_requests=4)


def test_open_loop_queues_and_batches(arrivals):
    arrivals([0.0, 0.05, 0.1, 1.0])
    records, engine = drive([conv("a"), conv("b"), conv("c"), conv("d")], OPEN, 2, warmup=0)
    # a runs alone; b and c arrive while it runs and share the next batch; d comes later
    assert engine.batches == [["a#1"], ["b#1", "c#1"], ["d#1"]]
    by_id = {r["request_id"]: r for r in records}
    queue = {rid: r["start_s"] - r["arrival_s"] for rid, r in by_id.items()}
    assert queue == pytest.approx({"a#1": 0.0, "b#1": 0.15, "c#1": 0.1, "d#1": 0.0})
    ttft = {rid: r["first_token_s"] - r["arrival_s"] for rid, r in by_id.items()}
    assert ttft == pytest.approx({"a#1": 0.1, "b#1": 0.25, "c#1": 0.2, "d#1": 0.1})
    assert by_id["d#1"]["start_s"] == pytest.approx(1.0)  # the scheduler slept until d arrived
    assert [t for t, _ in by_id["a#1"]["emissions"]] == pytest.approx([0.1, 0.2])
    assert [n for _, n in by_id["a#1"]["emissions"]] == [1, 1]
    assert by_id["a#1"]["output_tokens"] == 2 and by_id["a#1"]["output_ids"] == [1, 2]
    metrics = summarize(records)
    assert metrics["window_s"] == pytest.approx(1.2)
    assert metrics["queue_s"]["mean"] == pytest.approx(0.25 / 4)


def test_closed_loop_arrival_is_batch_start():
    records, engine = drive([conv("a"), conv("b"), conv("c")], Load(mode="closed"), 2, warmup=0)
    assert engine.batches == [["a#1", "b#1"], ["c#1"]]
    for r in records:
        assert r["arrival_s"] == r["start_s"]
        assert r["first_token_s"] - r["arrival_s"] == pytest.approx(0.1)
    assert [r["start_s"] for r in records] == pytest.approx([0.0, 0.0, 0.2])


class FakeContinuousServer:
    """Continuous batching as vLLM does it: each step (100 ms) gives every request in the
    engine one token; a request of `tokens[prompt]` tokens leaves after that many steps."""

    def __init__(self, clock, slots, tokens):
        self.clock, self.slots, self.tokens = clock, slots, tokens
        self.running = {}
        self.most_in_flight = 0

    def free_slots(self):
        return self.slots - len(self.running)

    def add(self, request, arrival):
        self.running[request.request_id] = (request, arrival, self.clock(), [])
        self.most_in_flight = max(self.most_in_flight, len(self.running))

    def busy(self):
        return bool(self.running)

    def step(self):
        self.clock.ns += 100 * MS
        done = []
        for request_id, (request, arrival, start, emissions) in list(self.running.items()):
            emissions.append((self.clock(), 1))
            if len(emissions) == self.tokens[request.prompt_id]:
                del self.running[request_id]
                done.append((request, {"emissions": emissions, "prompt_tokens": 3}, arrival, start))
        return done


def test_a_continuous_server_takes_requests_as_slots_free(arrivals):
    arrivals([0.0, 0.0, 0.0, 0.05])
    clock = FakeClock()
    server = FakeContinuousServer(clock, slots=2, tokens={"a": 1, "b": 3, "c": 2, "d": 1})
    records = run_load(RequestStream([conv(n) for n in "abcd"], OPEN, warmup=0), server, clock=clock, sleep=clock.sleep).records
    by_id = {r["request_id"]: r for r in records}
    assert server.most_in_flight == 2
    # a leaves after one step and c takes its slot at once, without waiting for b (static batching would)
    assert by_id["c#1"]["start_s"] == pytest.approx(0.1)
    assert by_id["c#1"]["start_s"] - by_id["c#1"]["arrival_s"] == pytest.approx(0.1)  # queued behind a and b
    assert by_id["d#1"]["start_s"] == pytest.approx(0.3)  # b's slot frees after its third step
    assert by_id["b#1"]["first_token_s"] == pytest.approx(0.1) and by_id["b#1"]["finish_s"] == pytest.approx(0.3)
    assert [r["request_id"] for r in records] == ["a#1", "b#1", "c#1", "d#1"]


def test_warmup_serves_first_turns_only():
    records, engine = drive([conv("x", turns=2), conv("y")], Load(mode="closed"), 1, warmup=1)
    assert engine.batches == [["warmup:x#1"], ["x#1"], ["y#1"], ["x#2"]]
    assert [r["request_id"] for r in records if r["warmup"]] == ["warmup:x#1"]


def test_closed_loop_cycles_conversations_with_distinct_ids():
    records, _ = drive([conv("a"), conv("b")], Load(mode="closed", num_requests=3), 4, warmup=0)
    assert [r["request_id"] for r in records] == ["a#1", "b#1", "a@1#1"]
    assert [r["prompt_id"] for r in records] == ["a", "b", "a"]


def test_second_turn_arrives_when_first_finishes(arrivals):
    arrivals([0.0, 0.0])
    records, engine = drive([conv("x", turns=2), conv("y")],
                            Load(mode="open", rate=1.0, num_requests=2), 1, warmup=0)
    assert engine.batches == [["x#1"], ["y#1"], ["x#2"]]
    by_id = {r["request_id"]: r for r in records}
    assert by_id["x#2"]["arrival_s"] == pytest.approx(by_id["x#1"]["finish_s"])
    assert by_id["x#2"]["start_s"] - by_id["x#2"]["arrival_s"] == pytest.approx(0.2)  # behind y
    assert by_id["x#2"]["turn"] == 2
    second = engine.requests[2]
    assert second.message == "x turn 2" and second.history[0]["output_ids"] == [1, 2]


def test_warmup_runs_first_and_is_excluded():
    seen = Seen()
    records, engine = drive([conv("a"), conv("b"), conv("c")], Load(mode="closed"), 2, warmup=2, window=seen)
    assert engine.batches[0] == ["warmup:a#1", "warmup:b#1"]
    assert [r["warmup"] for r in records] == [True, True, False, False, False]
    assert records[0]["finish_s"] <= 0 <= records[2]["start_s"]  # before the measured window
    assert [r["request_id"] for r in seen.records] == ["a#1", "b#1", "c#1"] and seen.edges == ["begin", "end"]
    assert summarize(records)["num_requests"] == 3


def test_engine_row_count_mismatch_is_an_error():
    clock = FakeClock()
    with pytest.raises(EngineOutputError, match="1 rows for a batch of 2"):
        run_load(RequestStream([conv("a"), conv("b")], warmup=0), BatchServer(lambda batch: FakeEngine(clock)(batch)[:1], 2, clock),
                 clock=clock, sleep=clock.sleep)


def test_engine_token_count_must_match_emissions():
    clock = FakeClock()

    def engine(batch):
        rows = FakeEngine(clock)(batch)
        rows[0]["output_tokens"] = 5
        return rows

    with pytest.raises(EngineOutputError, match=r"'a#1'.*output_tokens 5"):
        run_load(RequestStream([conv("a")], warmup=0), BatchServer(engine, 1, clock), clock=clock, sleep=clock.sleep)


def test_arrival_times_seeded():
    load = Load(mode="open", rate=4.0, num_requests=50)
    assert arrival_times(load, seed=1) == arrival_times(load, seed=1)
    assert arrival_times(load, seed=1) != arrival_times(load, seed=2)
    assert len(arrival_times(load, seed=1)) == 50


def test_arrival_rate_and_burstiness():
    poisson = np.diff(arrival_times(Load(mode="open", rate=4.0, num_requests=4000), 0))
    bursty = np.diff(arrival_times(Load(mode="open", rate=4.0, num_requests=4000, arrival="gamma", burstiness=0.25), 0))
    assert poisson.mean() == pytest.approx(0.25, rel=0.05)
    assert bursty.mean() == pytest.approx(0.25, rel=0.1)
    # coefficient of variation of gamma gaps is 1/sqrt(shape): 1 for Poisson, 2 for shape 0.25
    assert poisson.std() / poisson.mean() == pytest.approx(1.0, rel=0.1)
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.15)


def test_duration_bounds_arrivals_and_schedule_counts_turns():
    times = arrival_times(Load(mode="open", rate=5.0, duration_s=10), seed=3)
    assert 0 < times[0] and times[-1] <= 10 and 30 < len(times) < 80
    planned = schedule([conv("x", turns=2)], Load(mode="open", rate=5.0, duration_s=10), 3)
    assert [t for t, _ in planned] == times
    assert total_requests(planned) == 2 * len(times)


def test_progress_logs_plain_lines_off_a_terminal():
    stream, now = io.StringIO(), [0.0]
    with progress(3, "cell", stream=stream, clock=lambda: now[0], log_every_s=10) as bar:
        now[0] = 1.0
        bar.update({"output_tokens": 10})  # too soon for a line
        now[0] = 12.0
        bar.update({"output_tokens": 14})
        now[0] = 15.0
        bar.update({"output_tokens": 6})
    assert stream.getvalue().splitlines() == [
        "cell: 2/3 requests, 2.0 tok/s, ETA 6 s",
        "cell: 3/3 requests, 2.0 tok/s, ETA 0 s",
    ]


class TerminalStream(io.StringIO):
    def isatty(self):
        return True


def test_progress_draws_a_bar_on_a_terminal():
    stream = TerminalStream()
    with progress(2, "cell", stream=stream) as bar:
        bar.update({"output_tokens": 10})
        bar.update({"output_tokens": 10})
    text = stream.getvalue()
    assert "2/2" in text and "tok/s" in text
    assert "requests," not in text  # the bar, not the plain log line
