"""specdec: measure speculative decoding against autoregressive decoding."""

__version__ = "0.1.0"
