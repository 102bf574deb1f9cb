"""The worker's preload: after it, a candidate's CV and a model's skops round trip import nothing heavy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tasks.dataset_spec import PROJECT_ROOT
from tasks.preload import MODULES, preload

HEAVY = ("sklearn", "scipy", "mlflow", "skops", "pyarrow", "pandas", "numpy", "boto3", "botocore")

# Run in a fresh interpreter: this test process has imported most of these already.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    from tasks.preload import preload
    seconds = preload()
    before = set(sys.modules)
    from tasks.datagen import generate
    from tasks.dataset_spec import load_spec
    from tasks.model_io import dump_skops, load_skops
    from tasks.train import TrainingConfig, cross_validate_candidate
    from tasks.transform import build_preprocessor

    spec = load_spec("network_security")
    frame = generate(spec, 400, 3)
    preprocessor = load_skops(dump_skops(build_preprocessor(spec).fit(frame[spec.feature_names])))
    config = TrainingConfig(
        cv_folds=2,
        seed=1,
        candidates={
            "logistic_regression": {"max_iter": 200},
            "random_forest": {"n_estimators": 5},
            "gradient_boosting": {"max_iter": 5},
        },
    )
    for name in config.candidates:
        cross_validate_candidate(preprocessor, frame, spec, config, name)
    print(json.dumps({
        "preloaded": sorted(seconds),
        "after": sorted(set(sys.modules) - before),
        "airflow": sorted(m for m in sys.modules if m.split(".")[0] == "airflow"),
    }))
    """
)


def test_after_the_preload_the_candidates_cross_validation_imports_no_heavy_module():
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["preloaded"] == sorted(MODULES)
    late = [name for name in found["after"] if name.split(".")[0] in HEAVY]
    assert late == [], f"imported after the preload (add them to tasks.preload.MODULES): {late}"
    assert found["airflow"] == []  # plain Python: a worker imports Airflow itself


def test_a_missing_module_is_named_with_what_to_do():
    with pytest.raises(ImportError, match=r"cannot import no_such_module_here .*requirements\.txt"):
        preload(("tasks", "no_such_module_here"))


def test_it_reports_each_module_it_imported():
    seconds = preload(("tasks", "json"))
    assert list(seconds) == ["tasks", "json"] and all(value >= 0 for value in seconds.values())
