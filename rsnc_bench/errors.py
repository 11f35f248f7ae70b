"""User-facing errors: each renders as one line that names the file, the place and the fix.

The CLI prints an ``RsncError`` without a traceback and exits non-zero; any other exception
is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class RsncError(Exception):
    """An error caused by the user's input, explained in one line."""


class UnknownNameError(RsncError, KeyError):
    """A dataset, protocol, method, ... name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DatasetNotFoundError(RsncError, FileNotFoundError):
    """The files a dataset layout needs are not where they were looked for."""


class DataFormatError(RsncError, ValueError):
    """A data file exists but its content is malformed."""

    def __init__(self, path: str | Path, problem: str, fix: str, line: int | None = None):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}; {fix}")
        self.path, self.line = Path(path), line


class ImageReadError(RsncError, OSError):
    """An image file that cannot be opened or decoded."""


class ManifestError(RsncError, ValueError):
    """A noise manifest that is malformed, altered, or belongs to other data."""


class ConfigError(RsncError, ValueError):
    """An option value outside its allowed range or of the wrong type."""
