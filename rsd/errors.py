"""Typed errors. Every failure in rsd is loud; the message says what to fix.

Raise these at the public edge; keep ``assert`` for internal invariants only.
"""

from __future__ import annotations


class RSDError(Exception):
    """Base class of every error rsd raises on purpose."""


class CheckpointNotFoundError(RSDError, FileNotFoundError):
    """A checkpoint file or directory that is needed does not exist."""


class CheckpointMismatchError(RSDError, ValueError):
    """A checkpoint does not match the config it is loaded into (missing/unexpected keys, shapes)."""


class ConfigError(RSDError, ValueError):
    """A config value is invalid; the message names the field and the value."""


class ShapeError(RSDError, ValueError):
    """A tensor/array has the wrong shape; the message gives expected and actual shapes."""


class DTypeError(RSDError, TypeError):
    """A tensor/array has the wrong dtype."""


class NonFiniteError(RSDError, ValueError):
    """NaN or inf where finite values are required."""


class CodeRangeError(RSDError, ValueError):
    """RFSQ codes outside ``[0, num_levels)``."""


class UnknownUnnormKeyError(RSDError, KeyError):
    """The normalization statistics have no entry for the requested suite/key."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly instead
        return str(self.args[0]) if self.args else ""


class DeadHiddenStateError(NonFiniteError):
    """The backbone's hidden state is all zero (a vision encoder or loading problem) or non-finite."""


class ActionGenerationError(RSDError, RuntimeError):
    """Any failure while a policy produced an action chunk. ``__cause__`` holds the original error.

    No action is returned when this is raised: callers must not substitute one.
    """


class BatchActionError(ActionGenerationError):
    """Rows of a batched ``predict_chunks`` (several episodes at once) failed. ``results`` holds, per row, its
    ActionChunk or the ActionGenerationError that row raised (its ``__cause__`` the original error), so a caller
    serving several episodes hands each its own outcome; no row's failure is replaced by an action."""

    def __init__(self, message: str, results: list | tuple = ()) -> None:
        super().__init__(message)
        self.results = list(results)


class WrongBaseModelError(RSDError, ValueError):
    """The backbone checkpoint was not fine-tuned for the requested LIBERO suite."""


class RendererUnavailableError(RSDError, RuntimeError):
    """No headless OpenGL backend (EGL, OSMesa) works on this machine."""


class SimSetupError(RSDError, RuntimeError):
    """LIBERO (or its assets/config) is not installed or set up; the message says how to fix it."""


class CorruptCheckpointError(CheckpointMismatchError):
    """A checkpoint file exists but cannot be read (empty, truncated, not the format its name says)."""


class RemoteCodeNotAllowedError(ConfigError):
    """A checkpoint or policy asks to run its own Python code and the caller did not opt in."""


class ResumeMismatchError(ConfigError):
    """``--resume`` with a policy, device or setting that differs from the recorded run."""


class OutputLockedError(ConfigError):
    """Another process is writing the same output (it holds the output's lock); the message names it."""


class EnvResetError(SimSetupError):
    """A LIBERO env failed to reset (``__cause__`` holds LIBERO's error)."""


class SpeculativeMismatchError(RSDError, RuntimeError):
    """Speculative decoding in ``exact`` mode gave codes that differ from greedy decoding of the same hidden state
    (``rsd eval --check-greedy``): exact speculative decoding must equal greedy, so the decoder is broken."""


class MergeError(ConfigError):
    """``rsd merge`` refused shard runs that do not belong together (other policy, settings, package versions or
    request; a shard index or an episode twice) or an output it must not overwrite; the message names the fix."""


class ReplayMismatchError(ConfigError):
    """A demo re-run (``rsd render-demos``) left its recorded trajectory: the proprio it observes differs from the
    recorded one beyond the tolerance (another scene, wrong fixture poses, another simulator version)."""
