"""Built-in method plugins, installed as ``rsnc_builtin_methods`` (the folder keeps the name
``methods/``; a generic import name would be shadowed by any ``methods`` package beside the user).

This package is the ``builtin`` entry point of the ``rsnc_bench.methods`` group, so the harness
finds these methods exactly as it finds a third-party package's. Every module of the folder is
imported here, and each plugin module registers itself with ``rsnc_bench.methods.METHODS``:
adding a method is adding a file.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
