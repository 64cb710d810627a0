#!/usr/bin/env bash
# The whole path once, on the embedded default (local directory store, local index):
# ingest the Flickr8k dev split -> get the model -> build/publish the index -> start the API ->
# query it. Each stage prints its time. Re-running is cheap: every stage is idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PORT=${DEMO_PORT:-8000}
QUERY=${DEMO_QUERY:-a dog running on the beach}
SPLIT=${DEMO_SPLIT:-dev}
LIMIT=${DEMO_LIMIT:-}
MODEL_PATH=$($PY -c "from core.settings import get_settings; print(get_settings().model_path)")
mkdir -p data

stage() { STAGE_T0=$(date +%s.%N); echo; echo "=== $1"; }
done_stage() { printf '=== %s: %.1f s\n' "$1" "$(echo "$(date +%s.%N) - $STAGE_T0" | bc)"; }

stage "ingest Flickr8k ${SPLIT} split into the local object store"
$PY -m indexer ingest --split "$SPLIT" ${LIMIT:+--limit "$LIMIT"}
done_stage ingest

stage "model"
if [ -f "$MODEL_PATH" ]; then
  echo "using the shipped checkpoint $MODEL_PATH"
  $PY -c "from encoder import read_card; import json,sys; c=read_card(sys.argv[1]); print(json.dumps({'model_id': c['model_id'], 'dev': c.get('metrics', {}).get('text_to_image')}))" "$MODEL_PATH"
else
  echo "no checkpoint at $MODEL_PATH: training one (frozen towers, cached features)"
  $PY -m training --out "$MODEL_PATH" --epochs 20
fi
done_stage model

stage "index: embed new images and publish a version"
$PY -m indexer update
$PY -m indexer status
done_stage index

stage "start the API on 127.0.0.1:$PORT"
if [ -f data/api.pid ] && kill -0 "$(cat data/api.pid)" 2>/dev/null; then
  kill "$(cat data/api.pid)"; sleep 1
fi
nohup $PY -m search_api --port "$PORT" > data/api.log 2>&1 &
echo $! > data/api.pid
for _ in $(seq 1 120); do
  if curl -fs "http://127.0.0.1:$PORT/health" > /dev/null; then break; fi
  if ! kill -0 "$(cat data/api.pid)" 2>/dev/null; then cat data/api.log; exit 1; fi
  sleep 0.5
done
curl -fs "http://127.0.0.1:$PORT/health"; echo
done_stage api

stage "first query"
$PY demo.py --api "http://127.0.0.1:$PORT" --query "$QUERY" --top_k 5 --out data/demo_results.png
done_stage query
echo
echo "The API keeps running at http://127.0.0.1:$PORT (pid $(cat data/api.pid)); 'make stop' stops it."
