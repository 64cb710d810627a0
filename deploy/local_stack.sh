#!/usr/bin/env bash
# The docker-compose stack without Docker, from the virtualenv:
#   SeaweedFS (S3, via deploy/local_s3.py) + the bucket, `airflow standalone` (api-server,
#   scheduler with LocalExecutor, dag-processor, triggerer on SQLite), and the search API.
#
#   deploy/local_stack.sh start    # starts all three in the background, waits until they answer
#   deploy/local_stack.sh status
#   deploy/local_stack.sh stop     # SIGINT to airflow standalone and the S3 server, SIGTERM to the
#                                  # API; waits for each to exit (SIGKILL only after a timeout)
#
# Then: Airflow UI http://127.0.0.1:8080 (AIRFLOW_ADMIN_USER / AIRFLOW_ADMIN_PASSWORD, default
# admin / admin), API http://127.0.0.1:8000, S3 127.0.0.1:9000; trigger the ingestion with
#   PATH=.venv/bin:$PATH AIRFLOW_HOME=data/stack/airflow airflow dags trigger flickr8k_data_ingestion
# (or from the UI). Settings come from .env (same names as docker-compose) and the environment;
# FLICKR8K_SOURCE says where the ingestion reads Flickr8k (a folder, a zip path or URL).
# Everything lives under STACK_DIR (default data/stack): logs, pids, S3 data, index, downloads.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VENV:-$ROOT/.venv}
PY=$VENV/bin/python
export PATH="$VENV/bin:$PATH"  # airflow standalone starts `airflow ...` subprocesses by name

if [ -f .env ]; then set -a; . ./.env; set +a; fi
STACK_DIR=$(realpath -m "${STACK_DIR:-data/stack}")
S3_PORT=${S3_PORT:-9000}
API_PORT=${API_PORT:-8000}
AIRFLOW_PORT=${AIRFLOW_PORT:-8080}

export STORE_BACKEND=s3
export MINIO_ENDPOINT=127.0.0.1:$S3_PORT
export MINIO_ACCESS_KEY=${MINIO_ACCESS_KEY:-minioadmin}
export MINIO_SECRET_KEY=${MINIO_SECRET_KEY:-minioadmin}
export MINIO_BUCKET=${MINIO_BUCKET:-flickr8k}
export MINIO_SECURE=false
# unset ones take core/settings.py's defaults (FLICKR8K_SOURCE: ../shared/datasets/flickr8k; a
# source that does not exist fails the ingestion at once, naming the variable to set)
if [ -n "${MODEL_PATH:-}" ]; then export MODEL_PATH=$(realpath -m "$MODEL_PATH"); fi
export INDEX_DIR=$STACK_DIR/index
export FLICKR8K_WORK_DIR=$STACK_DIR/downloads
export AIRFLOW_HOME=$STACK_DIR/airflow
export AIRFLOW__CORE__DAGS_FOLDER=$ROOT/dags
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=${AIRFLOW_DAGS_PAUSED:-False}
export AIRFLOW__API__PORT=$AIRFLOW_PORT
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL=http://127.0.0.1:$AIRFLOW_PORT/execution/
export AIRFLOW__API_AUTH__JWT_SECRET=${AIRFLOW_JWT_SECRET:-local-only-jwt-secret-change-me}
export AIRFLOW__API__SECRET_KEY=${AIRFLOW_SECRET_KEY:-local-only-secret-key-change-me}
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=$AIRFLOW_HOME/passwords.json
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

RUN=$STACK_DIR/run
LOGS=$STACK_DIR/logs

alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

wait_http() {  # name url seconds
  local i
  for i in $(seq 1 $(($3 * 2))); do
    if "$PY" -c "import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$2" 2>/dev/null; then
      return 0
    fi
    if ! alive "$1"; then echo "$1 exited; last lines of $LOGS/$1.log:" >&2; tail -20 "$LOGS/$1.log" >&2; return 1; fi
    sleep 0.5
  done
  echo "$1 did not answer on $2 in $3 s; see $LOGS/$1.log" >&2
  return 1
}

launch() {  # name command...: own session (signals from this shell do not reach it), pid file
  local name=$1; shift
  if alive "$name"; then echo "$name already running (pid $(cat "$RUN/$name.pid"))"; return 0; fi
  # background jobs of a script start with SIGINT ignored; restore it so that `stop` can use it
  setsid "$PY" -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])' \
    "$@" >>"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! > "$RUN/$name.pid"
}

stop_one() {  # name signal seconds
  local name=$1 sig=$2 secs=$3 pid i
  if ! alive "$name"; then rm -f "$RUN/$name.pid"; return 0; fi
  pid=$(cat "$RUN/$name.pid")
  kill "-$sig" "$pid"
  for i in $(seq 1 $((secs * 2))); do
    kill -0 "$pid" 2>/dev/null || { echo "$name stopped"; rm -f "$RUN/$name.pid"; return 0; }
    sleep 0.5
  done
  echo "$name did not stop on SIG$sig in $secs s: SIGTERM to its process group" >&2
  kill -TERM -- "-$pid" 2>/dev/null || true; sleep 5
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$RUN/$name.pid"
}

start() {
  mkdir -p "$RUN" "$LOGS" "$STACK_DIR/s3" "$INDEX_DIR" "$FLICKR8K_WORK_DIR" "$AIRFLOW_HOME"
  if [ ! -f "$MODEL_PATH" ]; then
    echo "no model checkpoint at $MODEL_PATH (set MODEL_PATH, or train one: python -m training)" >&2
    exit 1
  fi
  local t0=$SECONDS
  echo "== S3 server (SeaweedFS) on 127.0.0.1:$S3_PORT"
  launch s3 "$PY" deploy/local_s3.py --dir "$STACK_DIR/s3" --port "$S3_PORT" \
    --access-key "$MINIO_ACCESS_KEY" --secret-key "$MINIO_SECRET_KEY"
  wait_http s3 "http://127.0.0.1:$S3_PORT/healthz" 60
  # what minio-setup does in docker-compose: the bucket
  "$PY" -c "from objectstore import open_store; s = open_store(); print('bucket ready:', s.describe())"

  echo "== airflow standalone on 127.0.0.1:$AIRFLOW_PORT"
  "$PY" - <<'PY'
import json, os
path = os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
user = os.environ.get("AIRFLOW_ADMIN_USER", "admin")
with open(path, "w") as f:
    json.dump({user: os.environ.get("AIRFLOW_ADMIN_PASSWORD", "admin")}, f)
os.chmod(path, 0o600)
PY
  export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="${AIRFLOW_ADMIN_USER:-admin}:admin"
  launch airflow airflow standalone
  wait_http airflow "http://127.0.0.1:$AIRFLOW_PORT/api/v2/version" 240

  echo "== search API on 127.0.0.1:$API_PORT"
  launch api "$PY" -m search_api --host 127.0.0.1 --port "$API_PORT"
  wait_http api "http://127.0.0.1:$API_PORT/health" 180
  echo "== stack up in $((SECONDS - t0)) s (state under $STACK_DIR; 'deploy/local_stack.sh stop' stops it)"
  status
}

stop() {
  stop_one api TERM 30
  stop_one airflow INT 90
  stop_one s3 INT 30
}

status() {
  local name
  for name in s3 airflow api; do
    if alive "$name"; then echo "$name: running (pid $(cat "$RUN/$name.pid"))"; else echo "$name: stopped"; fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  restart) stop; start ;;
  *) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
