"""Helpers of the indexer and DAG tests: the image prefix, small published index versions (no
model involved)."""
import numpy as np

from core.settings import Settings
from indexer.index_policy import new_flat_index

PREFIX = Settings.model_fields["images_prefix"].default  # where the tests' images live


def unit_vectors(n, d=8, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def publish_random(repo, n=5, model_id="m-1"):
    """Publish a flat version of n random vectors keyed `<PREFIX><i>.jpg`; returns the version."""
    idx = new_flat_index(8)
    ids = np.arange(n, dtype=np.int64)
    idx.add_with_ids(unit_vectors(n), ids)
    keys = [f"{PREFIX}{i}.jpg" for i in range(n)]
    return repo.commit_version(idx, ids, keys, [f"e{i}" for i in range(n)], model_id)


def _set_checksum(vdir, name, drop=None):
    import hashlib
    import json

    manifest = json.loads((vdir / "manifest.json").read_text())
    manifest["checksums"][name] = hashlib.sha256((vdir / name).read_bytes()).hexdigest()
    if drop is not None:
        manifest["checksums"].pop(drop, None)
    (vdir / "manifest.json").write_text(json.dumps(manifest))


def to_legacy_table(vdir):
    """Turn a version into one written before table.arrow: its key table as table.json (ids,
    keys, etags as JSON lists), the manifest's checksums naming that file instead."""
    import json

    import pyarrow as pa

    table = pa.ipc.open_file(pa.BufferReader((vdir / "table.arrow").read_bytes())).read_all()
    (vdir / "table.json").write_text(json.dumps({
        "ids": table.column("id").to_pylist(), "keys": table.column("key").to_pylist(),
        "etags": table.column("etag").to_pylist()}))
    (vdir / "table.arrow").unlink()
    _set_checksum(vdir, "table.json", drop="table.arrow")


def write_key_table(vdir, table):
    """Replace a version's table.arrow with this Arrow table, the manifest's checksum kept
    consistent (a broken version that is self-consistent must still be refused)."""
    import pyarrow as pa

    with pa.OSFile(str(vdir / "table.arrow"), "wb") as sink, \
            pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    _set_checksum(vdir, "table.arrow")


def read_key_table_file(vdir):
    """A version's table.arrow, read into memory (not mapped: a test rewrites the file)."""
    import pyarrow as pa

    return pa.ipc.open_file(pa.BufferReader((vdir / "table.arrow").read_bytes())).read_all()
