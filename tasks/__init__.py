"""The project's logic as plain Python: no Airflow import anywhere under ``tasks/``."""

from tasks.known_warnings import silence_known_warnings

silence_known_warnings()
