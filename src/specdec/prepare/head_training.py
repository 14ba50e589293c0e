"""Training a learned head (EAGLE-3 or Medusa) for a target by self-distillation: the target
labels corpus text itself, teacher-forced (any text serves, one forward per batch, no
generation), and the head learns the target's own next tokens. Resumable after a kill.

EAGLE-3 (as SpecForge and vllm-project/speculators train it): the target's distribution over
a draft vocabulary of the corpus' most frequent tokens is the teacher; the training-time test
unrolls several draft steps on the head's own outputs, each step's loss weighted by
decay**step. Alignment (decoding/eagle3.py): slot j pairs the target's states at token j with
token j + 1; at test step k it holds the head's guess for token j + 1 + k and predicts token
j + 2 + k, whose target distribution is the target's output at position j + 1 + k. A query of
step k at slot j sees the real slots 0 .. j and its own earlier steps at slot j only.

Medusa: head i reads the target's final normed state at position j and learns the target's
choice at position j + 1 + i (the token j + 2 + i), by cross-entropy.

Both start from the target's own weights (the head's output layer and norm are the target's,
EAGLE-3's decoder layer is a copy of the target's last layer reading the last auxiliary state,
Medusa's residual blocks start as the identity), so the first steps already speak the
target's language. Acceptance on the held-out split is the head's top-1 agreement with the
target's greedy choice, per draft position: what a greedy verifier would accept.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import DynamicCache, LlamaConfig

from specdec.decoding.eagle3 import Eagle3Drafter, Eagle3Head, Eagle3Spec, default_aux_ids
from specdec.decoding.head_formats import save_eagle3, save_medusa
from specdec.decoding.medusa import MedusaDrafter, MedusaHeads, MedusaSpec
from specdec.gate.cells import HeadTraining
from specdec.io import atomic_open
from specdec.prepare import training_corpus

# Loss weight of unrolled step k is DECAY**k (SpecForge: 0.8).
DECAY = 0.8
# Warm-up of the learning rate, as a share of the budget's batches (SpecForge: 1.5 %).
WARMUP = 0.02
# The resumable state is saved at least this often, and at every evaluation.
SAVE_EVERY_S = 120.0


def draft_vocabulary(tokens: torch.Tensor, size: int, vocab_size: int) -> torch.Tensor:
    """The `size` target token ids seen most often in `tokens` (ties: the lower id), ascending."""
    counts = torch.bincount(tokens.flatten(), minlength=vocab_size).double()
    counts -= torch.arange(vocab_size, dtype=torch.double) / vocab_size  # ties go to the lower id
    return counts.topk(min(size, vocab_size)).indices.sort().values


def _decoder(target):
    """The target's decoder stack (layers, final norm) and output layer."""
    return target.get_decoder(), target.get_output_embeddings()


def new_eagle3(target, draft_ids: torch.Tensor, aux_ids: tuple[int, ...] | None = None) -> Eagle3Drafter:
    """An EAGLE-3 head for `target` over the draft vocabulary `draft_ids` (ascending), its
    layer shaped like the target's and its embedding the target's, started from the target's
    weights (the module's docstring)."""
    text = target.config.get_text_config()
    fields = {k: v for k, v in text.to_dict().items() if k not in ("architectures", "model_type")}
    layer = LlamaConfig(**{**fields, "num_hidden_layers": 1, "attn_implementation": "sdpa"})
    ids = tuple(sorted(aux_ids or default_aux_ids(text.num_hidden_layers)))
    head = Eagle3Head(Eagle3Spec(layer, ids, len(draft_ids), text.hidden_size), target.get_input_embeddings())
    embedding = target.get_input_embeddings().weight
    head.to(device=embedding.device, dtype=embedding.dtype)
    head.d2t.copy_(draft_ids - torch.arange(len(draft_ids), device=draft_ids.device))
    head.t2d.zero_()
    head.t2d[draft_ids] = True
    _start_eagle3_from(head, target, draft_ids)
    return Eagle3Drafter(head)


