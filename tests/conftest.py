import contextlib
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a transformers folder (converted once)."""
    from specdec.prepare.models import prepare_embedded

    return prepare_embedded()


@pytest.fixture(scope="session")
def embedded_model(embedded_model_dir):
    """(model, tokenizer) in fp32 on the CPU, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32).eval()
    return model, tokenizer


TINY_CONFIG = {
    "seed": 3,
    "models": {"smollm2": {"source": "embedded"}},
    "drafters": {"int8": {"kind": "quantized", "dtype": "int8"}, "ngram": {"kind": "ngram", "n": 3}},
    "datasets": {"sample": {"source": "sample", "num_prompts": 2, "turns": "first"}},
    "experiments": {
        "tiny": {
            "target": "smollm2",
            "datasets": ["sample"],
            "methods": [
                {"method": "ar"},
                {"method": "speculative", "drafter": "int8", "gamma": 3},
                {"method": "ngram", "drafter": "ngram", "gamma": 3},
            ],
            "max_new_tokens": 8,
            "warmup": 1,
        }
    },
    "power": {"idle_s": 0},
    "aggregate": {"n_resamples": 200},
}


@pytest.fixture(scope="module")
def make_study(tmp_path_factory, embedded_model_dir):
    """make_study(config) -> a working directory with that config.yaml and the embedded model
    prepared (the test session's conversion stands in for the prepare_model rule)."""
    import yaml

    def make(config: dict) -> Path:
        workdir = tmp_path_factory.mktemp("study")
        (workdir / "config.yaml").write_text(yaml.safe_dump(config))
        (workdir / "resources" / "models").mkdir(parents=True)
        (workdir / "resources" / "models" / "smollm2").symlink_to(embedded_model_dir)
        return workdir

    return make


def cell_inputs(work: Path, embedded_model_dir: Path, dataset: dict, seed: int) -> tuple[Path, Path]:
    """What `runner.run_cell` reads, under `work`: a models folder holding the embedded model
    and a prompts file prepared from the `dataset` spec. Returns (models dir, prompts file)."""
    from specdec.prepare.datasets import prepare_dataset_file
    from specdec.prepare.models import load_tokenizer

    (work / "models").mkdir()
    (work / "models" / "smollm2").symlink_to(embedded_model_dir)
    prompts = work / "prompts.jsonl"
    prepare_dataset_file(dataset, load_tokenizer(str(embedded_model_dir)), prompts, seed=seed)
    return work / "models", prompts


def tiny_llama(folder: Path, vocab_size: int, tokenizer_of: Path | None = None) -> None:
    """A one-layer random Llama in `folder` (saved and loaded in a blink), with the tokenizer
    files of the model folder `tokenizer_of` when given."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja") if tokenizer_of else ():
        shutil.copy(Path(tokenizer_of) / name, Path(folder) / name)


def greedy_settings(tokenizer, max_new_tokens: int, gamma: int = 4):
    """Greedy GenerationSettings that stop at `tokenizer`'s EOS and pad with its pad token."""
    from specdec.decoding import GenerationSettings

    return GenerationSettings(max_new_tokens=max_new_tokens, eos_token_ids=(tokenizer.eos_token_id,),
                              pad_token_id=tokenizer.pad_token_id, gamma=gamma)


@contextlib.contextmanager
def static_caches(*models, max_length: int):
    """Decode `models` with static caches of `max_length` slots (eager) inside the block."""
    from specdec.decoding.cache import use_dynamic_cache, use_static_cache

    for model in models:
        use_static_cache(model, max_length)
    try:
        yield
    finally:
        for model in models:
            use_dynamic_cache(model)


def alias_bomb(depth: int = 9) -> str:
    """YAML of a few lines whose aliases stand for 9**depth values (a "billion laughs")."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, depth)]
    return "\n".join(lines) + "\n"


def run_snakemake(workdir: Path, *args: str, timeout: float | None = None, path: str | None = None):
    """Snakemake on the project's Snakefile in `workdir`, with this venv's tools on PATH
    (or with `path` as PATH)."""
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=path or f"{bin_dir}:{os.environ['PATH']}", HF_HUB_OFFLINE="1")
    command = [str(bin_dir / "snakemake"), "-s", str(REPO / "Snakefile"), *args]
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


def exact_joint(model, settings, prompt: list[int], length: int):
    """The model's exact distribution of its first `length` sampled tokens after `prompt`,
    flattened over (vocab,) * length."""
    import torch

    vocab = model.config.vocab_size
    sampler = settings.sampler(None)
    joint = torch.ones(1)
    prefixes = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(length):
            probs = sampler.probs(model(prefixes).logits[:, -1])  # (prefixes, vocab)
            joint = (joint.reshape(-1, 1) * probs).reshape(-1)
            prefixes = torch.cat([prefixes.repeat_interleave(vocab, 0), torch.arange(vocab).repeat(len(prefixes))[:, None]], 1)
    return joint


def chi_square_p(counts, expected_probs) -> float:
    """Pearson's test, pooling cells expected below 5 into one."""
    import torch

    n = counts.sum()
    expected = expected_probs.double() * n
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2))
