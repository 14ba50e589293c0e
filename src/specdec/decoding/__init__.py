"""Decoding engines: one verifier, several drafters (see engine.py)."""

from .drafters import Drafter, DraftSession, ModelDrafter, NgramDrafter, ReplayDrafter, StepOutcome
from .engine import GenerationSettings, RowResult, generate
from .recycling import RecyclingDrafter
from .sampling import Draft, Sampler, verify
from .suffix import SuffixDrafter
from .vocab import VocabularyMismatch, check_same_vocabulary

__all__ = [
    "Draft", "DraftSession", "Drafter", "GenerationSettings", "ModelDrafter", "NgramDrafter",
    "RecyclingDrafter", "ReplayDrafter", "RowResult", "Sampler", "StepOutcome", "SuffixDrafter",
    "VocabularyMismatch", "check_same_vocabulary",
    "generate", "verify",
]
