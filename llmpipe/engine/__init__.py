"""Inference engines: turn token histories into logits for the coder."""
