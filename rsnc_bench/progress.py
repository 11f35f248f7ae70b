"""Progress bars: tqdm on a terminal, silent inside grid workers (their bars would overwrite
one another; the parent shows one bar over the cells)."""

from __future__ import annotations

from tqdm.auto import tqdm

_silent = False


def silence() -> None:
    """No bars from this process from now on (a grid worker)."""
    global _silent
    _silent = True


def bar(iterable=None, **kwargs) -> tqdm:
    return tqdm(iterable, disable=True if _silent else None, **kwargs)
