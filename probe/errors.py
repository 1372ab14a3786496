"""The probe's input errors: each message says what is wrong and what to do."""

from __future__ import annotations

__all__ = ["ProbeDataError", "RunConflictError", "UnknownFeatureError"]


class ProbeDataError(ValueError):
    """The store or the request cannot give a sound probe dataset; the message says why and what to do."""


class RunConflictError(ValueError):
    """`out_dir` holds a run made with other settings or another store: resuming it would mix two runs."""


class UnknownFeatureError(ProbeDataError):
    """A requested feature the store does not hold (a request given wrongly, not a faulty store)."""
