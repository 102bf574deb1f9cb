"""Refuse to start the compose stack with a secret that is empty or still ``.env.example``'s ``change-me``.

Compose's ``${VAR:?}`` only catches an unset variable: the placeholder would start a stack whose
Fernet key, JWT secret and passwords everyone knows. The ``secrets-check`` service runs this
before anything else (every service waits for it); each refused secret is named with the command
that generates a proper one. A variable ending in ``_FILE`` names a file holding the secret (a
compose secret).

Usage: ``python -m scripts.check_secrets`` (reads the environment; exit status 1 when one is refused).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

PLACEHOLDER = "change-me"
TOKEN = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'
FERNET = 'python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"'
# The compose stack's secrets, and how to generate each (tests/infra checks compose uses no other).
SECRETS = {
    "POSTGRES_PASSWORD": f"{TOKEN}  (letters, digits, - and _ only: it goes into URIs)",
    "AIRFLOW__CORE__FERNET_KEY": FERNET,
    "AIRFLOW__API_AUTH__JWT_SECRET": TOKEN,
    "AIRFLOW__API__SECRET_KEY": TOKEN,
    "AIRFLOW_ADMIN_PASSWORD": TOKEN,
    "SERVING_API_KEY_FILE": f"mkdir -p secrets && {TOKEN} > secrets/serving_api_key",
    "SERVING_ADMIN_API_KEY_FILE": f"mkdir -p secrets && {TOKEN} > secrets/serving_admin_api_key",
}


def problems(environ: Mapping[str, str]) -> list[str]:
    """One line per refused secret, naming it and how to generate one; empty when all are set."""
    found = []
    for name, generate in SECRETS.items():
        value = environ.get(name, "")
        where = f"{name} (in .env)"
        if name.endswith("_FILE") and value:
            where = f"the file {value} ({name})"
            try:
                with open(value) as secret:
                    value = secret.read().strip()
            except OSError as err:
                found.append(f"{where} cannot be read ({err.strerror}); create it: {generate}")
                continue
        if not value or value.strip().lower() == PLACEHOLDER:
            shown = "empty" if not value else f"still {PLACEHOLDER!r}"
            found.append(f"{where} is {shown}; generate one: {generate}")
        elif name == "AIRFLOW__CORE__FERNET_KEY" and not _is_fernet_key(value):
            found.append(f"{where} is not a Fernet key (32 url-safe base64-encoded bytes); generate one: {generate}")
    return found


def _is_fernet_key(value: str) -> bool:
    from cryptography.fernet import Fernet

    try:
        Fernet(value.encode())
    except ValueError:
        return False
    return True


def main(environ: Mapping[str, str] | None = None) -> int:
    refused = problems(os.environ if environ is None else environ)
    for line in refused:
        print(f"secrets-check: {line}", file=sys.stderr)
    if refused:
        print(
            "secrets-check: the stack does not start with these; fix them in .env and run `docker compose up` again",
            file=sys.stderr,
        )
        return 1
    print(f"secrets-check: {len(SECRETS)} secrets set")
    return 0


if __name__ == "__main__":
    sys.exit(main())
