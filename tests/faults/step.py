"""One step of a fanned-out index run, as its own process (what an Airflow task instance runs),
for the fault tests to kill: `python -m tests.faults.step plan OUT`, `... shard PLAN N OUT`,
`... publish PLAN OUT REPORT...`, `... upload FOLDER OUT` (the ingestion's upload). Settings
come from the environment (INDEX_DIR, MODEL_PATH, the store); results are written as JSON to
OUT."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from indexer import jobs


def main(argv: list[str]) -> None:
    step, *args = argv
    if step == "plan":
        out = jobs.plan_shards()
    elif step == "shard":
        plan, position = json.loads(Path(args[0]).read_text()), int(args[1])
        out = jobs.embed_shard(plan[position])
        args = args[1:]
    elif step == "upload":
        out = jobs.upload(args[0])
    elif step == "publish":
        plan = json.loads(Path(args[0]).read_text())
        out = jobs.publish_index(plan, [json.loads(Path(r).read_text()) for r in args[2:]])
    else:
        raise SystemExit(f"unknown step {step}")
    Path(args[1]).write_text(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
