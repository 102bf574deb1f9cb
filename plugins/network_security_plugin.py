"""The project's Airflow plugin: registers the operator extra links of ``network_security.links``."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from network_security.links import ALL_LINKS


class NetworkSecurityPlugin(AirflowPlugin):
    name = "network_security"
    operator_extra_links = list(ALL_LINKS)
