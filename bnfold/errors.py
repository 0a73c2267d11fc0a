"""Errors meant for people: each says what was wrong, where, and what to do next."""

from __future__ import annotations

__all__ = ["BnfoldError", "CaptureError", "DataError", "InputError", "InternalError", "OutputError"]


class BnfoldError(Exception):
    """Base class of every error bnfold raises on purpose.

    ``str(err)`` is a complete sentence for a user; ``hint`` (optional) says what to do about it.
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")


class CaptureError(BnfoldError):
    """The model could not be turned into a torch.fx graph."""


class InputError(BnfoldError, ValueError):
    """A file, shape or argument given by the user is unusable (a ``ValueError`` too, for Python callers)."""


class DataError(InputError):
    """The user's data is unusable (a batch, an image file, a data factory), found while it streams: the whole step
    stops (exit 2), rather than one stage being recorded as failed — the data is the same for every stage."""


class InternalError(BnfoldError):
    """A bug in bnfold: a pass raised. Names the pass, the node it was working on and the passes before it."""

    def __init__(self, message: str, *, hint: str | None = None, pass_name: str, node: str | None,
                 passes_before: tuple[str, ...]) -> None:
        super().__init__(message, hint=hint)
        self.pass_name = pass_name
        self.node = node
        self.passes_before = passes_before


class OutputError(BnfoldError):
    """An output could not be written (disk full, permission denied); nothing half-written was left."""
