"""A fanned-out FAISS index run on a local store of a few generated photos, whose steps the
fault tests run in processes of their own and kill (`tests.faults.kill_points`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.settings import Settings
from tests.conftest import COLORS, make_image
from tests.faults.kill_points import hook_dir, kill_at
from tests.indexer.helpers import PREFIX

ROOT = Path(__file__).resolve().parents[2]
SHARD_SIZE = 4


def photo_key(i: int) -> str:
    return f"{PREFIX}photo-{i:03d}.jpg"


class IndexRun:
    """Steps of `indexer.jobs` on this test's store and INDEX_DIR: in this process (`plan`,
    `shard`, `publish`), or as a process of their own that a fault point stops (`kill_*`)."""

    def __init__(self, tmp_path: Path, model_path: Path, store_dir: Path | None = None,
                 **settings):
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.dir = tmp_path
        self.index_dir = tmp_path / "index"
        values = {"index_dir": str(self.index_dir), "model_path": str(model_path),
                  "store_backend": "local", "local_store_dir": str(store_dir or tmp_path / "store"),
                  "minio_bucket": "photos", "embed_shard_size": SHARD_SIZE,
                  "embed_max_shards": 8, "image_runtime": "torch", **settings}
        self.settings = Settings(_env_file=None, **values)
        self.env = {**os.environ, **{k.upper(): str(v) for k, v in values.items()},
                    "PYTHONPATH": os.pathsep.join(filter(None, [
                        str(hook_dir(tmp_path)), str(ROOT), os.environ.get("PYTHONPATH")]))}
        from objectstore import open_store

        self.store = open_store(self.settings)
        self._n = 0

    # --- the store -----------------------------------------------------------------------------
    def put(self, numbers) -> None:
        colors = list(COLORS)
        for i in numbers:
            self.store.put(photo_key(i), make_image(colors[i % len(colors)],
                                                    ("circle", "square")[i // len(colors) % 2],
                                                    seed=i), "image/jpeg")

    # --- the steps, here -----------------------------------------------------------------------
    def plan(self, force_rebuild: bool = False) -> list[dict]:
        from indexer import jobs

        return jobs.plan_shards(force_rebuild, settings=self.settings)

    def shard(self, plan: list[dict], position: int) -> dict:
        from indexer import jobs

        return jobs.embed_shard(plan[position], settings=self.settings)

    def publish(self, plan: list[dict], reports: list[dict]) -> dict:
        from indexer import jobs

        return jobs.publish_index(plan, reports, settings=self.settings)

    def run_all(self) -> dict:
        plan = self.plan()
        return self.publish(plan, [self.shard(plan, i) for i in range(len(plan))])

    def prune(self) -> dict:
        from indexer import jobs

        return jobs.prune_versions(settings=self.settings)

    # --- the steps as processes ----------------------------------------------------------------
    def _files(self, plan: list[dict], reports: list[dict] = ()) -> tuple[Path, list[Path]]:
        self._n += 1
        plan_file = self.dir / f"plan-{self._n}.json"
        plan_file.write_text(json.dumps(plan))
        report_files = []
        for j, r in enumerate(reports):
            report_files.append(self.dir / f"report-{self._n}-{j}.json")
            report_files[-1].write_text(json.dumps(r))
        return plan_file, report_files

    def _step(self, *args) -> list[str]:
        return [sys.executable, "-m", "tests.faults.step", *map(str, args)]

    def shard_process(self, plan: list[dict], position: int) -> dict:
        plan_file, _ = self._files(plan)
        out = self.dir / f"out-{self._n}.json"
        r = subprocess.run(self._step("shard", plan_file, position, out), env=self.env,
                           cwd=self.dir, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(out.read_text())

    def kill_shard(self, plan: list[dict], position: int, point: str, **kw) -> None:
        plan_file, _ = self._files(plan)
        kill_at(self._step("shard", plan_file, position, self.dir / "never.json"), self.env,
                point, self.dir / f"marker-{self._n}", self.dir, **kw)

    def kill_publish(self, plan: list[dict], reports: list[dict], point: str, **kw) -> None:
        plan_file, report_files = self._files(plan, reports)
        kill_at(self._step("publish", plan_file, self.dir / "never.json", *report_files),
                self.env, point, self.dir / f"marker-{self._n}", self.dir, **kw)

    # --- what anyone can check -----------------------------------------------------------------
    def verify_cli(self) -> dict:
        r = subprocess.run([sys.executable, "-m", "indexer", "verify", "--json"], env=self.env,
                           cwd=self.dir, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
        return json.loads(r.stdout)

    def top_hit(self, encoder, key: str) -> str:
        """The published version's best match for the photo stored under `key`."""
        from indexer.pipeline import embed_objects
        vectors = embed_objects(self.store, encoder, [self.store.stat(key)], progress=False).vectors
        index = self.open_index()
        try:
            _, keys = index.view(encoder.model_id).search(np.asarray(vectors), 1)
        finally:
            index.close()
        return keys[0][0]

    def open_index(self):
        from indexer.vector_index import open_index

        return open_index(self.settings)

    def leftovers(self) -> list[str]:
        """What a killed step may leave in INDEX_DIR/versions: drafts and temp folders."""
        versions = self.index_dir / "versions"
        return sorted(p.name for p in versions.iterdir() if p.name.startswith(".")) \
            if versions.is_dir() else []


@pytest.fixture
def index_run(tmp_path, small_checkpoint) -> IndexRun:
    return IndexRun(tmp_path, small_checkpoint)