@torch.no_grad()
def _start_eagle3_from(head: Eagle3Head, target, draft_ids: torch.Tensor) -> None:
    decoder, output = _decoder(target)
    last = decoder.layers[-1]
    width = head.spec.target_hidden_size
    head.norm.load_state_dict(decoder.norm.state_dict())
    head.lm_head.weight.copy_(output.weight[draft_ids])
    head.fc.weight.zero_()
    head.fc.weight[:, -width:] = torch.eye(width)  # the last auxiliary state, as it is
    mid = head.midlayer
    for name in ("post_attention_layernorm", "mlp"):
        getattr(mid, name).load_state_dict(getattr(last, name).state_dict())
    mid.input_layernorm.load_state_dict(last.input_layernorm.state_dict())
    mid.hidden_norm.load_state_dict(last.input_layernorm.state_dict())
    mid.self_attn.o_proj.load_state_dict(last.self_attn.o_proj.state_dict())
    for name in ("q_proj", "k_proj", "v_proj"):
        mine, theirs = getattr(mid.self_attn, name), getattr(last.self_attn, name)
        mine.weight.zero_()
        mine.weight[:, width:] = theirs.weight  # the state half; the token half learns
        if mine.bias is not None:
            mine.bias.copy_(theirs.bias)


def new_medusa(target, num_heads: int) -> MedusaDrafter:
    """Medusa heads for `target` (one residual block each), started as the identity with the
    target's output layer."""
    text = target.config.get_text_config()
    heads = MedusaHeads(MedusaSpec(text.hidden_size, text.vocab_size, num_heads, 1))
    embedding = target.get_input_embeddings().weight
    heads.to(device=embedding.device, dtype=embedding.dtype)
    with torch.no_grad():
        for block, lm_head in zip(heads.blocks, heads.lm_heads):
            block.layers[0].weight.zero_()
            lm_head.weight.copy_(_decoder(target)[1].weight)
    return MedusaDrafter(heads, text.num_hidden_layers)


@dataclass
class Lesson:
    """What the target teaches on a left-padded batch: the hidden states the head reads
    (B, T, k*H), the tokens and which are real (B, T), its greedy choice at every position
    (B, T), and, for EAGLE-3, its distribution over the draft vocabulary (B, T, D)."""

    states: torch.Tensor
    tokens: torch.Tensor
    valid: torch.Tensor
    choice: torch.Tensor
    teacher: torch.Tensor | None


def teach(target, drafter, tokens: torch.Tensor, attention_mask: torch.Tensor) -> Lesson:
    """One teacher-forced target forward: states and labels from the same pass."""
    ids = list(drafter.hidden_ids)
    with torch.no_grad():
        out = target(input_ids=tokens, attention_mask=attention_mask, output_hidden_states=ids)
        states = torch.cat([out.hidden_states[i] for i in ids], dim=-1)
        teacher = None
        if isinstance(drafter, Eagle3Drafter):
            teacher = torch.softmax(out.logits[..., drafter.head.target_ids()].float(), dim=-1)
    return Lesson(states, tokens, attention_mask.bool(), out.logits.argmax(-1), teacher)


@dataclass
class Scores:
    """A batch's training loss and, per draft position, the head's greedy agreements with the
    target over the positions that have a label."""

    loss: torch.Tensor
    agreed: list[int]
    counted: list[int]


def eagle3_scores(head: Eagle3Head, lesson: Lesson, steps: int) -> Scores:
    """The decay-weighted cross-entropy of `steps` unrolled draft steps against the target's
    distribution (each step's mean over the slots whose label exists), and agreements."""
    batch, width = lesson.tokens.shape
    device = lesson.tokens.device
    slots = torch.arange(width, device=device)
    diagonal = torch.eye(width, dtype=torch.bool, device=device).expand(batch, -1, -1)
    # (B, T, T) the real context; a left pad's slot sees itself, so no query row is empty (NaN)
    causal = (slots[None, :] <= slots[:, None])[None] & lesson.valid[:, None, :] | diagonal
    positions = (lesson.valid.cumsum(1) - 1).clamp(min=0)
    tokens = torch.cat([lesson.tokens[:, 1:], lesson.tokens[:, -1:]], dim=1)  # slot j: token j + 1
    state, cache, mask = head.fc(lesson.states), DynamicCache(config=head.config), causal
    total, agreed, counted = torch.zeros((), device=device), [], []
    for step in range(steps):
        label = step + 1  # slot j's label: the target's output at position j + 1 + step
        if label >= width:
            break
        logits, state = head(tokens, mask[:, None], positions + step, cache, state)
        kept = lesson.valid[:, :-label] & lesson.valid[:, label:]
        log_q = torch.log_softmax(logits[:, :-label].float(), dim=-1)
        total = total + DECAY**step * (-(lesson.teacher[:, label:] * log_q).sum(-1))[kept].mean()
        guesses = head.target_ids()[logits.argmax(-1)].detach()
        agreed.append(int((guesses[:, :-label] == lesson.choice[:, label:])[kept].sum()))
        counted.append(int(kept.sum()))
        tokens = guesses
        mask = torch.cat([mask, diagonal], dim=2)
    return Scores(total, agreed, counted)


