"""Benchmarks and load tests of the model server; run by hand, not part of the test suite.

* ``python -m bench.serving``: latency and throughput of the server against
  ``mlflow models serve`` and the in-process floor.
* ``python -m bench.load_test``: a bounded load test checking that every prediction
  served is in the prediction log.
"""
