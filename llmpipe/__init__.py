"""llmpipe: lossless compression of text with a causal language model and a range coder."""

__version__ = "0.1.0"
