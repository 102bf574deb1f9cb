"""Airflow's public REST API (v2), as the tools use it: log in, wait for the DAGs, trigger, watch runs.

A JWT comes from the simple auth manager's ``POST /auth/token``; requests retry while the
api-server is busy or restarting, and log in again when the token expired. Used by
``make airflow`` (``scripts/airflow_ui.py``), the distributed mode and its tests.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote

TERMINAL_RUN_STATES = {"success", "failed"}


class ApiError(RuntimeError):
    """The API refused or did not answer; the message names the request and the answer."""


class AirflowApi:
    """The public REST API with a JWT from the simple auth manager's ``POST /auth/token``."""

    def __init__(self, base_url: str, username: str, password: str, where_logs: str = "") -> None:
        import httpx

        self.base_url = base_url
        self._credentials = {"username": username, "password": password}
        self._client = httpx.Client(base_url=base_url, timeout=30.0)
        self.where_logs = where_logs
        self._login()

    def _login(self) -> None:
        response = self._client.post("/auth/token", json=self._credentials)
        if response.status_code not in (200, 201):
            raise ApiError(
                f"login as {self._credentials['username']} at {self.base_url}/auth/token failed: "
                f"{response.status_code} {response.text[:300]}"
            )
        self._client.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        for attempt in range(5):
            try:
                response = self._client.request(method, "/api/v2" + path, **kwargs)
            except httpx.TransportError as err:  # the api-server is busy or restarting: try again
                if attempt == 4:
                    raise ApiError(f"{method} {self.base_url}/api/v2{path}: {err}") from err
                time.sleep(2)
                continue
            if response.status_code == 401 and attempt == 0:
                self._login()
                continue
            if response.status_code >= 400:
                raise ApiError(f"{method} /api/v2{path}: {response.status_code} {response.text[:500]}")
            return response.json() if response.content else None
        raise ApiError(f"{method} /api/v2{path}: no answer")

    def dag(self, dag_id: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", f"/dags/{dag_id}")
        except ApiError as err:
            if ": 404 " in str(err):
                return None
            raise

    def wait_for_dags(self, dag_ids: Iterable[str], timeout: float, unpause: bool = False) -> dict[str, bool]:
        """Until the dag-processor has parsed them (an import error fails at once); ``{dag_id: is_paused}``.

        With ``unpause``, a paused one is unpaused (and reported unpaused).
        """
        pending, found = list(dag_ids), {}
        deadline = time.monotonic() + timeout
        while pending:
            for dag_id in list(pending):
                dag = self.dag(dag_id)
                if dag is not None:
                    if unpause and dag.get("is_paused"):
                        self.pause(dag_id, False)
                        dag["is_paused"] = False
                    found[dag_id] = bool(dag.get("is_paused"))
                    pending.remove(dag_id)
            if not pending:
                break
            errors = self.request("GET", "/importErrors").get("import_errors", [])
            if errors or time.monotonic() > deadline:
                detail = [e.get("stack_trace", "").strip().splitlines()[-1:] for e in errors] or "none"
                raise ApiError(
                    f"DAGs {pending} not parsed within {timeout:.0f}s; import errors: {detail}; {self.where_logs}"
                )
            time.sleep(2)
        return found

    def trigger(
        self,
        dag_id: str,
        conf: dict[str, Any] | None = None,
        run_id: str | None = None,
        logical_date: dt.datetime | None = None,
    ) -> str:
        body: dict[str, Any] = {"conf": conf or {}, "logical_date": logical_date.isoformat() if logical_date else None}
        if run_id:
            body["dag_run_id"] = run_id
        return self.request("POST", f"/dags/{dag_id}/dagRuns", json=body)["dag_run_id"]

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self.request("GET", f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}")

    def dag_runs(self, dag_id: str) -> list[dict[str, Any]]:
        return self.request("GET", f"/dags/{dag_id}/dagRuns", params={"limit": 100})["dag_runs"]

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict[str, Any]]:
        found = self.request(
            "GET", f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances", params={"limit": 100}
        )
        return {ti["task_id"]: ti for ti in found["task_instances"]}

    def tries(self, dag_id: str, run_id: str, task_id: str) -> list[dict[str, Any]]:
        found = self.request("GET", f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}/tries")
        return sorted(found["task_instances"], key=lambda ti: ti["try_number"])

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
        """One XCom of a task instance (``map_index``: which instance of a mapped task)."""
        entry = self.request(
            "GET",
            f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}/xcomEntries/{key}",
            params={"stringify": "false", "deserialize": "true", "map_index": map_index},
        )
        return entry["value"]

    def wait_for_run(
        self,
        dag_id: str,
        run_id: str,
        timeout: float,
        observe: Callable[[dict[str, dict[str, Any]]], None] | None = None,
        poll: float = 2.0,
    ) -> dict[str, Any]:
        """Poll until the run is success or failed; ``observe`` sees the task instances at every poll."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.dag_run(dag_id, run_id)
            if observe is not None:
                observe(self.task_instances(dag_id, run_id))
            if run["state"] in TERMINAL_RUN_STATES:
                return run
            if time.monotonic() > deadline:
                states = {k: v["state"] for k, v in self.task_instances(dag_id, run_id).items()}
                raise ApiError(
                    f"{dag_id} run {run_id} still {run['state']} after {timeout:.0f}s; tasks: {states}; {self.where_logs}"
                )
            time.sleep(poll)

    def wait_for_task(
        self, dag_id: str, run_id: str, task_id: str, accept: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        """Poll until ``accept(task instance)``; fail early if the run ends first."""
        deadline = time.monotonic() + timeout
        while True:
            tis = self.task_instances(dag_id, run_id)
            ti = tis.get(task_id)
            if ti is not None and accept(ti):
                return ti
            run = self.dag_run(dag_id, run_id)
            if run["state"] in TERMINAL_RUN_STATES or time.monotonic() > deadline:
                states = {k: v["state"] for k, v in tis.items()}
                raise ApiError(
                    f"{dag_id} run {run_id}: {task_id} never reached the expected state "
                    f"(run {run['state']}, tasks {states}); {self.where_logs}"
                )
            time.sleep(1.0)

    def pause(self, dag_id: str, paused: bool = True) -> None:
        self.request("PATCH", f"/dags/{dag_id}", json={"is_paused": paused})

    def health(self) -> dict[str, Any]:
        """``/api/v2/monitor/health`` (no login needed)."""
        return self.request("GET", "/monitor/health")
