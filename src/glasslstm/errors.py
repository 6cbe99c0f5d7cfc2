"""The errors glasslstm raises for problems with what a user gave it.

Each message names the problem and the fix in one line; the command line prints it as
``glasslstm COMMAND: error: ...`` with the error's ``exit_code`` (2 for bad input, 1 for a
failed write), never as a traceback. All are :class:`GlassLSTMError` (catch that for any of
them) and :class:`ValueError` (what code written before this hierarchy caught).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path


class GlassLSTMError(ValueError):
    """Base of glasslstm's user-facing errors."""

    exit_code = 2  # the command line's exit status: a usage or input problem


class ConfigError(GlassLSTMError):
    """A configuration value or option that cannot work; the message names the key and the fix."""


class InvalidValue(ConfigError):
    """One value that breaks its rule: ``key`` (an option or file key), the value ``found``,
    and what was ``expected``; ``name`` is how the message names the key (``--seq-len``)."""

    def __init__(self, key: str, found: object, expected: str, *, name: str | None = None):
        self.key, self.found, self.expected = key, found, expected
        self.name = name or key
        super().__init__(f"{self.name}={found!r} is not valid; expected {expected}")


class InputError(GlassLSTMError, RuntimeError):
    """A tensor given to a module has the wrong shape or device. Also a RuntimeError, as
    torch.nn.LSTM's are: code that catches torch's errors catches these."""


class InputTypeError(GlassLSTMError, TypeError):
    """A tensor given to a module has the wrong dtype (also a TypeError)."""


class DataError(GlassLSTMError):
    """A problem with the user's data; the message names the problem and the fix."""


class RunDirError(GlassLSTMError):
    """A missing, foreign or incompatible run directory; the message names the fix."""


class WriteError(GlassLSTMError, OSError):
    """Writing a file failed (a full disk, no permission, an I/O error). The message names the
    path, the reason and the free space left there; whatever was there before is unchanged.
    Also an :class:`OSError`, so code that catches write failures keeps working."""

    exit_code = 1  # the input was fine; the machine could not store the result

    def __init__(self, path, cause: OSError, *, hint: str = ""):
        self.path, self.cause, self.hint = Path(path), cause, hint
        self.errno = cause.errno
        reason = cause.strerror or str(cause) or type(cause).__name__
        code = errno.errorcode.get(cause.errno or 0)
        free = free_space(self.path)
        where = f"; {format_bytes(free)} free there" if free is not None else ""
        message = f"cannot write {self.path}: {reason}{f' ({code})' if code else ''}{where}"
        super().__init__(message + (f"; {hint}" if hint else ""))

    def __str__(self) -> str:  # OSError's own __str__ would show errno and strerror instead
        return str(self.args[0])

    def with_hint(self, hint: str) -> WriteError:
        """The same error with ``hint`` (what was kept, how to continue) at the end."""
        return WriteError(self.path, self.cause, hint=hint)


def free_space(path) -> int | None:
    """Bytes free on the file system holding ``path`` (its nearest existing folder)."""
    p = Path(path)
    for folder in (p, *p.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder if folder.is_dir() else folder.parent).free
            except OSError:
                return None
    return None


def format_bytes(n: float) -> str:
    """``n`` bytes as ``512 B``, ``3.4 kB``, ``1.2 GB``, ``5.0 TB`` (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


USER_ERRORS = (GlassLSTMError,)
