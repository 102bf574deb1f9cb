"""Several models in one server, and a release per model: shadow, canary, abort, complete.

Model A is ``network_security``, model B ``intrusion_flows`` (another dataset, another
shape): whatever B's release does, A keeps serving the same version with the same answers.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.app import create_app
from serving.config import ModelEntry
from serving.release import takes_candidate
from tests.serving.conftest import (
    FLOWS_MODEL,
    LOG_BUCKET,
    Registry,
    make_log,
    make_settings,
    record_of,
    serving_client,
)

MODEL = "network_security"
TWO_MODELS = (ModelEntry(MODEL, MODEL), ModelEntry(FLOWS_MODEL, FLOWS_MODEL))


def _positive(pipeline: Any, record: dict[str, Any], positive_class: Any) -> float:
    frame = __import__("pandas").DataFrame([record])
    return float(pipeline.predict_proba(frame)[0, list(pipeline.classes_).index(positive_class)])


def _logged(aws: Any, prefix: str) -> list[dict[str, Any]]:
    listing = aws.list_objects_v2(Bucket=LOG_BUCKET, Prefix=prefix).get("Contents", [])
    return [
        json.loads(line)
        for item in listing
        for line in aws.get_object(Bucket=LOG_BUCKET, Key=item["Key"])["Body"].read().splitlines()
    ]


def _app(registry: Registry, aws: Any, **settings: Any):
    values = {"models": TWO_MODELS, **settings}
    return create_app(make_settings(registry, **values), prediction_log=make_log(aws))


def test_two_models_are_served_side_by_side_each_with_its_own_log(champion_is_v1: Registry, aws: Any, auth, spec):
    a_record, b_record = record_of(champion_is_v1.features, 0), record_of(champion_is_v1.flows_features, 0)
    with serving_client(_app(champion_is_v1, aws)) as api:
        ready = api.get("/ready").json()
        listing = api.get("/models", headers=auth).json()
        legacy = api.post("/predict", json=a_record, headers=auth).json()
        a = api.post(f"/models/{MODEL}/predict", json=a_record, headers=auth).json()
        b = api.post(f"/models/{FLOWS_MODEL}/predict", json=b_record, headers=auth).json()
        b_batch = api.post(f"/models/{FLOWS_MODEL}/predict/batch", json={"records": [b_record] * 3}, headers=auth)
        b_info = api.get(f"/models/{FLOWS_MODEL}", headers=auth).json()
        wrong_shape = api.post(f"/models/{FLOWS_MODEL}/predict", json=a_record, headers=auth)
        unknown = api.post("/models/no_such_model/predict", json=a_record, headers=auth)

    assert ready["models"] == {MODEL: "1", FLOWS_MODEL: "1"}
    assert listing["default"] == MODEL and [m["model_name"] for m in listing["models"]] == [MODEL, FLOWS_MODEL]
    assert (legacy["model_name"], a["model_name"], b["model_name"]) == (MODEL, MODEL, FLOWS_MODEL)
    assert legacy["probability"] == a["probability"]
    flows_spec = __import__("tasks.dataset_spec", fromlist=["load_spec"]).load_spec(FLOWS_MODEL)
    assert b["probability"] == _positive(champion_is_v1.flows_pipelines["1"], b_record, flows_spec.positive_class)
    assert b_batch.status_code == 200 and len(b_batch.json()["predictions"]) == 3
    assert (b_info["dataset"], b_info["model_version"], b_info["release"]) == (FLOWS_MODEL, "1", None)
    assert wrong_shape.status_code == 422 and wrong_shape.json()["detail"][0]["loc"][0] == "body"
    assert unknown.status_code == 404
    logged = {r["request_id"]: r for r in _logged(aws, "predictions/")}
    folders = {key["Key"].split("/")[1] for key in aws.list_objects_v2(Bucket=LOG_BUCKET)["Contents"]}
    assert folders == {MODEL, FLOWS_MODEL}
    assert logged[b["request_id"]]["model_name"] == FLOWS_MODEL and "role" not in logged[b["request_id"]]


def test_a_model_is_added_at_run_time_idempotently(champion_is_v1: Registry, aws: Any, auth, admin):
    with serving_client(create_app(make_settings(champion_is_v1), prediction_log=make_log(aws))) as api:
        before = api.post(
            f"/models/{FLOWS_MODEL}/predict", json=record_of(champion_is_v1.flows_features, 0), headers=auth
        )
        added = api.put(f"/admin/models/{FLOWS_MODEL}", json={"dataset": FLOWS_MODEL}, headers=admin)
        again = api.put(f"/admin/models/{FLOWS_MODEL}", json={"dataset": FLOWS_MODEL}, headers=admin)
        other = api.put(f"/admin/models/{FLOWS_MODEL}", json={"dataset": FLOWS_MODEL, "version": "2"}, headers=admin)
        missing = api.put("/admin/models/not_registered", json={"dataset": MODEL}, headers=admin)
        bad_dataset = api.put("/admin/models/x", json={"dataset": "../../etc/passwd"}, headers=admin)
        with_predict_key = api.put(f"/admin/models/{FLOWS_MODEL}", json={"dataset": FLOWS_MODEL}, headers=auth)
        after = api.post(
            f"/models/{FLOWS_MODEL}/predict", json=record_of(champion_is_v1.flows_features, 0), headers=auth
        )
        ready = api.get("/ready").json()

    assert before.status_code == 404
    assert (added.status_code, added.json()["model_version"], again.status_code) == (201, "1", 200)
    assert other.status_code == 409 and "changed by a release" in other.json()["detail"]
    assert missing.status_code == 404 and "not_registered is not served" in missing.json()["detail"]
    assert bad_dataset.status_code == 422 and with_predict_key.status_code == 403
    assert (after.status_code, after.json()["model_version"]) == (200, "1")
    assert ready["models"] == {MODEL: "1", FLOWS_MODEL: "1"}


def test_a_canary_takes_a_deterministic_share_of_request_ids(champion_is_v1: Registry, aws: Any, auth, admin):
    record = record_of(champion_is_v1.features, 3)
    ids = [f"req-{i}" for i in range(120)]
    with serving_client(_app(champion_is_v1, aws)) as api:
        started = api.post(
            f"/admin/models/{MODEL}/release",
            json={"candidate_version": "2", "mode": "canary", "weight": 0.3},
            headers=admin,
        )
        answers = {rid: api.post("/predict", json=record, headers={**auth, "X-Request-ID": rid}).json() for rid in ids}
        repeat = api.post("/predict", json=record, headers={**auth, "X-Request-ID": ids[0]}).json()
        batch = api.post(
            "/predict/batch", json={"records": [record] * 4}, headers={**auth, "X-Request-ID": "b-1"}
        ).json()
        report = api.get(f"/admin/models/{MODEL}/release", headers=admin).json()
        metrics = api.get("/metrics").text

    assert started.status_code == 200 and started.json()["state"] == "running"
    versions = {rid: answer["model_version"] for rid, answer in answers.items()}
    assert versions == {rid: "2" if takes_candidate(rid, 0.3) else "1" for rid in ids}
    assert 0.15 < sum(v == "2" for v in versions.values()) / len(ids) < 0.45
    assert repeat["model_version"] == versions[ids[0]]  # the same id, the same side
    assert {p["model_version"] for p in batch["predictions"]} == {"2" if takes_candidate("b-1", 0.3) else "1"}
    canary = sum(v == "2" for v in versions.values()) + (batch["model_version"] == "2") + (versions[ids[0]] == "2")
    roles = report["roles"]
    assert (roles["candidate"]["requests"], roles["baseline"]["requests"]) == (canary, len(ids) + 2 - canary)
    assert sum(roles["candidate"]["score_histogram"]) + sum(roles["baseline"]["score_histogram"]) == len(ids) + 1 + 4
    assert roles["baseline"]["p99_ms"] is not None and roles["candidate"]["errors_5xx"] == 0
    logged = {r["request_id"]: r for r in _logged(aws, f"predictions/{MODEL}/")}
    assert {logged[rid]["role"] for rid in ids} == {"baseline", "canary"}
    assert all(logged[rid]["role"] == ("canary" if versions[rid] == "2" else "baseline") for rid in ids)
    samples = {
        (s.labels["model_version"], s.labels["role"])
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.name == "model_requests_total"
    }
    assert {("1", "baseline"), ("2", "canary")} <= samples


def test_a_shadow_answers_with_the_baseline_and_the_log_records_both(
    champion_is_v1: Registry, aws: Any, auth, admin, spec
):
    records = [record_of(champion_is_v1.features, i) for i in range(30)]
    with serving_client(_app(champion_is_v1, aws)) as api:
        api.post(f"/admin/models/{MODEL}/release", json={"candidate_version": "2", "mode": "shadow"}, headers=admin)
        singles = [api.post("/predict", json=r, headers=auth).json() for r in records[:10]]
        batch = api.post("/predict/batch", json={"records": records[10:]}, headers=auth).json()
        deadline = time.monotonic() + 10
        while api.get(f"/admin/models/{MODEL}/release", headers=admin).json()["shadow"]["rows"] < 30:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        report = api.get(f"/admin/models/{MODEL}/release", headers=admin).json()

    answers = singles + batch["predictions"]
    assert {a["model_version"] for a in answers} == {"1"}
    v1, v2 = champion_is_v1.pipelines["1"], champion_is_v1.pipelines["2"]
    expected_v2 = [_positive(v2, r, spec.positive_class) for r in records]
    logged = {r["request_id"]: r for r in _logged(aws, f"predictions/{MODEL}/")}
    for answer, record, probability in zip(answers, records, expected_v2, strict=True):
        row = logged[answer["request_id"]]
        assert (row["role"], row["model_version"], row["shadow_model_version"]) == ("baseline", "1", "2")
        assert abs(row["shadow_probability"] - probability) < 1e-6
        assert row["shadow_label"] == v2.predict(__import__("pandas").DataFrame([record]))[0]
    agreement = np.mean(v1.predict(champion_is_v1.features.iloc[:30]) == v2.predict(champion_is_v1.features.iloc[:30]))
    assert report["shadow"]["rows"] == 30 and report["shadow"]["agreement_rate"] == pytest.approx(agreement)
    assert report["roles"]["candidate"]["requests"] >= 1 and report["shadow"]["candidate_p99_ms"] is not None


def test_a_failing_slow_shadow_neither_fails_nor_slows_the_caller(champion_is_v1: Registry, aws: Any, auth, admin):
    release = {"candidate_version": "2", "mode": "shadow", "fault": {"error_rate": 1.0, "latency_ms": 300}}
    record = record_of(champion_is_v1.features, 1)
    with serving_client(_app(champion_is_v1, aws, fault_injection=True)) as api:
        assert api.post(f"/admin/models/{MODEL}/release", json=release, headers=admin).status_code == 200
        timings, statuses = [], []
        for _ in range(5):
            started = time.perf_counter()
            statuses.append(api.post("/predict", json=record, headers=auth).status_code)
            timings.append(time.perf_counter() - started)
        deadline = time.monotonic() + 10
        while api.get(f"/admin/models/{MODEL}/release", headers=admin).json()["shadow"]["failed_rows"] < 5:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        report = api.get(f"/admin/models/{MODEL}/release", headers=admin).json()

    assert statuses == [200] * 5 and max(timings) < 0.3
    assert report["shadow"]["failed_rows"] == 5 and report["roles"]["candidate"]["errors_5xx"] >= 1
    assert report["roles"]["baseline"]["errors_5xx"] == 0
    rows = _logged(aws, f"predictions/{MODEL}/")
    assert len(rows) == 5 and all(r["shadow_model_version"] == "2" and "shadow_label" not in r for r in rows)


def test_fault_injection_is_refused_unless_the_server_allows_it(champion_is_v1: Registry, aws: Any, admin):
    release = {"candidate_version": "2", "mode": "canary", "weight": 0.5, "fault": {"error_rate": 0.5}}
    with serving_client(_app(champion_is_v1, aws)) as api:
        answer = api.post(f"/admin/models/{MODEL}/release", json=release, headers=admin)
        report = api.get(f"/admin/models/{MODEL}/release", headers=admin).json()
    assert answer.status_code == 403 and "FAULT_INJECTION=true" in answer.json()["detail"]
    assert report["state"] == "none"


def test_a_failing_canary_counts_5xx_for_the_candidate_and_abort_restores_the_baseline(
    champion_is_v1: Registry, aws: Any, auth, admin
):
    release = {"candidate_version": "2", "mode": "canary", "weight": 1.0, "fault": {"error_rate": 1.0}}
    record = record_of(champion_is_v1.features, 2)
    with serving_client(_app(champion_is_v1, aws, fault_injection=True)) as api:
        api.post(f"/admin/models/{MODEL}/release", json=release, headers=admin)
        failed = [api.post("/predict", json=record, headers=auth) for _ in range(4)]
        tripped = api.get(f"/admin/models/{MODEL}/release", headers=admin).json()
        aborted = api.post(f"/admin/models/{MODEL}/release/abort", headers=admin).json()
        again = api.post(f"/admin/models/{MODEL}/release/abort", headers=admin)
        after = [api.post("/predict", json=record, headers=auth) for _ in range(4)]

    assert {r.status_code for r in failed} == {503}
    assert failed[0].json()["detail"] == "model network_security v2 failed to score the request (InjectedFault)"
    assert (tripped["roles"]["candidate"]["errors_5xx"], tripped["roles"]["candidate"]["error_rate"]) == (4, 1.0)
    assert aborted["state"] == "aborted" and again.status_code == 200 and again.json()["state"] == "aborted"
    assert {(r.status_code, r.json()["model_version"]) for r in after} == {(200, "1")}


def test_complete_makes_the_candidate_the_baseline_until_the_alias_moves(
    champion_is_v1: Registry, aws: Any, auth, admin
):
    record = record_of(champion_is_v1.features, 4)
    with serving_client(_app(champion_is_v1, aws)) as api:
        none_yet = api.post(f"/admin/models/{MODEL}/release/complete", headers=admin)
        api.post(
            f"/admin/models/{MODEL}/release",
            json={"candidate_version": "2", "mode": "canary", "weight": 0.1},
            headers=admin,
        )
        completed = api.post(f"/admin/models/{MODEL}/release/complete", headers=admin)
        repeated = api.post(f"/admin/models/{MODEL}/release/complete", headers=admin)
        served = {api.post("/predict", json=record, headers=auth).json()["model_version"] for _ in range(5)}
        held = api.post("/admin/reload", headers=admin).json()  # champion still points at v1
        champion_is_v1.move_alias("champion", "2")
        caught_up = api.post("/admin/reload", headers=admin).json()
        champion_is_v1.move_alias("champion", "1")
        follows = api.post("/admin/reload", headers=admin).json()

    assert none_yet.status_code == 409
    assert completed.json()["state"] == "completed" and completed.json()["baseline_version_now"] == "2"
    assert repeated.status_code == 200 and repeated.json()["state"] == "completed"
    assert served == {"2"}
    assert held == {"old_version": "2", "new_version": "2", "reloaded": False}
    assert caught_up["new_version"] == "2" and follows == {"old_version": "2", "new_version": "1", "reloaded": True}


def test_release_calls_are_idempotent_and_a_new_step_restarts_the_counters(
    champion_is_v1: Registry, aws: Any, auth, admin
):
    step = {"candidate_version": "2", "mode": "canary", "weight": 0.5}
    record = record_of(champion_is_v1.features, 5)
    with serving_client(_app(champion_is_v1, aws)) as api:
        baseline_release = api.post(
            f"/admin/models/{MODEL}/release", json={**step, "candidate_version": "1"}, headers=admin
        )
        unknown_version = api.post(
            f"/admin/models/{MODEL}/release", json={**step, "candidate_version": "99"}, headers=admin
        )
        first = api.post(f"/admin/models/{MODEL}/release", json=step, headers=admin).json()
        for i in range(6):
            api.post("/predict", json=record, headers={**auth, "X-Request-ID": f"s{i}"})
        repeated = api.post(f"/admin/models/{MODEL}/release", json=step, headers=admin).json()
        next_step = api.post(f"/admin/models/{MODEL}/release", json={**step, "weight": 1.0}, headers=admin).json()

    assert baseline_release.status_code == 409 and unknown_version.status_code == 404
    counted = lambda report: sum(role["requests"] for role in report["roles"].values())  # noqa: E731
    assert (counted(first), counted(repeated), counted(next_step)) == (0, 6, 0)
    assert repeated["started_at"] == first["started_at"] and next_step["weight"] == 1.0


def test_releasing_and_rolling_back_model_b_never_changes_what_model_a_serves(
    champion_is_v1: Registry, aws: Any, auth, admin
):
    a_records = [record_of(champion_is_v1.features, i) for i in range(8)]
    b_record = record_of(champion_is_v1.flows_features, 0)
    a_answers: list[tuple[int, str, float]] = []
    stop = threading.Event()
    with serving_client(_app(champion_is_v1, aws, fault_injection=True)) as api:

        def client_of_a() -> None:
            while not stop.is_set():
                for i, record in enumerate(a_records):
                    answer = api.post(f"/models/{MODEL}/predict", json=record, headers=auth)
                    a_answers.append(
                        (answer.status_code, answer.json()["model_version"], answer.json()["probability"], i)
                    )

        thread = threading.Thread(target=client_of_a)
        thread.start()
        try:
            b = f"/admin/models/{FLOWS_MODEL}/release"
            steps = [
                (b, {"candidate_version": "2", "mode": "shadow"}),
                (b, {"candidate_version": "2", "mode": "canary", "weight": 1.0, "fault": {"error_rate": 1.0}}),
                (f"{b}/abort", None),
                (b, {"candidate_version": "2", "mode": "canary", "weight": 0.5}),
                (f"{b}/complete", None),
            ]
            for path, body in steps:
                assert api.post(path, json=body, headers=admin).status_code == 200
                api.post(f"/models/{FLOWS_MODEL}/predict", json=b_record, headers=auth)
                time.sleep(0.05)
            b_after = api.post(f"/models/{FLOWS_MODEL}/predict", json=b_record, headers=auth).json()
            a_release = api.get(f"/admin/models/{MODEL}/release", headers=admin).json()
        finally:
            stop.set()
            thread.join(10)

    expected = {i: p for i, p in ((i, None) for i in range(8))}
    for status, version, probability, i in a_answers:
        assert (status, version) == (200, "1")
        expected[i] = probability if expected[i] is None else expected[i]
        assert probability == expected[i]  # A's answers never moved
    assert len(a_answers) > 10
    assert b_after["model_version"] == "2" and a_release["state"] == "none"
