"""The known third-party warnings are silenced where they come from, and only there."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# A fresh process, as a task's: Airflow's deprecated shims loaded, warnings shown, then what the
# transform step does (save the fitted preprocessor with skops), then the same warning from our code.
CODE = textwrap.dedent(
    """
    import importlib, warnings
    warnings.simplefilter("default")
    shim = importlib.import_module("airflow.utils.timezone")
    import tasks  # installs the filters
    from tasks.datagen import generate
    from tasks.dataset_spec import load_spec
    from tasks.model_io import dump_skops
    from tasks.transform import build_preprocessor

    spec = load_spec("network_security")
    preprocessor = build_preprocessor(spec).fit(generate(spec, 50, seed=1)[spec.feature_names])
    with warnings.catch_warnings(record=True) as caught:
        dump_skops(preprocessor)
    print("FROM_SKOPS", len([w for w in caught if "airflow." in str(w.message)]))
    with warnings.catch_warnings(record=True) as caught:
        getattr(shim, "psi", None)
    print("ELSEWHERE", len([w for w in caught if "airflow." in str(w.message)]))
    """
)


def test_skops_walking_airflows_shims_is_silent_but_the_same_warning_from_our_code_is_not():
    done = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "FROM_SKOPS 0" in done.stdout, done.stdout
    assert "ELSEWHERE 1" in done.stdout, "the filter must not hide the warning when anything else triggers it"


def test_without_the_filter_skops_does_warn():
    """The filter is not a no-op: the same steps with the filters removed again produce the warnings."""
    code = CODE.replace(
        "import tasks  # installs the filters",
        "import tasks, warnings as w; w.resetwarnings(); w.simplefilter('default')",
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    count = int(done.stdout.split("FROM_SKOPS ")[1].split()[0])
    assert count > 100, done.stdout
