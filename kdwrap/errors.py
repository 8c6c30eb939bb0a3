"""The errors kdwrap raises on purpose, importable from ``kdwrap``; each message names the problem and the fix.

They subclass the built-in error a caller would otherwise expect (a bad split is a ``ValueError``, an unknown
option a ``TypeError``), so code written against those keeps working, and :class:`KDWrapError` catches them all.
"""
from __future__ import annotations

__all__ = ["KDWrapError", "SplitError", "TraceError", "FusionError", "OptionError", "CheckpointError"]


class KDWrapError(Exception):
    """Base class of the errors below."""


class SplitError(KDWrapError, ValueError):
    """The requested split point cannot cut the model into a trunk and a tail."""


class TraceError(KDWrapError, RuntimeError):
    """torch.fx could not trace the model."""


class FusionError(KDWrapError):
    """The branches cannot be run as one fused graph; the message names the node and op and says why."""


class OptionError(KDWrapError, TypeError):
    """An option a method does not have (a typo, or another method's option); the message lists the valid ones."""


class CheckpointError(KDWrapError, ValueError):
    """A checkpoint written by another run (another method or network) than the one resuming from it; the message
    names both."""
