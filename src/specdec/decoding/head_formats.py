"""Learned draft heads' checkpoints: EAGLE-3 in vLLM's form and in the speculators form, and
Medusa, read into drafters for a given target and written back; a head that does not fit its
target is refused, naming the field.

A head is a folder: `config.json` and `model.safetensors` (safetensors only: loading runs no
code). A local folder and a hub id go through the same code, the hub's through
huggingface_hub's cached download of those two kinds of file. The forms, as vLLM 0.32 and
vllm-project/speculators load them:
- EAGLE-3, vLLM: a Llama config (`num_hidden_layers` 1, `vocab_size` the target's) with
  `architectures` `LlamaForCausalLMEagle3` (or `Eagle3LlamaForCausalLM`), `draft_vocab_size`,
  `target_hidden_size`, `eagle_config: {eagle_aux_hidden_state_layer_ids, use_aux_hidden_state}`;
  weights `fc`, `midlayer.*`, `norm`, `lm_head`, `d2t` (target id = i + d2t[i]), `t2d`, and
  `embed_tokens` only when the head does not share the target's.
- EAGLE-3, speculators: `speculators_model_type: eagle3`, `architectures: [Eagle3Speculator]`,
  the Llama config as `transformer_layer_config`, the EAGLE fields at the top level and a
  `speculators_config` naming the verifier; weights as above with `layers.0.*` for `midlayer.*`.
  Read as vLLM reads it: `norm_before_residual` absent means true.
- Medusa: `architectures: [MedusaModel]`, `model_type: medusa`, `hidden_size`, `vocab_size`,
  `num_heads`, `num_hidden_layers` (blocks per head); weights `blocks.{i}.layers.{l}.weight`
  and `lm_heads.{i}.weight`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from transformers import LlamaConfig

from ..io import atomic_open, write_json
from .drafters import Drafter
from .eagle3 import Eagle3Drafter, Eagle3Head, Eagle3Spec, default_aux_ids
from .medusa import MedusaDrafter, MedusaHeads, MedusaSpec
from .trees import DynamicTree, TreeShape

KINDS = ("eagle3", "medusa")
EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")
WEIGHTS = "model.safetensors"


class HeadMismatch(ValueError):
    """A head checkpoint that cannot be read, or does not fit its target."""


def head_folder(source: str | Path) -> Path:
    """The folder holding a head: `source` itself when it is a local folder, else the hub id's
    cached snapshot (config.json and safetensors only; offline, the cache alone)."""
    if Path(source).is_dir():
        return Path(source)

    try:
        return Path(snapshot_download(repo_id=str(source), allow_patterns=["config.json", "*.safetensors"]))
    except (ValueError, OSError) as error:  # a malformed id; the hub's and the offline cache's misses
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise HeadMismatch(f"head {source}: not a local folder, and the hub snapshot failed: {first}") from None


def head_spec(source: str | Path, target_config, kind: str | None = None) -> tuple[Path, Eagle3Spec | MedusaSpec]:
    """The folder and the description of the head at `source` (folder or hub id), checked
    against the target's config without reading weights or building a model: the gate's
    check. `kind` ("eagle3", "medusa"): what the caller expects; another kind is refused."""
    folder = head_folder(source)
    config = _read_config(folder)
    found = _kind_of(config, kind, folder)
    if kind is not None and found != kind:
        raise HeadMismatch(f"{folder / 'config.json'}: a {found} head, not the {kind} head expected")
    text = target_config.get_text_config()
    return folder, eagle3_spec(config, text, folder) if found == "eagle3" else medusa_spec(config, text, folder)


def load_head(source: str | Path, target, kind: str | None = None, tree: TreeShape | DynamicTree | None = None) -> Drafter:
    """The drafter of the head at `source` (folder or hub id) for `target` (a transformers
    causal LM), on the target's device and dtype (`head_spec` checks it first), drafting
    `tree` (trees.py; None: chains)."""
    folder, spec = head_spec(source, target.config, kind)
    weights = _read_weights(folder)
    text = target.config.get_text_config()
    device, dtype = target.get_input_embeddings().weight.device, target.get_input_embeddings().weight.dtype
    if isinstance(spec, Eagle3Spec):
        head = Eagle3Head(spec, None if "embed_tokens.weight" in weights else target.get_input_embeddings())
        weights = {re.sub(r"^layers\.0\.", "midlayer.", k): v for k, v in weights.items()}
        if "d2t" not in weights and spec.draft_vocab_size == text.vocab_size:
            weights["d2t"] = torch.zeros(spec.draft_vocab_size, dtype=torch.long)
        _check_d2t(weights.get("d2t"), text.vocab_size, folder)
        weights.setdefault("t2d", _t2d(weights.get("d2t"), text.vocab_size))
        _load_weights(head, weights, folder, shared=() if head.own_embedding else ("embed_tokens.",))
        return Eagle3Drafter(head.to(device=device, dtype=dtype).eval(), tree)
    heads = MedusaHeads(spec)
    _load_weights(heads, {k.removeprefix("medusa_heads."): v for k, v in weights.items()}, folder)
    return MedusaDrafter(heads.to(device=device, dtype=dtype).eval(), text.num_hidden_layers, tree)


def eagle3_spec(config: dict, target_config, folder: Path) -> Eagle3Spec:
    """The head an EAGLE-3 config (either form) describes, checked against the target's
    (text) config: sizes, vocabulary, layer ids and the variants run here."""
    where = folder / "config.json"
    config = _from_speculators(config, where) if "speculators_config" in config else config
    eagle = config.get("eagle_config") or {}
    if eagle.get("use_aux_hidden_state", True) is not True:
        raise HeadMismatch(f"{where}: eagle_config.use_aux_hidden_state is false (an EAGLE-1 head): only EAGLE-3 is run here")
    for flag in ("norm_before_fc", "fc_norm"):
        if eagle.get(flag, config.get(flag, False)):
            raise HeadMismatch(f"{where}: {flag} is true: that EAGLE-3 variant is not run here")
    if config.get("model_type", "llama") != "llama":
        raise HeadMismatch(f"{where}: model_type {config['model_type']!r}: only Llama-layer EAGLE-3 heads are run here")
    if config.get("num_hidden_layers", 1) != 1:
        raise HeadMismatch(f"{where}: num_hidden_layers {config['num_hidden_layers']}: only one-layer heads are run here")
    layers = target_config.num_hidden_layers
    ids = eagle.get("eagle_aux_hidden_state_layer_ids", config.get("eagle_aux_hidden_state_layer_ids"))
    ids = default_aux_ids(layers) if ids is None else ids
    if len(set(ids)) != len(ids) or not all(isinstance(i, int) and 0 <= i < layers for i in ids):
        raise HeadMismatch(f"{where}: eagle_aux_hidden_state_layer_ids {list(ids)} must be distinct layer ids "
                           f"in 0 .. {layers - 1} (the target has {layers} layers)")
    target_hidden = config.get("target_hidden_size") or config.get("hidden_size")
    vocab = config.get("vocab_size")
    _same(where, "target_hidden_size", target_hidden, "hidden_size", target_config.hidden_size)
    _same(where, "hidden_size", config.get("hidden_size"), "hidden_size", target_config.hidden_size)
    _same(where, "vocab_size", vocab, "vocab_size", target_config.vocab_size)
    draft_vocab = config.get("draft_vocab_size") or vocab
    if not 0 < draft_vocab <= vocab:
        raise HeadMismatch(f"{where}: draft_vocab_size {draft_vocab} must be in 1 .. vocab_size {vocab}")
    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "eagle_config", "draft_vocab_size",
                                                           "target_hidden_size", "norm_before_residual", "norm_output",
                                                           "eagle_aux_hidden_state_layer_ids")}
    layer = LlamaConfig(**{**fields, "num_hidden_layers": 1, "attn_implementation": "sdpa"})
    return Eagle3Spec(layer, tuple(sorted(ids)), draft_vocab, target_hidden,
                      bool(config.get("norm_before_residual", False)), bool(config.get("norm_output", False)))


def medusa_spec(config: dict, target_config, folder: Path) -> MedusaSpec:
    """The heads a Medusa config describes, checked against the target's (text) config.
    Counts named like `medusa_num_heads` / `medusa_num_layers` are read as vLLM reads them."""
    where = folder / "config.json"
    for key in list(config):
        if "num" in key and "heads" in key:
            config["num_heads"] = config.pop(key)
        elif "num" in key and "layers" in key:
            config["num_hidden_layers"] = config.pop(key)
    _same(where, "hidden_size", config.get("hidden_size"), "hidden_size", target_config.hidden_size)
    _same(where, "vocab_size", config.get("vocab_size"), "vocab_size", target_config.vocab_size)
    truncated = config.get("truncated_vocab_size")
    if truncated not in (None, config["vocab_size"]):
        raise HeadMismatch(f"{where}: truncated_vocab_size {truncated}: Medusa heads over a reduced vocabulary are not run here")
    for key in ("num_heads", "num_hidden_layers"):
        if not isinstance(config.get(key), int) or config[key] < 1:
            raise HeadMismatch(f"{where}: {key} must be an integer >= 1, got {config.get(key)!r}")
    return MedusaSpec(config["hidden_size"], config["vocab_size"], config["num_heads"], config["num_hidden_layers"],
                      bool(config.get("medusa_fc_bias", False)))


EAGLE3_FORMS = ("llama_eagle3", "speculators")  # vLLM's LlamaForCausalLMEagle3, and the speculators library's


def save_eagle3(drafter: Eagle3Drafter, folder: Path, form: str = "llama_eagle3", verifier: str | None = None,
                speculative_tokens: int = 3) -> Path:
    """Write an EAGLE-3 head in one of `EAGLE3_FORMS` (`verifier`: the target's name or path,
    which the speculators form records). Weights first, config.json last: a folder with a
    config is complete."""
    if form not in EAGLE3_FORMS:
        raise ValueError(f"EAGLE-3 form must be one of {EAGLE3_FORMS}, got {form!r}")
    head = drafter.head
    spec = head.spec
    weights = {k: v for k, v in head.state_dict().items() if head.own_embedding or not k.startswith("embed_tokens.")}
    if form == "speculators":
        weights = {re.sub(r"^midlayer\.", "layers.0.", k): v for k, v in weights.items()}
    layer = {k: v for k, v in spec.layer.to_dict().items() if k not in ("architectures", "attn_implementation")}
    eagle = {"draft_vocab_size": spec.draft_vocab_size, "target_hidden_size": spec.target_hidden_size,
             "norm_before_residual": spec.norm_before_residual, "norm_output": spec.norm_output}
    if form == "speculators":
        config = {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3", "transformer_layer_config": layer,
                  **eagle, "eagle_aux_hidden_state_layer_ids": list(spec.aux_ids),
                  "speculators_config": {"algorithm": "eagle3", "default_proposal_method": "greedy",
                                         "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": speculative_tokens}],
                                         "verifier": {"name_or_path": verifier, "architectures": ["LlamaForCausalLM"]}}}
    else:
        config = {**layer, "architectures": [EAGLE3_ARCHITECTURES[0]], **eagle,
                  "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(spec.aux_ids), "use_aux_hidden_state": True}}
    return _write(folder, weights, config)


def save_medusa(drafter: MedusaDrafter, folder: Path) -> Path:
    """Write Medusa heads as vLLM's `MedusaModel` loads them."""
    spec = drafter.heads.spec
    config = {"architectures": ["MedusaModel"], "model_type": "medusa", "hidden_size": spec.hidden_size,
              "vocab_size": spec.vocab_size, "num_heads": spec.num_heads, "num_hidden_layers": spec.num_layers,
              "truncated_vocab_size": spec.vocab_size, "medusa_fc_bias": spec.bias}
    return _write(folder, drafter.heads.state_dict(), config)


