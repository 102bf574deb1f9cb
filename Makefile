# The README's commands. `make run` and `make test` create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PYTHONPATH := $(CURDIR):$(CURDIR)/plugins

.PHONY: help venv run test test-unit test-integration lint format stack-up stack-down stop stack-status publish-drop suites lock clean-state deploy rollback bench-serving load-test bench-drift bench-train bench-pipeline bench-distributed airflow test-browser distributed-up distributed-down distributed-status distributed-test

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s "$$(printf '\t')"

$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required (found " + sys.version.split()[0] + "); set PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	@touch $@

venv: $(STAMP) ## create the virtualenv (pinned by constraints.txt)

run: $(STAMP) ## the closed loop on the embedded stack: train, deploy, serve, drift, retrain, redeploy (ARGS=--no-loop: first training only)
	$(PY) -m scripts.run_pipeline $(if $(DS),--ds $(DS)) $(ARGS)

# `make test` runs the suite's files on TEST_WORKERS pytest-xdist processes (whole files per
# worker, the integration modules first: tests/conftest.py); each worker starts its own private
# stack. TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2

test: $(STAMP) ## the whole test suite (unit, DAG integrity, integration on a private stack; TEST_WORKERS=2)
	$(PY) -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

test-unit: $(STAMP) ## tests without the local stack
	$(PY) -m pytest -m "not integration"

test-integration: $(STAMP) ## DAG runs against a private moto + MLflow stack
	$(PY) -m pytest -m integration

lint: $(STAMP) ## ruff (incl. Airflow AIR rules) and the GX suites' match with the specs
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m tasks.validate check-suite

format: $(STAMP) ## apply ruff formatting and fixes
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test-browser: $(STAMP) ## the Airflow UI in headless Chromium (Debian `chromium`): log in, trigger, follow "MLflow run"
	$(PY) -m pytest -m browser

distributed-test: $(STAMP) ## CeleryExecutor on Postgres + Redis for real: REST trigger, deferrable sensor, drift retrain, a killed worker
	$(PY) -m scripts.distributed test

airflow: $(STAMP) ## the embedded stack + `airflow standalone` (UI on AIRFLOW_PORT, 8080); prints the URL and the login
	$(PY) -m scripts.airflow_ui up

distributed-up: $(STAMP) ## distributed mode on loopback: Postgres metadata, Celery (Redis), 2 workers, MLflow on Postgres (ARGS=--fresh)
	$(PY) -m scripts.distributed up $(ARGS)

distributed-down: $(STAMP) ## stop what distributed-up started (ARGS=--drop also drops its databases)
	$(PY) -m scripts.distributed down $(ARGS)

distributed-status: $(STAMP) ## the distributed mode's processes
	$(PY) -m scripts.distributed status

stack-up: $(STAMP) ## start moto + MLflow, migrate Airflow's DB, apply airflow_settings.yaml, create buckets
	$(PY) -m scripts.bootstrap up

stack-down: $(STAMP) ## stop what stack-up, make airflow and the deploys started (by pid file)
	$(PY) -m scripts.stack down

stop: stack-down ## alias of stack-down

stack-status: $(STAMP) ## show the stack's services
	$(PY) -m scripts.stack status

publish-drop: $(STAMP) ## publish a generated day: make publish-drop DS=2026-01-01 [ARGS="--feature-drift 1.0"]
	@test -n "$(DS)" || (echo "usage: make publish-drop DS=YYYY-MM-DD [ARGS=...]" && exit 2)
	. .state/env.sh && $(PY) -m tasks.datagen publish --ds $(DS) $(ARGS)

deploy: $(STAMP) ## redeploy the registry's champion to the deploy targets (network_security_deploy DAG)
	$(PY) -m scripts.deploy redeploy

rollback: $(STAMP) ## champion back to previous_champion, redeployed the same way: make rollback REASON="..."
	@test -n "$(REASON)" || (echo 'usage: make rollback REASON="why"' && exit 2)
	$(PY) -m scripts.deploy rollback --reason "$(REASON)"

bench-serving: $(STAMP) ## serving benchmark: this app vs `mlflow models serve` vs in-process (needs `make run` first)
	@test -f .state/env.sh || (echo "no embedded stack: run 'make run' first (the benchmark serves its champion)" && exit 2)
	. .state/env.sh && $(PY) -m bench.serving $(ARGS)

load-test: $(STAMP) ## 60 s load test of the model server: zero 5xx, every prediction in the S3 log (needs `make run` first)
	@test -f .state/env.sh || (echo "no embedded stack: run 'make run' first (the load test serves its champion)" && exit 2)
	. .state/env.sh && $(PY) -m bench.load_test $(ARGS)

bench-drift: $(STAMP) ## drift step vs Evidently on the full data at 100k, 1M, 10M rows (own emulator; ~3 min)
	$(PY) -m bench.drift $(ARGS)

bench-train: $(STAMP) ## train step (CV + refit + MLflow + registry) vs a bare sklearn fit at 100k and 1M rows, and today's config (own stack; ~15 min)
	nice $(PY) -m bench.train $(ARGS)

bench-distributed: $(STAMP) ## mapped candidates on the distributed mode's 2 workers vs the same candidates in sequence, 1M rows (starts/stops its stack; ~15 min)
	nice $(PY) -m bench.distributed_training $(ARGS)

bench-pipeline: $(STAMP) ## the training DAG through `airflow dags test` vs its tasks/ functions in one process on a 1M-row drop (own stack)
	nice $(PY) -m bench.pipeline $(ARGS)

suites: $(STAMP) ## regenerate include/expectations/*.json from include/datasets/*.yaml
	$(PY) -m tasks.validate build-suite

lock: ## re-resolve requirements and rewrite constraints.txt
	rm -rf /tmp/ns-lock && $(PYTHON) -m venv /tmp/ns-lock
	/tmp/ns-lock/bin/pip install --quiet -r requirements.txt -r requirements-dev.txt && /tmp/ns-lock/bin/pip install --quiet --no-deps -r requirements-nodeps.txt
	(echo "# pip freeze of a working install of requirements.txt + requirements-dev.txt + requirements-nodeps.txt (Python 3.11, Linux x86_64)."; echo "# Regenerate with: make lock"; /tmp/ns-lock/bin/pip freeze) > constraints.txt

clean-state: stack-down ## stop the stack and delete .state/ (all local data)
	rm -rf .state
