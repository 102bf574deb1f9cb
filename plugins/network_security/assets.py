"""Assets: the lineage the UI's asset view shows, from the raw drop to the served model.

``ingest`` reads ``RAW_DROPS`` and emits ``SNAPSHOTS`` (extra: dataset, ds, URI, content
hash); ``promote_champion`` emits ``CHAMPION`` (model name, version, MLflow run);
``deploy.record_deployment`` emits ``SERVED_MODEL`` (version, targets, image). An asset
event per run, so the asset view lists every snapshot and every promotion with its details.

URIs are built at parse time from the defaults and ``NS_*`` environment overrides of
``tasks.config.Settings`` (never from the Variable: DAG files read no Variable at parse time).
"""

from __future__ import annotations

from airflow.sdk import Asset

from tasks.config import Settings

_settings = Settings.load()

RAW_DROPS = Asset(name="network_security_raw_drops", uri=f"s3://{_settings.raw_bucket}/", group="data")
SNAPSHOTS = Asset(name="network_security_snapshots", uri=f"s3://{_settings.lake_bucket}/snapshots/", group="data")
CHAMPION = Asset(name="network_security_champion", uri="mlflow://registered-models/champion", group="model")
SERVED_MODEL = Asset(name="network_security_served_model", uri="x-serving://network-security/champion", group="model")
