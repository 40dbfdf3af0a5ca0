"""Whole streams: compression, decompression, block choice, steering, resume and the memory plan
(ARCHITECTURE.md)."""
