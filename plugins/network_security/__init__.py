"""Airflow adapters for the network-security DAGs: no decision lives here.

``tasks/`` holds every rule and knows nothing of Airflow; this package binds it to Airflow:
settings from the Variable, clients and stores from connections, domain errors as Airflow's,
the GX operator, the release and deploy groups' wiring, links, alerts, assets. Airflow puts ``plugins/`` on
``sys.path``, so DAGs import it as ``network_security``.
"""
