"""One error hierarchy for everything a user can cause; the CLI maps each to an exit code.

Anything that is not an :class:`LlmpipeError` is a bug and keeps its traceback.
"""

from __future__ import annotations


class LlmpipeError(Exception):
    """Base class: a message for the user, printed as one line on stderr."""

    exit_code = 1


class UsageError(LlmpipeError):
    """Bad command-line options or arguments."""


class ArchiveError(LlmpipeError):
    """The input is not a valid llmpipe archive: wrong magic, damage, truncation."""


class TruncatedArchiveError(ArchiveError):
    """The input ended early (including an empty input)."""


class ChecksumError(ArchiveError):
    """A block decoded, but not to the bytes that were compressed."""


class DamagedArchiveError(ArchiveError):
    """Some blocks were damaged and left out (``--keep-going``); everything else was written."""


class ModelError(LlmpipeError):
    """The model cannot be found, loaded or used."""


class ModelMismatchError(ModelError):
    """The archive was made with a different model, tokenizer or numerics."""
