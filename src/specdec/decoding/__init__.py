"""Decoding engines: one verifier, several drafters (see engine.py)."""

from .drafters import Drafter, DraftSession, ModelDrafter, NgramDrafter, ReplayDrafter, StepOutcome
from .eagle3 import Eagle3Drafter
from .engine import GenerationSettings, RowResult, generate
from .head_formats import HeadMismatch, load_head
from .medusa import MedusaDrafter
from .recycling import RecyclingDrafter
from .sampling import Draft, Sampler, verify
from .suffix import SuffixDrafter
from .vocab import VocabularyMismatch, check_same_vocabulary

__all__ = [
    "Draft", "DraftSession", "Drafter", "Eagle3Drafter", "GenerationSettings", "HeadMismatch", "MedusaDrafter",
    "ModelDrafter", "NgramDrafter", "RecyclingDrafter", "ReplayDrafter", "RowResult", "Sampler", "StepOutcome",
    "SuffixDrafter", "VocabularyMismatch", "check_same_vocabulary", "generate", "load_head", "verify",
]
