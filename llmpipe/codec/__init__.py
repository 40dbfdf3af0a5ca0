"""Symbols to bits and back: frequency tables from the engine's logits, the adaptive bias and the history
mixer that reshape them, and the range coder (ARCHITECTURE.md)."""
