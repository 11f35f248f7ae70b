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
    assert eps.get("builtin") == "methods"
    from rsnc_bench.methods import METHODS
    METHODS.names()  # importing the built-in package through the entry point works
