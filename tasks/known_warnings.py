"""The third-party warnings this project knows and silences: the one place they are listed.

A warning caused by the project's own calls is fixed where it is raised, never listed here.
Each entry says which library raises it, why it is harmless, and what it cost before:

* skops (``skops.io._utils.whichmodule``) finds objects without ``__module__`` (numpy ufuncs
  of the fitted pipeline) by ``getattr`` on every module in ``sys.modules``. In an Airflow
  process that includes Airflow's deprecated import shims (``airflow.utils.timezone``,
  ``airflow.utils.trigger_rule``, ...), each of which warns once per name asked for: about
  1,160 ``DeprecatedImportWarning`` entries (3,500 log lines) in the first task of a process
  that saves or loads a skops file (``train``, ``transform``). skops finds the object anyway.

Installed by ``tasks/__init__.py`` so every process running the project's code (a task, the
DAG parser, the scripts) has it; filters match the module that triggers the warning, so the
same warning raised from anywhere else still shows.
"""

from __future__ import annotations

import warnings

# (message regex, category, module regex of the code that triggers it)
KNOWN_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (r"The `airflow\.[\w.]+` (attribute )?is deprecated", Warning, r"skops\.io\._utils"),
)


def silence_known_warnings() -> None:
    """Install the filters (idempotent: ``warnings.filterwarnings`` keeps one copy of an identical filter)."""
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
