"""How models' linear layers run on the CPU: float32 ones in our engine, bfloat16 ones everywhere.

Decoding multiplies each weight by 1 .. a few dozen rows. On CPUs where PyTorch uses MKL,
`F.linear` (x @ W.T) picks a gemv for one row and a poor gemm for 2-5 rows: measured on the
project's 2-core machine, the SmolLM2 lm_head (49152 x 576) took 10 ms for one row and
19 ms for five, against 2.9 ms and 5.3 ms as `W @ x.T` with at least two columns. A target
forward drops from 56 to 30 ms, a five-token verification from 73 to 49 ms. The same
weights and the same arithmetic, only another BLAS call order. Whether it is faster is
measured on a whole one-token forward of the batch's rows (a small weight timed alone sits
in the cache and misleads), so a CPU where the library's choice is better keeps it. Prompt
prefills (more than `MAX_ROWS` rows) always use `F.linear`. transformers' own
`generate()` (the peer rows) never runs under this context. The choice is made once per
model, dtype and batch size by the workflow's `choose_kernels` job (`probe`), and every cell
of that setup applies it (`choose`): measured in each cell apart, a busy moment made AR and
speculative cells of one setup run different kernels. A model given no choice is probed
when it is loaded (`tuned_linears`), never inside a measured request.

bfloat16 linear layers on the CPU take another route (`prepack_bfloat16_linears`): oneDNN
reorders a weight into its own blocked layout on every `F.linear` call; reordering once at
load, as torch.compile's CPU freezing pass does, took a SmolLM2 bf16 one-token forward from
35 to 27 ms and a two-token one (the drafter's step after a full acceptance) from 75 to
31 ms, with bit-identical logits. It replaces the layers for good (the packed weight is the
only copy kept), so whoever runs the model, our engine or transformers', runs the same one.
"""

from __future__ import annotations

import ctypes
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


class PrepackedLinear(nn.Module):
    """A bfloat16 CPU `nn.Linear` whose weight oneDNN has reordered once for its matmuls."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        # The 1 is oneDNN's hint of the rows to expect; any count runs (timed the same for 1-128).
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), 1))
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, oneDNN prepacked"


def bf16_prepacking_supported() -> bool:
    """Whether this CPU runs oneDNN bfloat16 matmuls (where prepacking applies)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def prepack_bfloat16_linears(model) -> int:
    """Replace the bfloat16 `nn.Linear` layers of a model held wholly on the CPU by
    `PrepackedLinear`s, where this CPU runs oneDNN bfloat16 (a model spread over devices is
    left alone). Returns the number of layers replaced.

    An lm_head tied to the embeddings gets a packed copy of its own (56 MB for SmolLM2,
    counted by `models.weight_bytes`): left plain, transformers' last-position slice of a
    multi-token forward sends it through a batched matmul that copies the whole weight,
    measured at 42 ms of a 74 ms two-token drafter forward."""
    if not (bf16_prepacking_supported() and all(p.device.type == "cpu" for p in model.parameters())):
        return 0
    replaced = 0
    # Parents only: a list holding the old layers would keep every plain weight alive to the end.
    parents = [m for m in model.modules() if any(type(c) is nn.Linear for c in m.children())]
    for parent in parents:
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16:
                setattr(parent, name, PrepackedLinear(child))
                replaced += 1
    if replaced:
        _return_freed_heap()
    return replaced


def _return_freed_heap() -> None:
    # glibc keeps the freed plain weights (chunks inside its heap) resident; measured on
    # SmolLM2, 190 MB stayed in RSS until malloc_trim handed the pages back.
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to hand back this way
        pass


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


def probe(model, rows: int = 1) -> dict:
    """Time a one-token forward of `rows` rows of `model` with the library's `F.linear` and
    with its float32 CPU layers as `W @ x.T` (about a dozen forwards): the choice is the
    latter when at least 10 % faster."""
    layers = _float32_cpu_linears(model)
    if not layers:
        return {"layers": 0, "rows": rows, "weight_major": False}
    ids = torch.zeros(rows, 1, dtype=torch.long, device=model_device(model))  # CPU layers, inputs anywhere
    with torch.inference_mode():
        library = _median_seconds(lambda: model(input_ids=ids))
        with _weight_major_forwards(layers):
            ours = _median_seconds(lambda: model(input_ids=ids))
    return {"layers": len(layers), "rows": rows, "library_s": library, "weight_major_s": ours,
            "weight_major": ours < 0.9 * library}


def choose(model, weight_major: bool) -> None:
    """Fix the kernel choice of `model` (a `probe` made elsewhere, for its whole setup)."""
    _weight_major_is_faster[model] = weight_major


def tuned_linears(model) -> list[nn.Linear]:
    """The float32 CPU linear layers of `model`, when it decodes faster with them as `W @ x.T`
    (the chosen way, else probed now at one row)."""
    layers = _float32_cpu_linears(model) if model is not None else []
    if layers and model not in _weight_major_is_faster:
        choose(model, probe(model)["weight_major"])
    return layers if layers and _weight_major_is_faster[model] else []


@contextmanager
def decode_kernels(*models):
    """Within the block, the given models' float32 CPU linear layers compute `W @ x.T` where
    that decodes faster; the models are unchanged afterwards. Yields the layers tuned. A
    model given twice (the target drafting for itself) is tuned once."""
    layers = [layer for model in dict.fromkeys(models) for layer in tuned_linears(model)]
    with _weight_major_forwards(layers):
        yield len(layers)
