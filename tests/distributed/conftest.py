"""Distributed tests run only when asked for by marker: ``pytest -m distributed``.

They start the distributed stack (``scripts/distributed.py``: CeleryExecutor, Postgres, Redis)
and take minutes, so plain ``pytest`` and every other ``-m`` selection (``make test``,
``make test-unit``, ``make test-integration``) leave them out (deselected, not skipped), even
without the ``addopts`` of pyproject.toml. ``python -m scripts.distributed test`` runs them.
"""

from __future__ import annotations


def pytest_collection_modifyitems(config, items):
    if "distributed" in (config.getoption("markexpr") or ""):
        return  # `-m distributed` (or an expression naming it) decides by itself
    deselected = [item for item in items if item.get_closest_marker("distributed")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("distributed")]
