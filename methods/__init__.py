"""Built-in method plugins.

Each plugin module registers itself with ``rsnc_bench.methods.METHODS``; this package is
the ``builtin`` entry point of the ``rsnc_bench.methods`` group, so importing it here is how
the harness finds them, exactly as it finds a third-party package's methods. Import every
plugin module below.
"""

from methods import baselines, ebaker, pmpguard, rrsitr  # noqa: F401
