"""One generic name -> object registry, with wildcard listing and entry-point discovery."""

from __future__ import annotations

import difflib
import fnmatch
from importlib.metadata import entry_points
from typing import Callable, Generic, Iterator, TypeVar

from rsnc_bench.errors import RsncError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps short names to registered objects (classes, functions).

    ``kind`` names what is registered in messages ("dataset", "noise protocol"). When
    ``entry_point_group`` is given, the first lookup loads every entry point of that group,
    so an installed package can add entries without the harness importing it by name.
    """

    def __init__(self, kind: str, entry_point_group: str | None = None):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._group = entry_point_group
        self._discovered = entry_point_group is None

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise RsncError(f"{self.kind} {name!r} is registered twice; rename one of them")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        self._discover()
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"choose one of: {', '.join(self.names()) or 'none registered'}"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; {hint}") from None

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style wildcard, sorted."""
        self._discover()
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def items(self) -> Iterator[tuple[str, T]]:
        for name in self.names():
            yield name, self._entries[name]

    def __contains__(self, name: str) -> bool:
        self._discover()
        return name in self._entries

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        for ep in entry_points(group=self._group):
            before = len(self._entries)
            try:
                ep.load()  # importing the module runs its @register decorators
            except Exception as exc:  # a broken plugin must not hide the others
                raise RsncError(f"plugin entry point {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
            if len(self._entries) == before and not self._registered_from(ep.value.split(":")[0]):
                raise RsncError(f"plugin entry point {ep.name!r} ({ep.value}) loaded but registered no {self.kind}; "
                                f"its modules must register theirs on import (see docs/plugins.md)")

    def _registered_from(self, package: str) -> bool:
        """Whether an entry comes from ``package`` (imported before discovery, so not counted then)."""
        modules = (getattr(obj, "__module__", "") or "" for obj in self._entries.values())
        return any(module == package or module.startswith(package + ".") for module in modules)


def first_line(doc: str | None) -> str:
    """The summary line of a docstring, for listings."""
    return (doc or "").strip().split("\n", 1)[0]
