"""Refuse a drafter whose tokens mean something else to the target, before decoding."""

from __future__ import annotations


class VocabularyMismatch(ValueError):
    pass


def check_same_vocabulary(target, drafter_model, target_tokenizer=None, drafter_tokenizer=None) -> None:
    """Raise VocabularyMismatch unless target and drafter share a vocabulary.

    With tokenizers, their token -> id maps must be equal, and each model must embed every
    id of that vocabulary (embedding tables may still be padded to different sizes: the
    drafter's logits are fitted to the target's); a smaller table would fail mid-decode on
    the first token past its end. Without, the configs' vocab_size must agree.
    """
    if target_tokenizer is not None and drafter_tokenizer is not None:
        ours, theirs = target_tokenizer.get_vocab(), drafter_tokenizer.get_vocab()
        if ours != theirs:
            differing = sorted(set(ours.items()) ^ set(theirs.items()))[:3]
            raise VocabularyMismatch(
                f"drafter tokenizer differs from the target's ({len(theirs)} vs {len(ours)} tokens; "
                f"e.g. {differing}): speculative decoding needs one shared vocabulary"
            )
        tokens = len(target_tokenizer)
        rows = {"target": _embedded(target), "drafter": _embedded(drafter_model)}
        for role, other in (("target", "drafter"), ("drafter", "target")):
            if rows[role] < tokens:
                raise VocabularyMismatch(
                    f"{role} vocab_size {rows[role]} (config.vocab_size, embedding rows) is smaller than the "
                    f"{tokens} tokens of the shared tokenizer (the {other}'s vocab_size is {rows[other]}): "
                    f"token ids from {rows[role]} up cannot be embedded"
                )
        return
    ours, theirs = target.config.vocab_size, drafter_model.config.vocab_size
    if ours != theirs:
        raise VocabularyMismatch(
            f"drafter vocab_size {theirs} differs from the target's {ours}: "
            "speculative decoding needs one shared vocabulary"
        )


def _embedded(model) -> int:
    """Token ids the model can embed: the smaller of its config's vocab_size and its table."""
    return min(model.config.get_text_config().vocab_size, model.get_input_embeddings().num_embeddings)