def _write(folder: Path, weights: dict, config: dict) -> Path:
    folder = Path(folder)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    with atomic_open(folder / WEIGHTS, "wb") as handle:
        handle.write(save(tensors))
    write_json(folder / "config.json", config)
    return folder


def _from_speculators(config: dict, where: Path) -> dict:
    """A speculators EAGLE-3 config in vLLM's form (as vLLM converts it)."""
    if config.get("speculators_model_type") != "eagle3":
        raise HeadMismatch(f"{where}: speculators_model_type {config.get('speculators_model_type')!r}: "
                           "only eagle3 heads are run here")
    layer = config.get("transformer_layer_config")
    if not isinstance(layer, dict):
        raise HeadMismatch(f"{where}: transformer_layer_config must be a mapping (the head's Llama config)")
    converted = {**layer, "architectures": [EAGLE3_ARCHITECTURES[0]], "norm_before_residual": config.get("norm_before_residual", True)}
    for key in ("draft_vocab_size", "target_hidden_size", "norm_before_fc", "fc_norm", "norm_output",
                "eagle_aux_hidden_state_layer_ids"):
        if config.get(key) is not None:
            converted[key] = config[key]
    return converted


def _kind_of(config: dict, expected: str | None, folder: Path) -> str:
    architectures = config.get("architectures") or []
    if "speculators_config" in config or any(a in EAGLE3_ARCHITECTURES for a in architectures):
        return "eagle3"
    if "MedusaModel" in architectures or config.get("model_type") == "medusa":
        return "medusa"
    if expected == "eagle3" and architectures == ["LlamaForCausalLM"]:
        return "eagle3"  # vLLM renames a plain Llama head when told the method is eagle3
    raise HeadMismatch(f"{folder / 'config.json'}: architectures {architectures} is no head run here "
                       f"(EAGLE-3: {', '.join(EAGLE3_ARCHITECTURES)} or a speculators config; Medusa: MedusaModel)")


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise HeadMismatch(f"{path}: missing (a head folder holds config.json and {WEIGHTS})") from None
    except json.JSONDecodeError as error:
        raise HeadMismatch(f"{path}: not JSON ({error})") from None
    if not isinstance(config, dict):
        raise HeadMismatch(f"{path}: must hold a JSON object")
    return config


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise HeadMismatch(f"{folder}: no *.safetensors weights (only safetensors are loaded: no pickles)")
    weights = {}
    for file in files:
        try:
            weights.update(load_file(file))
        except (SafetensorError, OSError) as error:
            raise HeadMismatch(f"{file}: unreadable safetensors ({error})") from None
    return weights


