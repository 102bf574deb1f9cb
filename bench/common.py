"""What the benchmark and the load test share: server processes, request data, load, tables.

Load is generated with aiohttp on one event loop (uvloop when installed): on a small
machine the load generator competes with the server for CPU, and httpx's connection
pool costs several times more CPU per request than aiohttp's, enough to make the client
the bottleneck at 32 concurrent connections. httpx is used only for one-off requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from tasks.datagen import generate
from tasks.dataset_spec import DatasetSpec

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def moto_server(folder: Path, port: int | None = None) -> Iterator[str]:
    """A ``moto_server`` process on loopback for one bench (log in ``folder``), stopped on exit; yields its endpoint."""
    port = port or free_port()
    endpoint = f"http://{LOOPBACK}:{port}"
    log = (folder / "moto.log").open("wb")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", LOOPBACK, "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{endpoint}/moto-api/data.json", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start on {endpoint} (port taken?); see {folder / 'moto.log'}")
            time.sleep(0.2)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


class ServerError(RuntimeError):
    """A server process did not start, or died; the message ends with its log's last lines."""


class ServerProcess:
    """A server run as a subprocess in its own process group, its output in a log file.

    Args:
        name: Shown in messages.
        command: The command line.
        env: Its whole environment.
        ready_url: Answers 200 once the server can serve.
        log_path: Where its stdout and stderr go.
        start_timeout: Seconds to wait for ``ready_url``.
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        env: dict[str, str],
        ready_url: str,
        log_path: Path,
        start_timeout: float = 180.0,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.env = env
        self.ready_url = ready_url
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._stopped = False

    def start(self) -> None:
        """Start the process and wait until ``ready_url`` answers 200.

        Raises:
            ServerError: It exited or did not become ready in time (it is stopped then).
        """
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                self.command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=PROJECT_ROOT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"{self.name} exited with code {self.process.returncode}{self.log_tail()}")
            try:
                if httpx.get(self.ready_url, timeout=2.0, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop(timeout=5.0)
        raise ServerError(
            f"{self.name} was not ready at {self.ready_url} within {self.start_timeout:.0f}s{self.log_tail()}"
        )

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the process group and wait; SIGKILL what is left after ``timeout``.

        Returns:
            The exit code of the main process (negative for a signal), None if never started.
        """
        if self.process is None:
            return None
        if self._stopped:  # its process group is gone: never signal that id again
            return self.process.returncode
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait(10.0)
        # Workers a server forked may outlive it: the group goes too.
        self._signal(signal.SIGKILL)
        self._stopped = True
        return self.process.returncode

    def _signal(self, signum: int) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the log, as a message suffix."""
        try:
            text = self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""
        return f"; last lines of {self.log_path}:\n{text}" if text else ""

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serving_command(port: int, log_level: str = "warning") -> list[str]:
    """``python -m serving`` on loopback, as the benchmark and the load test run it."""
    return [sys.executable, "-m", "serving", "--host", LOOPBACK, "--port", str(port), "--log-level", log_level]


def base_environment() -> dict[str, str]:
    """This environment with the project importable, this interpreter's scripts first on PATH
    (``mlflow models serve`` runs ``uvicorn`` by name), no proxies for loopback and no
    download progress bars in the logs."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH")]))
    env["NO_PROXY"] = ",".join(filter(None, [env.get("NO_PROXY"), LOOPBACK, "localhost"]))
    env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    return env


def sample_records(spec: DatasetSpec, rows: int, seed: int) -> list[dict[str, Any]]:
    """Request records drawn by the project's data generator (the training data's distribution)."""
    frame = generate(spec, rows, seed=seed)[spec.feature_names]
    return [
        {
            name: value.item() if hasattr(value, "item") else value
            for name, value in zip(spec.feature_names, row, strict=True)
        }
        for row in frame.itertuples(index=False, name=None)
    ]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class LoadResult:
    """What a closed-loop load run measured.

    Attributes:
        seconds: Length of the measured window.
        latencies: Seconds per request answered within the window (any status).
        statuses: Count of answers per HTTP status within the window.
        transport_errors: Requests that failed within the window without an HTTP answer
            (refused, reset, timed out).
    """

    seconds: float
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    transport_errors: int = 0

    @property
    def requests(self) -> int:
        return len(self.latencies)

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def failed(self) -> int:
        return self.requests - self.ok + self.transport_errors

    def per_second(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else math.nan

    def ms(self, q: float) -> float:
        return 1000 * percentile(self.latencies, q)


async def closed_loop(
    session: aiohttp.ClientSession,
    url: str,
    bodies: Sequence[bytes],
    headers: dict[str, str],
    *,
    concurrency: int,
    seconds: float,
    warmup: float = 1.0,
) -> LoadResult:
    """``concurrency`` workers each sending one request after the other, for ``warmup + seconds``.

    The answers received within the measured window (after the warm-up) count, whenever
    their request was sent: throughput is the 200 answers received per second of the
    window, latency percentiles are over the same answers. Counting only requests both
    sent and answered within the window would leave out the slowest requests at its
    edges, and most of them for the slowest server.
    """
    started = time.perf_counter()
    window_start, window_end = started + warmup, started + warmup + seconds
    result = LoadResult(seconds=seconds)

    async def worker(index: int) -> None:
        sent = index
        while (now := time.perf_counter()) < window_end:
            body = bodies[sent % len(bodies)]
            sent += concurrency
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError):
                if window_start <= time.perf_counter() <= window_end:
                    result.transport_errors += 1
                continue
            done = time.perf_counter()
            if window_start <= done <= window_end:
                result.latencies.append(done - now)
                result.statuses[status] = result.statuses.get(status, 0) + 1

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return result


def client_session(concurrency: int, timeout: float = 60.0) -> aiohttp.ClientSession:
    """A keep-alive session holding at most one connection per worker (call inside the event loop)."""
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout))


def load_average() -> str:
    """The 1, 5 and 15-minute load averages, as ``uptime`` prints them."""
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def metric_values(base_url: str) -> dict[str, float]:
    """Samples of the server's Prometheus ``/metrics`` without labels, by name (e.g. ``prediction_log_written_total``)."""
    values: dict[str, float] = {}
    for line in httpx.get(f"{base_url}/metrics", timeout=10.0, trust_env=False).text.splitlines():
        name, _, value = line.partition(" ")
        if line.startswith("#") or "{" in name or not value:
            continue
        try:
            values[name] = float(value)
        except ValueError:
            continue
    return values


def run_async(main: Callable[[], Any]) -> Any:
    """Run a coroutine function on uvloop when installed (a leaner load generator), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (numbers right-aligned), readable as text too."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], int | float) for row in rows) if rows else False for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        padded = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric, strict=True))
        + "|"
    )
    return "\n".join([line([str(h) for h in headers]), rule, *(line(r) for r in cells)])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def resolve_alias(tracking_uri: str, model_name: str, alias: str, who: str) -> str:
    """The version ``model_name@alias`` points at; exits naming the problem when there is none."""
    from mlflow import MlflowClient

    from tasks.tracking import alias_version

    version = alias_version(MlflowClient(tracking_uri=tracking_uri), model_name, alias)
    if version is None:
        sys.exit(f"{who}: {model_name}@{alias} does not exist at {tracking_uri}; run `make run` first")
    return version