def medusa_scores(heads: MedusaHeads, lesson: Lesson) -> Scores:
    """Each head's cross-entropy against the target's choice i + 1 positions on (summed), and
    agreements."""
    total, agreed, counted = torch.zeros((), device=lesson.states.device), [], []
    width = lesson.tokens.shape[1]
    for i, logits in enumerate(heads(lesson.states, heads.spec.num_heads)):
        label = i + 1
        if label >= width:
            break
        kept = lesson.valid[:, :-label] & lesson.valid[:, label:]
        guesses = logits[:, :-label]
        total = total + torch.nn.functional.cross_entropy(guesses[kept].float(), lesson.choice[:, label:][kept])
        agreed.append(int((guesses.argmax(-1) == lesson.choice[:, label:])[kept].sum()))
        counted.append(int(kept.sum()))
    return Scores(total, agreed, counted)


def scores(drafter, lesson: Lesson, steps: int) -> Scores:
    if isinstance(drafter, Eagle3Drafter):
        return eagle3_scores(drafter.head, lesson, steps)
    return medusa_scores(drafter.heads, lesson)


def trained_parameters(drafter) -> list[torch.nn.Parameter]:
    """What training updates: all of an EAGLE-3 head but the target's shared embedding; of
    Medusa, the residual blocks (its output layers stay the target's: updating 3 x 28 M
    parameters of SmolLM2's vocabulary would cost most of a CPU budget)."""
    frozen = ("embed_tokens.", "lm_heads.")
    return [p for name, p in drafter.module.named_parameters() if not name.startswith(frozen)]


def evaluate(drafter, lessons: list[Lesson], steps: int) -> dict:
    """Held-out loss (mean over batches) and acceptance per draft position."""
    net = drafter.module
    net.eval()
    with torch.no_grad():
        results = [scores(drafter, lesson, steps) for lesson in lessons]
    positions = max(len(r.agreed) for r in results)
    agreed = [sum(r.agreed[k] for r in results if k < len(r.agreed)) for k in range(positions)]
    counted = [sum(r.counted[k] for r in results if k < len(r.counted)) for k in range(positions)]
    return {"held_out_loss": sum(float(r.loss) for r in results) / len(results),
            "acceptance": [a / c if c else None for a, c in zip(agreed, counted)]}


@dataclass
class Progress:
    """Where a run stands; saved with the head's and the optimiser's state to resume."""

    batch: int = 0
    tokens: int = 0
    seconds: float = 0.0
    curve: list = dataclasses.field(default_factory=list)
    resumed: int = 0


