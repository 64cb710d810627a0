"""docker-compose.scale.yml (Milvus as the vector index) on top of docker-compose.yml, validated
like the main file: `docker-compose config` over both files, then the structure it relies on."""
from __future__ import annotations

import os
import shutil
import subprocess

import yaml

from core.settings import Settings

from .test_compose import COMPOSE, ROOT, _docker_compose

SCALE = ROOT / "docker-compose.scale.yml"


def _config(tmp_path) -> dict:
    work = tmp_path / "project"
    (work / "deploy").mkdir(parents=True)
    (work / "models").mkdir()
    for f in (COMPOSE, SCALE):
        shutil.copy(f, work / f.name)
    for f in ("Dockerfile.api", "Dockerfile.airflow", "minio-setup.sh"):
        shutil.copy(ROOT / "deploy" / f, work / "deploy" / f)
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
    env["API_KEY"] = "from-the-shell"
    r = subprocess.run([_docker_compose(), "-f", COMPOSE.name, "-f", SCALE.name, "config"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"docker-compose config failed:\n{r.stderr}"
    assert "WARNING" not in r.stderr, r.stderr
    return yaml.safe_load(r.stdout)


def test_scale_file_validates_and_puts_the_api_and_dags_on_milvus(tmp_path):
    cfg = _config(tmp_path)
    services = cfg["services"]
    assert {"etcd", "milvus", "api", "api-replica", "minio", "airflow-scheduler"} <= set(services)
    milvus = services["milvus"]
    # the server version the tests run (PyPI milvus==2.3.5), on the stack's MinIO and its etcd
    assert milvus["image"].endswith(":v2.3.5")
    from deploy.local_milvus import SEGMENT_MAX_MB  # the segment size the tests' server runs

    assert f"maxSize: {SEGMENT_MAX_MB} " in " ".join(milvus["command"])
    assert milvus["command"][-1].endswith("exec milvus run standalone")
    assert milvus["environment"]["MINIO_ADDRESS"] == "minio:9000"
    assert milvus["environment"]["ETCD_ENDPOINTS"] == "etcd:2379"
    assert {"etcd", "minio"} <= set(milvus["depends_on"])
    assert all(p["host_ip"] == "127.0.0.1" for p in milvus["ports"]) if isinstance(
        milvus["ports"][0], dict) else all(p.startswith("127.0.0.1:") for p in milvus["ports"])
    fields = set(Settings.model_fields)
    for name in ("api", "api-replica", "airflow-scheduler"):
        env = services[name]["environment"]
        assert env["INDEX_BACKEND"] == "milvus" and env["MILVUS_URI"] == "http://milvus:19530"
        assert "milvus" in services[name]["depends_on"]
        if name != "airflow-scheduler":  # settings fields only (the scheduler also has Airflow's)
            assert {k.lower() for k in env} - {"api_key"} <= fields
    replicas = services["api-replica"]
    assert int(replicas["deploy"]["replicas"]) >= 2
    # stateless: no index volume, no host port of its own
    assert not any("index" in str(v) for v in replicas.get("volumes", []))
    assert "ports" not in replicas
    assert {"etcd-data", "milvus-data"} <= set(cfg["volumes"])
