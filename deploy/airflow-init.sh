#!/usr/bin/env bash
# docker-compose `airflow-init`: migrate the metadata database, set the admin password of the
# simple auth manager from AIRFLOW_ADMIN_USER / AIRFLOW_ADMIN_PASSWORD, then exit 0.
set -euo pipefail
airflow db migrate
# the one-slot pool the index-writing tasks run in (dags/flickr8k_common.py): without it
# Airflow never schedules publish_index
airflow pools get flickr8k_index_writers >/dev/null 2>&1 ||
  airflow pools set flickr8k_index_writers 1 "index writers: publish and prune, one at a time"
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