def _load_weights(module: torch.nn.Module, weights: dict, folder: Path, shared: tuple[str, ...] = ()) -> None:
    """Every tensor of `module` (but the `shared` ones, the target's) from `weights`, shapes
    checked; a missing or unknown tensor is refused by name."""
    expected = {k: v for k, v in module.state_dict().items() if not k.startswith(shared)}
    missing, unknown = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unknown:
        raise HeadMismatch(f"{folder}: weights do not fit the head its config describes: "
                           f"missing {missing[:4]}, unexpected {unknown[:4]}")
    for name, tensor in expected.items():
        if weights[name].shape != tensor.shape:
            raise HeadMismatch(f"{folder}: {name} has shape {list(weights[name].shape)}, "
                               f"the config says {list(tensor.shape)}")
    module.load_state_dict({k: weights[k] for k in expected}, strict=False)


def _check_d2t(d2t: torch.Tensor | None, vocab_size: int, folder: Path) -> None:
    if d2t is None:
        raise HeadMismatch(f"{folder}: no d2t, and the draft vocabulary is smaller than the target's: "
                           "its tokens cannot be mapped")
    ids = torch.arange(len(d2t)) + d2t
    if d2t.dtype != torch.long or len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size or len(ids.unique()) != len(ids)):
        raise HeadMismatch(f"{folder}: d2t must be int64 offsets mapping each draft entry to a distinct "
                           f"target token in 0 .. {vocab_size - 1}")


def _t2d(d2t: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """Which target tokens the draft vocabulary holds (vLLM does not read t2d; a checkpoint may omit it)."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    if d2t is not None:
        mask[torch.arange(len(d2t)) + d2t] = True
    return mask


def _same(where: Path, field: str, value, target_field: str, target_value) -> None:
    if value != target_value:
        raise HeadMismatch(f"{where}: {field} {value} does not fit the target ({target_field} {target_value})")
