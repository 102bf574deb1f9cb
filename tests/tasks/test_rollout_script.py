"""The serving host's rollout script run for real in bash, with fake docker, curl, nginx and aws on PATH.

The fakes (``tests/tasks/fake_host/``) keep each slot's served version in a file per port, fail
the pulls of images listed in ``bad_images``, and log every nginx reload with the upstream it
loaded; ``python3`` and ``flock`` are the real ones.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tasks.dataset_spec import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "include" / "serving_host" / "rollout.sh"
FAKES = Path(__file__).parent / "fake_host"
BLUE, GREEN = "8001", "8002"


@pytest.fixture
def host(tmp_path):
    fake, host_dir, nginx = tmp_path / "fake", tmp_path / "host", tmp_path / "nginx"
    for folder in (fake, host_dir, nginx):
        folder.mkdir()
    (host_dir / "api_key").write_text("key")
    env = {
        **os.environ,
        "PATH": f"{FAKES}:{os.environ['PATH']}",
        "FAKE": str(fake),
        "NS_HOST_DIR": str(host_dir),
        "NS_NGINX_UPSTREAM": str(nginx / "upstream.conf"),
        "NS_NGINX_MIRROR": str(nginx / "mirror.conf"),
        "NS_NGINX_IDLE": str(nginx / "idle.conf"),
        "NS_READY_ATTEMPTS": "2",
    }

    class Host:
        def run(self, *args: str) -> subprocess.CompletedProcess:
            return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)

        def ok(self, *args: str) -> str:
            done = self.run(*args)
            assert done.returncode == 0, done.stdout + done.stderr
            return done.stdout

        def upstream(self) -> str:
            return (nginx / "upstream.conf").read_text()

        def serving(self, port: str) -> str | None:
            file = fake / "ports" / port
            return file.read_text().strip() if file.exists() else None

        def live_version(self) -> str | None:
            (line,) = self.upstream().splitlines()
            return self.serving(line.split(":")[1].rstrip(";"))

        def reloads(self) -> int:
            log = fake / "nginx.log"
            return len(log.read_text().splitlines()) if log.exists() else 0

        def bad_image(self, image: str) -> None:
            with (fake / "bad_images").open("a") as bad:
                bad.write(image + "\n")

        def slot_files(self) -> dict[str, str]:
            return {p.name: p.read_text().strip() for p in host_dir.glob("slot-*.version")}

    return Host()


def image(version: str) -> str:
    return f"123.dkr.ecr.us-east-1.amazonaws.com/serving:ns-v{version}"


def release(host, version: str) -> None:
    host.ok("deploy", version, image(version))
    host.ok("complete", version)


def test_a_failed_pull_then_rollback_leaves_nginx_on_the_slot_serving_n_minus_1(host):
    release(host, "1")
    release(host, "2")  # blue serves v2 (live), green v1
    assert host.live_version() == "2"
    host.bad_image(image("3"))
    failed = host.run("deploy", "3", image("3"))
    assert failed.returncode != 0 and "pull of" in failed.stdout
    assert host.live_version() == "2"  # the failed deploy moved no traffic

    # The registry names v2: the slot that *reports* v2 is chosen, not "the other slot" (v1).
    out = host.ok("rollback", "2", image("2"))
    assert "serves v2 (asked on /model)" in out
    assert host.live_version() == "2"
    assert host.upstream().strip() == f"server 127.0.0.1:{BLUE};"
    assert host.serving(GREEN) == "1"


def test_the_same_rollout_twice_is_a_no_op_and_the_rollback_slot_survives(host):
    release(host, "1")
    release(host, "2")
    reloads, slots = host.reloads(), host.slot_files()
    out = host.ok("deploy", "2", image("2"))
    assert out.startswith("no-op: live slot")
    assert host.reloads() == reloads and host.slot_files() == slots
    assert host.serving(GREEN) == "1" and host.live_version() == "2"
    assert host.ok("complete", "2") and host.reloads() == reloads  # same upstream: no reload


def test_a_rollback_whose_slot_is_missing_exits_non_zero(host):
    release(host, "1")
    missing = host.run("rollback", "7")
    assert missing.returncode == 1 and "no slot serves v7" in missing.stdout
    host.bad_image(image("7"))
    unpullable = host.run("rollback", "7", image("7"))
    assert unpullable.returncode == 1 and "rollback failed" in unpullable.stdout
    assert host.live_version() == "1"  # what served keeps serving


def test_weights_and_mirror_shape_the_upstream(host):
    release(host, "1")
    host.ok("deploy", "2", image("2"))
    live_port = host.upstream().split(":")[1].rstrip(";\n")
    host.ok("weight", "10")
    lines = host.upstream().splitlines()
    assert lines[0].endswith(f"{live_port} weight=90;") and lines[1].endswith("weight=10;")
    host.ok("weight", "0")
    assert host.upstream().strip() == f"server 127.0.0.1:{live_port};"
    host.ok("mirror", "on")
    host.ok("complete", "2")
    assert host.live_version() == "2"
