"""Airflow-side glue for the network-security DAGs.

``tasks/`` holds the logic and knows nothing of Airflow; this package holds the few
pieces that do: reading settings from Variables and run conf, S3 clients from the AWS
connection, turning rejected data into a non-retried failure, and the GX operator.
Airflow puts ``plugins/`` on ``sys.path``, so DAGs import it as ``network_security``.
"""