def train_head(target, tokenizer, kind: str, training: HeadTraining, seed: int, prompts: dict[str, list[dict]],
               out: Path, state_file: Path, report: Callable[[int, int], None] = lambda done, total: None,
               log: Callable[[str], None] = print) -> dict:
    """Train a `kind` head for `target` as `training` says, never on text that shares a prompt
    with `prompts` (dataset -> prompt records); write it to `out` (vLLM's format) and return
    the training record. `state_file` holds the resumable state (kept after a kill, removed
    once the head is written); `report(tokens done, budget)` follows progress."""
    torch.manual_seed(seed)
    split = training_corpus.split(training, tokenizer, target, seed, prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    vocab = target.config.get_text_config().vocab_size
    if kind == "eagle3":
        draft_ids = draft_vocabulary(training_corpus.all_tokens(split.training), training.draft_vocab, vocab)
        drafter = new_eagle3(target, draft_ids)
    else:
        drafter = new_medusa(target, training.num_heads)
    net = drafter.module
    target.requires_grad_(False)
    trained = trained_parameters(drafter)
    optimizer = torch.optim.AdamW(trained, lr=training.lr)
    batches = list(training_corpus.batches(split.training, training.batch_size, pad))
    warmup = max(1, int(WARMUP * len(batches)))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / warmup))
    held_out = [teach(target, drafter, tokens, mask) for tokens, mask in
                training_corpus.batches(split.held_out, training.batch_size, pad)]
    fingerprint = json.dumps({"kind": kind, "training": dataclasses.asdict(training), "seed": seed,
                              "sequences": len(split.training)}, sort_keys=True)
    progress = _resume(state_file, fingerprint, net, optimizer, schedule, log) or Progress()
    if not progress.curve:
        progress.curve.append({"tokens": 0, "seconds": 0.0, "train_loss": None, **evaluate(drafter, held_out, training.steps)})
    budget = training_corpus.token_count(split.training)
    marks = [budget * (k + 1) // training.evaluations for k in range(training.evaluations)]
    started, saved, losses = time.monotonic() - progress.seconds, time.monotonic(), []
    deadline = training.max_minutes * 60 if training.max_minutes else None
    for tokens, mask in batches[progress.batch :]:
        net.train()
        loss = scores(drafter, teach(target, drafter, tokens, mask), training.steps).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        progress.batch += 1
        progress.tokens += int(mask.sum())
        progress.seconds = time.monotonic() - started
        report(progress.tokens, budget)
        out_of_time = deadline is not None and progress.seconds >= deadline
        due = len(progress.curve) <= len(marks) and progress.tokens >= marks[len(progress.curve) - 1]
        if due or out_of_time:
            point = evaluate(drafter, held_out, training.steps)
            progress.curve.append({"tokens": progress.tokens, "seconds": round(progress.seconds, 1),
                                   "train_loss": sum(losses) / len(losses), **point})
            log(f"{progress.tokens:,} tokens, {progress.seconds:.0f} s: train loss {progress.curve[-1]['train_loss']:.3f}, "
                f"held-out loss {point['held_out_loss']:.3f}, acceptance {[round(a, 3) for a in point['acceptance'] if a is not None]}")
            losses = []
        if out_of_time:
            log(f"max_minutes {training.max_minutes} reached after {progress.tokens:,} of {budget:,} tokens")
            break
        if due or time.monotonic() - saved >= SAVE_EVERY_S:
            _save_state(state_file, fingerprint, net, optimizer, schedule, progress)
            saved = time.monotonic()
    net.eval()
    if kind == "eagle3":
        save_eagle3(drafter, out)
    else:
        save_medusa(drafter, out)
    state_file.unlink(missing_ok=True)
    return {
        "kind": kind, "parameters": sum(p.numel() for p in trained),
        "corpus": {"sources": list(training.corpus) if training.path is None else [training.path],
                   "documents": split.documents, "held_out_tokens": training_corpus.token_count(split.held_out),
                   "seconds": round(split.seconds, 1),
                   "excluded_datasets": sorted(prompts)},
        "draft_vocab": drafter.head.spec.draft_vocab_size if kind == "eagle3" else vocab,
        "tokens": progress.tokens, "seconds": round(progress.seconds, 1),
        "tokens_per_s": round(progress.tokens / progress.seconds, 1) if progress.seconds else None,
        "resumed": progress.resumed, "curve": progress.curve,
    }


def _save_state(path: Path, fingerprint: str, net, optimizer, schedule, progress: Progress) -> None:
    state = {"fingerprint": fingerprint, "head": net.state_dict(), "optimizer": optimizer.state_dict(),
             "schedule": schedule.state_dict(), "progress": json.dumps(dataclasses.asdict(progress))}
    with atomic_open(path, "wb") as handle:
        torch.save(state, handle)


def _resume(path: Path, fingerprint: str, net, optimizer, schedule, log) -> Progress | None:
    """The progress of an interrupted run of the same settings, its state loaded; else None."""
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=True)  # tensors and plain data only: no pickled code
    if state.get("fingerprint") != fingerprint:
        log(f"{path}: a run of other settings; starting afresh")
        return None
    net.load_state_dict(state["head"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    progress = Progress(**json.loads(state["progress"]))
    progress.resumed += 1
    log(f"resuming after {progress.tokens:,} tokens ({progress.seconds:.0f} s) from {path}")
    return progress
