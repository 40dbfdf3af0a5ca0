"""llmpipe: lossless compression of text with a causal language model and a range coder.

``compress``, ``decompress`` and ``open`` (see :mod:`llmpipe.api`), and the
``Compressor`` and ``Decompressor`` that keep a loaded model between calls, are
imported on first use, so that ``import llmpipe`` and ``llmpipe -l`` stay
fast without loading torch.
"""

from llmpipe.defaults import VERSION as __version__  # noqa: F401 - the package's version, as Python tools read it

__all__ = ["compress", "decompress", "open", "Compressor", "Decompressor"]


def __getattr__(name: str):
    if name in __all__:
        from llmpipe import api

        return getattr(api, name)
    raise AttributeError(f"module 'llmpipe' has no attribute {name!r}")
