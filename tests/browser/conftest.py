"""Browser tests run only when asked for by marker: ``pytest -m browser``.

They start a whole Airflow (``airflow standalone``) next to the private stack and drive
Chromium, so plain ``pytest`` and every other ``-m`` selection (``make test``,
``make test-unit``, ``make test-integration``) leave them out (deselected, not skipped).
"""

from __future__ import annotations


def pytest_collection_modifyitems(config, items):
    if "browser" in (config.getoption("markexpr") or ""):
        return  # `-m browser` (or an expression naming it) decides by itself
    deselected = [item for item in items if item.get_closest_marker("browser")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("browser")]
