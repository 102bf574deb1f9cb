"""Assets: the lineage from the raw drop to the served model, one event per run with its details.

URIs come from ``tasks.config.Settings`` defaults and ``NS_*`` (DAG files read no Variable at parse time).
"""

from __future__ import annotations

from airflow.sdk import Asset

from tasks.config import Settings

_settings = Settings.load()

RAW_DROPS = Asset(name="network_security_raw_drops", uri=f"s3://{_settings.raw_bucket}/", group="data")
SNAPSHOTS = Asset(name="network_security_snapshots", uri=f"s3://{_settings.lake_bucket}/snapshots/", group="data")
CHAMPION = Asset(name="network_security_champion", uri="mlflow://registered-models/champion", group="model")
SERVED_MODEL = Asset(name="network_security_served_model", uri="x-serving://network-security/champion", group="model")
