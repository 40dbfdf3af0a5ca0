"""Default settings, in a module that imports nothing heavy (``llmpipe -l`` must not load torch).

The chunk size, context window and overlap come from the measured grid in
BENCHMARKS.md ("context"): 16 KB rows with a 1,024-token window restarted
from its last 256 tokens code enwik8 about as well as 8 KB chunks (7% below
2 KB chunks) and decode about 1.5x faster than 8 KB chunks.
"""

DEFAULT_CHUNK_SIZE = 16384
DEFAULT_BATCH = 64
DEFAULT_THREADS = 2
DEFAULT_CONTEXT = 1024  # tokens a prediction sees at most; 0: the whole chunk
DEFAULT_OVERLAP = 256  # tokens kept when the context window restarts
DEFAULT_STEER = "auto"  # learn a prompt only where the projected saving clears its cost (STEERING.md)
DEFAULT_STEER_EPOCHS = 20  # training steps of a learned prompt (STEERING.md: what 20 steps gain)
DEFAULT_STEER_SECONDS = 600.0  # ... and their time limit
FLOAT_DTYPES = ("float32", "float16", "bfloat16")  # --dtype choices of the float engine
