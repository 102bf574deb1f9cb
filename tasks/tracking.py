"""The MLflow side shared by training, the registry and the drift check.

One place for the registry aliases (aliases, not stages: ``challenger`` just trained,
``champion`` serving, ``previous_champion`` the rollback target), the fail-fast check of
the tracking server, and the alias lookup.
"""

from __future__ import annotations

import urllib.request
from typing import Any

CHALLENGER, CHAMPION, PREVIOUS_CHAMPION = "challenger", "champion", "previous_champion"


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server cannot be reached; transient, the task should be retried."""


def check_tracking_server(tracking_uri: str, timeout: float = 5.0) -> None:
    """Fail fast and clearly when the MLflow server is down (MLflow's own client retries for minutes).

    Raises:
        TrackingUnavailable: The server does not answer ``/health`` with 200; the message
            names it and says how to start it.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status == 200:
                return
            problem = f"answered HTTP {response.status}"
    except OSError as err:
        problem = f"is unreachable ({err})"
    raise TrackingUnavailable(
        f"MLflow tracking server {tracking_uri} {problem}. In embedded mode start it with `make stack-up`; "
        "otherwise check `mlflow_tracking_uri` in the network_security_config Variable."
    )


def alias_version(client: Any, model_name: str, alias: str) -> str | None:
    """The version an alias points at, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise
