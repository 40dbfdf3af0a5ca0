"""llmpipe: lossless compression of text with a causal language model and a range coder.

``compress``, ``decompress`` and ``open`` (see :mod:`llmpipe.api`) are
imported on first use, so that ``import llmpipe`` and ``llmpipe -l`` stay
fast without loading torch.
"""

__version__ = "0.5.0"
__all__ = ["compress", "decompress", "open"]


def __getattr__(name: str):
    if name in __all__:
        from llmpipe import api

        return getattr(api, name)
    raise AttributeError(f"module 'llmpipe' has no attribute {name!r}")
