-- Databases of the compose stack's Postgres (docker-compose.yaml mounts this file into
-- /docker-entrypoint-initdb.d, so it runs once, when the data volume is created).
-- The image's POSTGRES_DB creates `airflow` (Airflow metadata and Celery results); these are
-- MLflow's backend store and the monitoring store (monitoring_store connection, monitoring_store.sql).
CREATE DATABASE mlflow;
CREATE DATABASE monitoring;
