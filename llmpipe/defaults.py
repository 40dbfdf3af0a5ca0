"""Default settings, in a module that imports nothing heavy (``llmpipe -l`` must not load torch)."""

DEFAULT_CHUNK_SIZE = 2048
DEFAULT_BATCH = 64
DEFAULT_THREADS = 2
