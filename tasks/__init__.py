"""The project's logic as plain Python: no Airflow import anywhere under ``tasks/``."""

import os

from tasks.known_warnings import silence_known_warnings

# Thread pools that share their cores (other tasks, the mapped candidates side by side,
# other users) must not spin. OpenMP (HistGradientBoosting): waiting threads sleep; with
# the default spin-wait a 16k-row boosting fit took 14 s instead of 1 s at load 10 on 2
# cores. OpenBLAS: one thread; its matrices here are small (90 columns) and its idle
# threads spin: a 16k-row logistic regression took 1.5 s with 2 threads, 0.04 s with one
# (README "Performance"). Both libraries read these once, when loaded (the first numpy /
# sklearn import), hence here; values set by the operator win. The estimators' own
# parallelism (n_jobs, OpenMP threads) is what uses the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

silence_known_warnings()
