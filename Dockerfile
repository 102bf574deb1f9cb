# Airflow image of the distributed stack (docker-compose.yaml) and of production (the official
# Helm chart's `images.airflow`): the official image plus this project's pinned dependencies and
# code, laid out as in the repository so `tasks`, `include` and `scripts` resolve the same way.
# Build from the repository root:
#   docker build -t network-security-airflow .
# The tag must be the apache-airflow pin of requirements.txt (tests/infra checks it).
# No secrets here: Fernet key, JWT secret and connections come from the environment at run time.
FROM apache/airflow:3.3.2-python3.11

# The base image runs as its airflow user (uid 50000), which is how Python packages are
# added to it: nothing below runs as root.
WORKDIR /opt/airflow

# Dependencies first, so a code change does not reinstall them. constraints.txt pins every
# transitive version of the tested environment; requirements-nodeps.txt holds the packages whose
# declared metadata conflicts with the pins (see that file), installed without their dependencies.
# requirements-dev.txt (pytest, moto, ruff, schemathesis, playwright) is not installed here.
COPY requirements.txt requirements-nodeps.txt constraints.txt ./
RUN pip install --no-cache-dir -r requirements.txt -c constraints.txt \
    && pip install --no-cache-dir --no-deps -r requirements-nodeps.txt

# The distributed executor and the Postgres metadata/monitoring store need the celery and postgres
# providers, redis and psycopg2 (pinned in requirements.txt): fail the build if any is missing.
RUN python -c "import airflow.providers.celery, airflow.providers.postgres, psycopg2, redis"

# Code, owned by root and read-only to the airflow user. serving/ is here too: the deploy tasks
# digest the serving image's sources (tasks.deploy.IMAGE_SOURCES) to label the release.
COPY airflow_settings.yaml ./
COPY dags/ dags/
COPY plugins/ plugins/
COPY include/ include/
COPY tasks/ tasks/
COPY scripts/ scripts/
COPY serving/ serving/

# Same import roots as the embedded stack (scripts/stack.py): the project root for `tasks`,
# `scripts`, `serving`, and plugins/ for `network_security`.
ENV PYTHONPATH=/opt/airflow:/opt/airflow/plugins \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    GX_ANALYTICS_ENABLED=False
# auth/ is the mount point of the simple auth manager's password file (docker-compose.yaml);
# the import proves the layout before anything is deployed.
RUN mkdir -p /opt/airflow/auth \
    && python -c "import tasks.config, network_security.runtime, scripts.airflow_settings"

# The airflow user by id (uid 50000, gid 0 as the official image expects), so Kubernetes'
# runAsNonRoot can verify it.
USER 50000:0
