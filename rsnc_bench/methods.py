"""The method registry. Plugins register with ``@METHODS.register("name")``.

The harness never imports a method by name: the registry loads the ``rsnc_bench.methods``
entry-point group (the built-in ``methods`` package is one such entry) on first use.
"""

from rsnc_bench.registry import Registry

METHODS: Registry = Registry("method", entry_point_group="rsnc_bench.methods")
