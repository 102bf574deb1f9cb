"""Distributed mode on loopback: the services of docker-compose.yaml as local processes.

Airflow on CeleryExecutor with PostgreSQL metadata and result backend and the Redis broker:
``airflow api-server``, ``scheduler``, ``dag-processor``, ``triggerer`` and two ``celery worker``
processes (own celery hostnames, small concurrency); the MLflow tracking server on Postgres with
its artifacts in the AWS emulator; the monitoring store on Postgres; moto. DAGs from ``dags/``,
settings from ``airflow_settings.yaml``, as in the embedded stack. The services and the shared
Airflow settings are those of ``scripts/services.py`` (docker-compose.yaml is held against them),
run by the project's one supervisor (``tasks/supervisor.py``).

The package by concern: ``config`` (ports, databases, the environment), ``backends`` (the
machine's PostgreSQL and Redis), ``stack`` (the processes: up, down, status, kill), ``__main__``
(the CLI and the test runner).

PostgreSQL and Redis are not started here: they must be running (``up`` and ``test`` stop with
one line naming the missing one). This stack owns three databases there (``ns_airflow_dist``,
``ns_mlflow_dist``, ``ns_monitoring_dist``) and one Redis database number (5); it never touches
any other. Everything else lives under ``.state-distributed/`` (``NS_DIST_STATE_DIR``).

Usage::

    python -m scripts.distributed up [--fresh]   # --fresh: drop/recreate its databases, flush its Redis db, new state dir
    python -m scripts.distributed status
    python -m scripts.distributed down [--drop]  # stops what up started (by pid); --drop also drops its databases
    python -m scripts.distributed env            # the environment, to `eval` in a shell
    python -m scripts.distributed test [--keep] [pytest args...]

Variables (defaults in brackets; ports differ from the embedded stack's 4566/5050/8080/8000):
``NS_DIST_STATE_DIR`` [.state-distributed], ``NS_DIST_MOTO_PORT`` [4766], ``NS_DIST_MLFLOW_PORT``
[5250], ``NS_DIST_AIRFLOW_PORT`` [8280], ``NS_DIST_SERVING_PORT`` [8200],
``NS_DIST_SCHEDULER_HEALTH_PORT`` [8281], ``NS_DIST_TRIGGERER_LOG_PORT`` [8282],
``NS_DIST_PG_HOST`` [127.0.0.1], ``NS_DIST_PG_PORT`` [5432], ``NS_DIST_PG_USER`` [postgres],
``NS_DIST_PG_PASSWORD`` [], ``NS_DIST_DB_SUFFIX`` [dist], ``NS_DIST_REDIS_HOST`` [127.0.0.1],
``NS_DIST_REDIS_PORT`` [6379], ``NS_DIST_REDIS_DB`` [5], ``NS_DIST_WORKERS`` [2],
``NS_DIST_WORKER_CONCURRENCY`` [2], ``NS_DIST_DEPLOY_TARGETS`` [empty: none, see environment()],
``NS_DIST_RETRY_DELAY_SECONDS`` [5], ``NS_DIST_HEARTBEAT_TIMEOUT`` [60, the shared setting].
"""

from scripts.distributed.backends import pg_connect, preflight
from scripts.distributed.config import Config, DistError, environment, worker_hostname
from scripts.distributed.stack import api, celery_node, celery_ping, down, kill, running, start, status, up

__all__ = [
    "Config", "DistError", "api", "celery_node", "celery_ping", "down", "environment", "kill", "pg_connect",
    "preflight", "running", "start", "status", "up", "worker_hostname",
]  # fmt: skip
