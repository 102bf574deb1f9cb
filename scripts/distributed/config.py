"""The distributed mode's configuration: ports, Postgres, Redis, workers, and the environment of every process."""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from scripts import services
from scripts.services import AIRFLOW_SETTINGS, HOST, PROJECT_ROOT, Paths, Ports

DEFAULT_STATE_DIR = PROJECT_ROOT / ".state-distributed"
ADMIN_USER = "admin"
MLFLOW_ARTIFACT_BUCKET = "network-security-mlflow"
START_HINT = "python -m scripts.distributed up"
# The worker's name for the Task SDK (``[core] hostname_callable``): what task instances record as
# ``hostname``. Both workers run on this machine, so the FQDN would not tell them apart.
HOSTNAME_VAR = "NS_DIST_HOSTNAME"
HOSTNAME_CALLABLE = "scripts.distributed.worker_hostname"


class DistError(RuntimeError):
    """The distributed stack cannot do what was asked; the message says why and what to do."""


def worker_hostname() -> str:
    """``[core] hostname_callable`` of the workers: their own name, else the FQDN."""
    return os.environ.get(HOSTNAME_VAR) or socket.getfqdn()


@dataclass(frozen=True)
class Config:
    paths: Paths
    ports: Ports
    scheduler_health_port: int
    triggerer_log_port: int
    pg_host: str
    pg_port: int
    pg_user: str
    pg_password: str
    db_suffix: str
    redis_host: str
    redis_port: int
    redis_db: int
    workers: int
    worker_concurrency: int
    deploy_targets: str
    retry_delay: int
    heartbeat_timeout: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        environ = os.environ if environ is None else environ

        def get(name: str, default: object) -> str:
            return environ.get(f"NS_DIST_{name}", str(default))

        return cls(
            paths=Paths(Path(get("STATE_DIR", DEFAULT_STATE_DIR)).resolve()),
            ports=Ports(
                moto=int(get("MOTO_PORT", 4766)),
                mlflow=int(get("MLFLOW_PORT", 5250)),
                airflow=int(get("AIRFLOW_PORT", 8280)),
                serving=int(get("SERVING_PORT", 8200)),
            ),
            scheduler_health_port=int(get("SCHEDULER_HEALTH_PORT", 8281)),
            triggerer_log_port=int(get("TRIGGERER_LOG_PORT", 8282)),
            pg_host=get("PG_HOST", HOST),
            pg_port=int(get("PG_PORT", 5432)),
            pg_user=get("PG_USER", "postgres"),
            pg_password=get("PG_PASSWORD", ""),
            db_suffix=get("DB_SUFFIX", "dist"),
            redis_host=get("REDIS_HOST", HOST),
            redis_port=int(get("REDIS_PORT", 6379)),
            redis_db=int(get("REDIS_DB", 5)),
            workers=int(get("WORKERS", 2)),
            worker_concurrency=int(get("WORKER_CONCURRENCY", 2)),
            deploy_targets=get("DEPLOY_TARGETS", ""),
            retry_delay=int(get("RETRY_DELAY_SECONDS", 5)),
            heartbeat_timeout=int(
                get("HEARTBEAT_TIMEOUT", AIRFLOW_SETTINGS["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"])
            ),
        )

    @property
    def databases(self) -> dict[str, str]:
        return {role: f"ns_{role}_{self.db_suffix}" for role in ("airflow", "mlflow", "monitoring")}

    def pg_url(self, database: str, scheme: str = "postgresql+psycopg2") -> str:
        credentials = quote(self.pg_user, safe="") + (
            f":{quote(self.pg_password, safe='')}" if self.pg_password else ""
        )
        return f"{scheme}://{credentials}@{self.pg_host}:{self.pg_port}/{database}"

    @property
    def broker_url(self) -> str:
        return f"redis://{self.redis_host}:{self.redis_port}/{self.redis_db}"

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.ports.airflow}"

    @property
    def worker_hostnames(self) -> dict[str, str]:
        """Service name -> the hostname its task instances record."""
        return {f"worker-{i}": f"ns-dist-worker-{i}" for i in range(1, self.workers + 1)}

    @property
    def password_file(self) -> Path:
        return self.paths.state_dir / "secrets" / "simple_auth_manager_passwords.json"

    def admin_password(self) -> str:
        return services.local_secret(self.paths, "airflow_admin_password", lambda: secrets.token_urlsafe(18))

    def where_logs(self) -> str:
        return f"process logs: {self.paths.logs}/*.log; task logs: {self.paths.airflow_home / 'logs'}"


def environment(config: Config) -> dict[str, str]:
    """What every process of the distributed stack sees (Airflow, MLflow, the tests' clients).

    The stack environment of ``scripts/services.py``, the shared ``AIRFLOW_SETTINGS`` (the same as
    docker-compose.yaml's), and what only this mode sets (its databases, ports, workers).
    """
    env = services.stack_environment(config.paths, config.ports)
    airflow_db = config.pg_url(config.databases["airflow"])
    monitoring = {
        "conn_type": "postgres",
        "host": config.pg_host,
        "port": config.pg_port,
        "schema": config.databases["monitoring"],
        "login": config.pg_user,
        **({"password": config.pg_password} if config.pg_password else {}),
    }
    env.update(AIRFLOW_SETTINGS)
    env.update(
        {
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": airflow_db,
            "AIRFLOW__CELERY__BROKER_URL": config.broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + airflow_db,
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(config.worker_concurrency),
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(config.heartbeat_timeout),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{config.api_url}/execution/",
            "AIRFLOW__API__BASE_URL": config.api_url,
            "AIRFLOW__API__HOST": HOST,
            "AIRFLOW__API__PORT": str(config.ports.airflow),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": services.local_secret(
                config.paths, "api_secret_key", lambda: secrets.token_urlsafe(32)
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(config.password_file),
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": HOST,
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(config.scheduler_health_port),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(config.triggerer_log_port),
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            # The monitoring store on Postgres; a connection in the environment wins over the
            # metadata database's (airflow_settings.yaml's SQLite one), as in docker-compose.yaml.
            "AIRFLOW_CONN_MONITORING_STORE": json.dumps(monitoring),
            "MLFLOW_S3_ENDPOINT_URL": env["AWS_ENDPOINT_URL"],
            "MLFLOW_ARTIFACT_BUCKET": MLFLOW_ARTIFACT_BUCKET,
            # No deploy target by default: the model server runs as a service of its own and follows
            # the champion alias (as compose's serving container); `local` would start a second one
            # next to whichever worker ran the task, and `ec2`'s rollout waits through SSM
            # ListCommandInvocations, which moto does not implement.
            "NS_DEPLOY_TARGETS": config.deploy_targets,
            "NS_RETRY_DELAY_SECONDS": str(config.retry_delay),
            # Runs come from the API, the drift DAG or the tests: no scheduled run competes with them.
            "NS_SCHEDULE_NETWORK_SECURITY_TRAINING": "none",
            "NS_SCHEDULE_NETWORK_SECURITY_DRIFT": "none",
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        }
    )
    return env


def base_environ() -> dict[str, str]:
    """The caller's environment without what would configure Airflow, MLflow or the project differently."""
    prefixes = ("AIRFLOW", "_AIRFLOW", "NS_", "MLFLOW_", "AWS_")
    return {key: value for key, value in os.environ.items() if not key.startswith(prefixes)}
