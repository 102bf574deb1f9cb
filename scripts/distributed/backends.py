"""The machine's PostgreSQL and Redis, as the distributed mode uses them (it starts neither).

This stack owns three databases (``ns_airflow_<suffix>``, ``ns_mlflow_<suffix>``,
``ns_monitoring_<suffix>``) and one Redis database number; it never creates, drops or flushes
anything else.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from scripts.distributed.config import Config, DistError

# Databases this stack may create and drop; nothing else is ever dropped.
PROTECTED_DATABASES = {"postgres", "root", "test", "template0", "template1"}


def pg_connect(config: Config, database: str = "postgres") -> Any:
    import psycopg2

    return psycopg2.connect(
        host=config.pg_host,
        port=config.pg_port,
        user=config.pg_user,
        password=config.pg_password or None,
        dbname=database,
        connect_timeout=5,
    )


def redis_client(config: Config) -> Any:
    import redis

    return redis.Redis(
        host=config.redis_host, port=config.redis_port, db=config.redis_db, socket_connect_timeout=3, socket_timeout=5
    )


def preflight(config: Config) -> str | None:
    """One line naming what is missing (PostgreSQL or Redis) and how to start it; None when both answer."""
    try:
        pg_connect(config).close()
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return (
            f"PostgreSQL is not reachable at {config.pg_host}:{config.pg_port} as {config.pg_user} ({reason}); "
            "start it (e.g. `service postgresql start`) or set NS_DIST_PG_HOST/NS_DIST_PG_PORT/NS_DIST_PG_USER"
        )
    try:
        redis_client(config).ping()
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return (
            f"Redis is not reachable at {config.redis_host}:{config.redis_port} ({reason}); "
            "start it (e.g. `service redis-server start` or `redis-server --daemonize yes`) "
            "or set NS_DIST_REDIS_HOST/NS_DIST_REDIS_PORT"
        )
    return None


def _own_databases(config: Config) -> list[str]:
    names = list(config.databases.values())
    for name in names:
        if name in PROTECTED_DATABASES or not name.startswith("ns_"):
            raise DistError(f"refusing to manage database {name!r}: choose another NS_DIST_DB_SUFFIX")
    return names


def existing_databases(config: Config) -> list[str]:
    connection = pg_connect(config)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT datname FROM pg_database WHERE datname = ANY(%s)", (_own_databases(config),))
            return sorted(row[0] for row in cursor.fetchall())
    finally:
        connection.close()


def _admin(config: Config, statements: Iterable[str]) -> None:
    connection = pg_connect(config)
    connection.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
    try:
        with connection.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
    finally:
        connection.close()


def create_databases(config: Config) -> list[str]:
    missing = [name for name in _own_databases(config) if name not in existing_databases(config)]
    _admin(config, [f'CREATE DATABASE "{name}"' for name in missing])
    return missing


def drop_databases(config: Config) -> list[str]:
    present = existing_databases(config)
    _admin(config, [f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in present])
    return present


def flush_redis(config: Config) -> int:
    """Empty this stack's Redis database (and only it); return how many keys it held."""
    client = redis_client(config)
    keys = client.dbsize()
    client.flushdb()
    return keys
