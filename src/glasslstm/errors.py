"""The errors glasslstm raises for problems with what a user gave it.

Each message names the problem and the fix in one line; the command line prints it as
``glasslstm COMMAND: error: ...`` with exit status 2, never as a traceback. All are
:class:`GlassLSTMError` (catch that for any of them) and :class:`ValueError` (what code written
before this hierarchy caught).
"""

from __future__ import annotations


class GlassLSTMError(ValueError):
    """Base of glasslstm's user-facing errors."""


class ConfigError(GlassLSTMError):
    """A configuration value or option that cannot work; the message names the key and the fix."""


class InputError(GlassLSTMError, RuntimeError):
    """A tensor given to a module has the wrong shape or device. Also a RuntimeError, as
    torch.nn.LSTM's are: code that catches torch's errors catches these."""


class InputTypeError(GlassLSTMError, TypeError):
    """A tensor given to a module has the wrong dtype (also a TypeError)."""


class DataError(GlassLSTMError):
    """A problem with the user's data; the message names the problem and the fix."""


class RunDirError(GlassLSTMError):
    """A missing, foreign or incompatible run directory; the message names the fix."""


USER_ERRORS = (GlassLSTMError,)
