"""Training an EAGLE-3 head for a target by self-distillation: the target labels its own
text (teacher-forced, so any corpus text serves), the head learns the target's distribution
over a draft vocabulary of the tokens the target emits most often, through EAGLE-3's
training-time test (the head drafts several steps on its own outputs, each step's loss
weighted by decay**step), as SpecForge and vllm-project/speculators train it.

Alignment (decoding/eagle3.py): slot j pairs the target's states at token j with token j + 1;
at test step k it holds the head's guess for token j + 1 + k and predicts token j + 2 + k,
whose target distribution is the target's output at position j + 1 + k. A query of step k at
slot j sees the real slots 0 .. j and its own earlier steps at slot j only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, LlamaConfig

from specdec.decoding.eagle3 import Eagle3Drafter, Eagle3Head, Eagle3Spec, default_aux_ids


def draft_vocabulary(tokens: torch.Tensor, size: int, vocab_size: int) -> torch.Tensor:
    """The `size` target token ids seen most often in `tokens` (ties: the lower id), ascending."""
    counts = torch.bincount(tokens.flatten(), minlength=vocab_size).double()
    counts -= torch.arange(vocab_size, dtype=torch.double) / vocab_size  # ties go to the lower id
    return counts.topk(size).indices.sort().values


def new_eagle3(target, draft_ids: torch.Tensor, aux_ids: tuple[int, ...] | None = None) -> Eagle3Drafter:
    """A freshly initialised EAGLE-3 head for `target` (its layer shaped like the target's
    layers, its embedding the target's) over the draft vocabulary `draft_ids` (ascending)."""
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
    return Eagle3Drafter(head)


@dataclass
class Lesson:
    """What the target teaches on a left-padded batch: its auxiliary states (B, T, k*H), the
    tokens (B, T), which are real (B, T), and its distribution over the draft vocabulary at
    every position (B, T, D)."""

    states: torch.Tensor
    tokens: torch.Tensor
    valid: torch.Tensor
    teacher: torch.Tensor


def teach(target, head: Eagle3Head, tokens: torch.Tensor, attention_mask: torch.Tensor) -> Lesson:
    """One teacher-forced target forward: states and labels from the same pass."""
    with torch.no_grad():
        out = target(input_ids=tokens, attention_mask=attention_mask, output_hidden_states=list(head.spec.aux_ids))
        states = torch.cat([out.hidden_states[i] for i in head.spec.aux_ids], dim=-1)
        teacher = torch.softmax(out.logits[..., head.target_ids()].float(), dim=-1)
    return Lesson(states, tokens, attention_mask.bool(), teacher)


def unrolled_loss(head: Eagle3Head, lesson: Lesson, steps: int = 3, decay: float = 0.8) -> torch.Tensor:
    """The decay-weighted cross-entropy of `steps` unrolled draft steps against the target's
    distribution, each step's mean over the slots whose label exists."""
    batch, width = lesson.tokens.shape
    device = lesson.tokens.device
    slots = torch.arange(width, device=device)
    diagonal = torch.eye(width, dtype=torch.bool, device=device).expand(batch, -1, -1)
    # (B, T, T) the real context; a left pad's slot sees itself, so no query row is empty (NaN)
    causal = (slots[None, :] <= slots[:, None])[None] & lesson.valid[:, None, :] | diagonal
    positions = (lesson.valid.cumsum(1) - 1).clamp(min=0)
    tokens = torch.cat([lesson.tokens[:, 1:], lesson.tokens[:, -1:]], dim=1)  # slot j: token j + 1
    state, cache, mask, total = head.fc(lesson.states), DynamicCache(config=head.config), causal, 0.0
    for step in range(steps):
        logits, state = head(tokens, mask[:, None], positions + step, cache, state)
        label = step + 1  # slot j's label: the target's output at position j + 1 + step
        if label >= width:
            break
        kept = lesson.valid[:, :-label] & lesson.valid[:, label:]
        log_q = torch.log_softmax(logits[:, :-label].float(), dim=-1)
        loss = -(lesson.teacher[:, label:] * log_q).sum(-1)
        total = total + decay**step * loss[kept].mean()
        tokens = head.target_ids()[logits.argmax(-1)].detach()
        mask = torch.cat([mask, diagonal], dim=2)
    return total


def train_eagle3(drafter: Eagle3Drafter, target, batches: list[tuple[torch.Tensor, torch.Tensor]], epochs: int,
                 lr: float = 1e-3, steps: int = 3, decay: float = 0.8) -> list[float]:
    """Train the head on (tokens, attention_mask) batches for `epochs` passes with AdamW; the
    target and the shared embedding stay frozen. Returns each epoch's mean loss."""
    head = drafter.head
    target.requires_grad_(False)
    trained = [p for name, p in head.named_parameters() if not name.startswith("embed_tokens.")]
    optimizer = torch.optim.AdamW(trained, lr=lr)
    lessons = [teach(target, head, tokens, mask) for tokens, mask in batches]
    head.train()
    curve = []
    for _ in range(epochs):
        losses = []
        for lesson in lessons:
            loss = unrolled_loss(head, lesson, steps, decay)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        curve.append(sum(losses) / len(losses))
    head.eval()
    return curve


def held_out_loss(drafter: Eagle3Drafter, target, batches: list[tuple[torch.Tensor, torch.Tensor]],
                  steps: int = 3, decay: float = 0.8) -> float:
    """The training-time-test loss on batches the head was not trained on."""
    with torch.no_grad():
        losses = [float(unrolled_loss(drafter.head, teach(target, drafter.head, tokens, mask), steps, decay))
                  for tokens, mask in batches]
    return sum(losses) / len(losses)
