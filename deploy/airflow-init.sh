#!/usr/bin/env bash
# docker-compose `airflow-init`: migrate the metadata database, set the admin password of the
# simple auth manager from AIRFLOW_ADMIN_USER / AIRFLOW_ADMIN_PASSWORD, then exit 0.
set -euo pipefail
airflow db migrate
python - <<'PY'
import json, os
path = os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
os.makedirs(os.path.dirname(path), exist_ok=True)
user = os.environ.get("AIRFLOW_ADMIN_USER", "admin")
with open(path, "w") as f:
    json.dump({user: os.environ.get("AIRFLOW_ADMIN_PASSWORD", "admin")}, f)
os.chmod(path, 0o600)
print(f"airflow-init: database migrated; user {user!r} can log in")
PY
