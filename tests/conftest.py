import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a transformers folder (converted once)."""
    from specdec.models import convert_gguf, embedded_gguf_path

    out = REPO / "resources" / "models" / "smollm2-135m-instruct"
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(embedded_gguf_path(), out)
    return out


@pytest.fixture(scope="session")
def embedded_model(embedded_model_dir):
    """(model, tokenizer) in fp32 on the CPU, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32).eval()
    return model, tokenizer
