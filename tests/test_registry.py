"""The generic registry and plugin discovery through entry points."""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

import pytest

import rsnc_bench.registry as registry_module
from rsnc_bench.errors import RsncError, UnknownNameError
from rsnc_bench.registry import Registry


def test_names_wildcards_and_suggestions():
    reg = Registry("widget")
    for name in ("clip-ft", "clip-zero", "rrsitr"):
        reg.register(name)(object())
    assert reg.names("clip*") == ["clip-ft", "clip-zero"]
    with pytest.raises(UnknownNameError, match="unknown widget 'rrsit'; did you mean 'rrsitr'"):
        reg.get("rrsit")
    with pytest.raises(RsncError, match="registered twice"):
        reg.register("rrsitr")(object())


def test_entry_points_are_loaded_on_first_lookup(monkeypatch):
    reg = Registry("method", entry_point_group="test.group")
    loaded = []

    class FakeEntryPoint:
        name, value = "outside", "somewhere:plugin"

        def load(self):
            loaded.append(True)
            reg.register("outside-method")(object)

    monkeypatch.setattr(registry_module, "entry_points", lambda group: [FakeEntryPoint()] if group == "test.group" else [])
    assert "outside-method" in reg.names()
    assert loaded == [True]
    reg.names()
    assert loaded == [True]  # only once


def test_a_broken_plugin_is_a_clear_error(monkeypatch):
    reg = Registry("method", entry_point_group="test.broken")
    broken = EntryPoint(name="broken", value="no_such_module_xyz:thing", group="test.broken")
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [broken])
    with pytest.raises(RsncError, match="plugin entry point 'broken'"):
        reg.names()


def test_builtin_methods_package_is_an_installed_entry_point():
    eps = {ep.name: ep.value for ep in entry_points(group="rsnc_bench.methods")}
    assert eps.get("builtin") == "rsnc_builtin_methods"
    from rsnc_bench.methods import METHODS
    METHODS.names()  # importing the built-in package through the entry point works


def test_a_plugin_that_registers_nothing_is_a_clear_error(monkeypatch):
    reg = Registry("method", entry_point_group="test.empty")
    empty = EntryPoint(name="empty", value="json", group="test.empty")  # imports fine, registers nothing
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [empty])
    with pytest.raises(RsncError, match="plugin entry point 'empty' \\(json\\) loaded but registered no method"):
        reg.names()


@pytest.mark.slow
def test_builtins_are_listed_from_a_folder_with_its_own_methods_package(tmp_path):
    """A generic `methods` import name was shadowed by the user's own methods/ package: the list
    came out empty, exit 0."""
    import subprocess
    import sys

    (tmp_path / "methods").mkdir()
    (tmp_path / "methods" / "__init__.py").write_text("MINE = True\n")
    result = subprocess.run([sys.executable, "-m", "rsnc_bench", "list", "methods"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    assert {"clip-ft", "oracle", "rrsitr", "ebaker", "iebaker", "pmpguard", "zeroshot"} <= listed


def test_the_package_list_holds_every_subpackage():
    """pyproject.toml lists the packages (the methods/ folder is installed under another name):
    a subpackage missing from the list would be missing from every non-editable install."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "rsnc_bench").rglob("__init__.py")}
    assert found | {"rsnc_builtin_methods"} == listed
