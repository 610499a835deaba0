"""Errors that are the user's to fix, not bugs: bad config, bad data, bad model or checkpoint files, a run that
diverged, a full disk. The CLI entry points print their message in one or two lines and exit 2; any other exception
is a bug and keeps its traceback. `NOVA_RT_DEBUG=1` shows the traceback of user errors too.

Every message names where the problem is: the file, the row and field, or the config key.
"""

from __future__ import annotations

import os


class UserError(ValueError):
    """A mistake in the user's input; the message names the file / row / field or the config key."""


class ConfigError(UserError):
    """A config file or override is invalid; the message names the file and the key (nova_rt.config re-exports it)."""


class CheckpointError(UserError):
    """A checkpoint cannot be used: refused (not plain tensors and types), corrupt, or written by another model."""


class MergeConfigError(UserError):
    """A merge config that cannot be run; the message names the offending field. Raised by nova_rt.merge.config and
    by merge methods (weights that nearly cancel); defined here so that the methods need not import the config."""


class RewardError(UserError):
    """A reward source raised or returned bad scores (None, NaN/inf, a non-number, the wrong count); the message
    names the source (`module:function` for user code) and the first bad completion (nova_rt.rewards re-exports it)."""


class NonFiniteError(UserError):
    """Training stopped: too many consecutive steps with a non-finite loss or gradient norm."""


class DiskFullError(UserError):
    """A write of run outputs failed for lack of space (ENOSPC / EDQUOT): the message names the directory, the bytes
    needed and free, and what a rerun resumes from (nova_rt.disk)."""


def debug_enabled() -> bool:
    """NOVA_RT_DEBUG=1 (or any value but 0/empty): user errors keep their tracebacks."""
    return os.environ.get("NOVA_RT_DEBUG", "") not in ("", "0")
