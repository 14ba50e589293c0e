"""How our engine runs a model's float32 linear layers on the CPU during decoding.

Decoding multiplies each weight by 1 .. a few dozen rows. On CPUs where PyTorch uses MKL,
`F.linear` (x @ W.T) picks a gemv for one row and a poor gemm for 2-5 rows: measured on the
project's 2-core machine, the SmolLM2 lm_head (49152 x 576) took 10 ms for one row and
19 ms for five, against 2.9 ms and 5.3 ms as `W @ x.T` with at least two columns. A target
forward drops from 56 to 30 ms, a five-token verification from 73 to 49 ms. The same
weights and the same arithmetic, only another BLAS call order. Whether it is faster is
measured once per model on a whole one-token forward (a small weight timed alone sits in
the cache and misleads), so a CPU where the library's choice is better keeps it. Prompt
prefills (more than `MAX_ROWS` rows) always use `F.linear`. transformers' own
`generate()` (the peer rows) never runs under this context. The runner makes the choice
when it loads a cell's models (`tuned_linears`), so the timing never falls inside a
measured request.
"""

from __future__ import annotations

import statistics
import time
import weakref
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from .cache import model_device

MAX_ROWS = 64  # up to here (measured) W @ x.T is never slower than F.linear

_weight_major_is_faster: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weight_major(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    if rows > MAX_ROWS:
        return F.linear(x, module.weight, module.bias)
    columns = flat.expand(2, -1) if rows == 1 else flat  # one column would be a gemv again
    out = (module.weight @ columns.contiguous().T).T[:rows]
    if module.bias is not None:
        out = out + module.bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _float32_cpu_linears(model) -> list[nn.Linear]:
    return [
        m for m in model.modules()
        if type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
    ]


@contextmanager
def _weight_major_forwards(layers: list[nn.Linear]):
    # An instance-level `forward` shadows the class's (hooks still run); removed on exit.
    for layer in layers:
        layer.forward = partial(_weight_major, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _median_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def weight_major_is_faster(model, layers: list[nn.Linear]) -> bool:
    """Whether a one-token forward of `model` is at least 10 % faster with `layers` computing
    `W @ x.T` (timed once per model; about a dozen forwards)."""
    if model not in _weight_major_is_faster:
        ids = torch.zeros(1, 1, dtype=torch.long, device=model_device(model))  # CPU layers, inputs anywhere
        with torch.inference_mode():
            library = _median_seconds(lambda: model(input_ids=ids))
            with _weight_major_forwards(layers):
                ours = _median_seconds(lambda: model(input_ids=ids))
        _weight_major_is_faster[model] = ours < 0.9 * library
    return _weight_major_is_faster[model]


def tuned_linears(model) -> list[nn.Linear]:
    """The float32 CPU linear layers of `model`, when it decodes faster with them as `W @ x.T`."""
    layers = _float32_cpu_linears(model) if model is not None else []
    return layers if layers and weight_major_is_faster(model, layers) else []


@contextmanager
def decode_kernels(*models):
    """Within the block, the given models' float32 CPU linear layers compute `W @ x.T` where
    that decodes faster; the models are unchanged afterwards. Yields the layers tuned."""
    layers = [layer for model in models for layer in tuned_linears(model)]
    with _weight_major_forwards(layers):
        yield len(layers)
