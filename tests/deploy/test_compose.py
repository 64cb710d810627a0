"""docker-compose.yml, .env.example, the Dockerfiles and the local stack script, checked without a
Docker engine: the structure the stack relies on, plus `docker-compose config` (Debian's
docker-compose) validating the file against the compose schema and interpolating .env.

CI installs docker-compose (`apt-get install -y --no-install-recommends docker-compose`); there a
missing binary fails the test instead of skipping it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"

SERVICES = {"api", "minio", "minio-setup", "postgres", "airflow-init", "airflow-webserver",
            "airflow-scheduler", "airflow-dag-processor", "model-bundle"}
ONE_SHOT = {"minio-setup", "airflow-init", "model-bundle"}
AIRFLOW = {"airflow-init", "airflow-webserver", "airflow-scheduler", "airflow-dag-processor"}
SEED_ENV = {"MODEL_PATH", "EMBEDDING_DIM", "MINIO_ENDPOINT", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY",
            "MINIO_BUCKET", "INDEX_DIR", "STORE_BACKEND"}
SECRETS = {"MINIO_ACCESS_KEY", "MINIO_SECRET_KEY", "POSTGRES_PASSWORD", "AIRFLOW_JWT_SECRET",
           "AIRFLOW_SECRET_KEY", "AIRFLOW_ADMIN_PASSWORD", "AIRFLOW_FERNET_KEY"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return env


def _mounts(service: dict) -> dict[str, str]:
    """container path -> source (named volume or ./path) [+ ':ro']"""
    out = {}
    for v in service.get("volumes", []):
        parts = v.split(":")
        out[parts[1]] = parts[0] + (":ro" if parts[2:] == ["ro"] else "")
    return out


def test_services_health_checks_and_restart(compose):
    services = compose["services"]
    assert set(services) == SERVICES
    for name, svc in services.items():
        if name in ONE_SHOT:
            assert svc.get("restart") == "no", name
        else:
            assert "healthcheck" in svc and svc["healthcheck"]["test"], f"{name} has no health check"
            assert svc.get("restart") == "unless-stopped", name
    # start order: init / bucket setup complete, databases healthy
    dep = lambda s: {k: v["condition"] for k, v in services[s]["depends_on"].items()}  # noqa: E731
    assert dep("minio-setup") == {"minio": "service_healthy"}
    assert dep("airflow-init") == {"postgres": "service_healthy"}
    for s in ("airflow-webserver", "airflow-scheduler", "airflow-dag-processor"):
        assert dep(s)["airflow-init"] == "service_completed_successfully"
        assert dep(s)["postgres"] == "service_healthy"
    assert dep("airflow-scheduler")["minio-setup"] == "service_completed_successfully"
    assert dep("api") == {"minio-setup": "service_completed_successfully",
                          "model-bundle": "service_completed_successfully"}
    assert dep("airflow-scheduler")["model-bundle"] == "service_completed_successfully"


def test_airflow3_components(compose):
    s = compose["services"]
    assert s["airflow-webserver"]["command"][0] == "api-server"  # Airflow 3: no `webserver`
    assert s["airflow-scheduler"]["command"] == ["scheduler"]
    assert s["airflow-dag-processor"]["command"] == ["dag-processor"]
    assert s["airflow-init"]["entrypoint"] == ["/usr/local/bin/airflow-init.sh"]
    images = {s[n]["image"] for n in AIRFLOW}
    assert len(images) == 1  # one image, one environment
    envs = [_env(s[n]) for n in AIRFLOW]
    for key in ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL", "AIRFLOW__CORE__EXECUTOR"):
        assert len({e[key] for e in envs}) == 1, f"{key} differs between Airflow components"
    e = envs[0]
    assert e["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert e["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-webserver:8080/execution/"
    assert e["AIRFLOW__CORE__DAGS_FOLDER"] == "/app/dags"
    assert e["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
    assert "@postgres:5432/" in e["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert "AIRFLOW_ADMIN_PASSWORD" in _env(s["airflow-init"])
    assert "AIRFLOW_ADMIN_PASSWORD" not in _env(s["airflow-scheduler"])


def test_api_and_airflow_share_the_index_and_the_seed_env(compose):
    s = compose["services"]
    api, sched = s["api"], s["airflow-scheduler"]
    assert api["command"] == ["python", "-m", "search_api", "--host", "0.0.0.0", "--port", "8000"]
    for svc in (api, sched):
        env = _env(svc)
        assert SEED_ENV <= set(env), SEED_ENV - set(env)
        assert env["STORE_BACKEND"] == "s3" and env["MINIO_ENDPOINT"] == "minio:9000"
        assert env["MODEL_PATH"] == "/app/models/flickr8k-dual-encoder.pt"
        assert _mounts(svc)["/app/models"] == "./models:ro"  # the repo's checkpoint
    api_idx, sched_idx = _env(api)["INDEX_DIR"], _env(sched)["INDEX_DIR"]
    assert api_idx == sched_idx
    assert _mounts(api)[api_idx] == "index-data:ro"  # the API only reads
    assert _mounts(sched)[sched_idx] == "index-data"  # the tasks (LocalExecutor) write
    assert _mounts(sched)[_env(sched)["FLICKR8K_WORK_DIR"]] == "downloads"
    # the serving bundle: written by model-bundle (torch), read by the API (no torch) and the
    # embedding tasks, in one ONNX cache
    bundle = s["model-bundle"]
    assert bundle["image"] == sched["image"]  # the image with torch
    assert bundle["entrypoint"] == ["python", "-m", "encoder", "bundle", "--if-needed"]
    cache = _env(bundle)["ONNX_CACHE_DIR"]
    assert _env(api)["ONNX_CACHE_DIR"] == _env(sched)["ONNX_CACHE_DIR"] == cache
    assert _env(bundle)["MODEL_PATH"] == _env(api)["MODEL_PATH"]
    assert _mounts(bundle)[cache] == "onnx-cache" and _mounts(api)[cache] == "onnx-cache:ro"
    assert _mounts(sched)[cache] == "onnx-cache"


def test_the_scheduler_passes_settings_fields_only(compose):
    """The tasks read their configuration from core.settings alone: no environment reads of
    their own, and every variable of ours given to the scheduler is a Settings field."""
    from core.settings import Settings

    for f in [*sorted((ROOT / "dags").glob("*.py")), ROOT / "indexer" / "jobs.py"]:
        assert not re.search(r"os\.environ|getenv", f.read_text()), f"{f.name} reads the environment"
    env = _env(compose["services"]["airflow-scheduler"])
    ours = {k for k in env if not k.startswith("AIRFLOW")}
    assert ours <= {name.upper() for name in Settings.model_fields}, ours
    assert {"FLICKR8K_SOURCE", "FLICKR8K_WORK_DIR", "REINDEX_SCHEDULE", "FLICKR8K_TASK_RETRIES",
            "INDEX_KEEP_VERSIONS"} <= ours


def test_named_volumes_and_local_ports(compose):
    declared = set(compose["volumes"])
    used = set()
    for name, svc in compose["services"].items():
        for src in _mounts(svc).values():
            src = src.removesuffix(":ro")
            if src.startswith(("./", "/")):
                # ./models holds the checkpoint (MODEL_PATH); the other bind mounts are files here
                assert src == "./models" or (ROOT / src).is_file(), f"{name} mounts missing {src}"
            else:
                used.add(src)
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert used == declared
    assert {"postgres-data", "minio-data", "index-data"} <= declared
    assert _mounts(compose["services"]["postgres"])["/var/lib/postgresql/data"] == "postgres-data"
    assert _mounts(compose["services"]["minio"])["/data"] == "minio-data"


def test_credentials_come_from_env_with_local_defaults():
    raw = COMPOSE.read_text()
    used = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)(?::?-[^}]*)?\}", raw))
    example = ENV_EXAMPLE.read_text()
    documented = set(re.findall(r"^#?\s*([A-Z0-9_]+)=", example, re.M))
    assert used <= documented, f"not in .env.example: {sorted(used - documented)}"
    assert SECRETS <= used
    for name in SECRETS - {"AIRFLOW_ADMIN_PASSWORD"}:
        for m in re.finditer(rf"\$\{{{name}(:?-)?", raw):
            assert m.group(1) == ":-", f"${{{name}}} needs a local default"
    # no credential written as a literal value anywhere in the file
    for key in ("MINIO_ROOT_PASSWORD", "MINIO_SECRET_KEY", "POSTGRES_PASSWORD",
                "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY"):
        for m in re.finditer(rf"^\s*{key}:\s*(.+)$", raw, re.M):
            assert m.group(1).startswith("${"), f"{key} is a literal: {m.group(1)}"


def test_dockerfiles_and_scripts():
    for name in ("Dockerfile.api", "Dockerfile.airflow"):
        text = (ROOT / "deploy" / name).read_text()
        assert re.search(r"^FROM python:3\.11", text, re.M)
        for src in re.findall(r"^COPY\s+(?!--)(\S+)\s+\S+$", text, re.M):
            assert (ROOT / src).exists(), f"{name}: COPY source {src} missing"
        assert "USER 50000" in text  # not root
        assert (ROOT / "deploy" / f"{name}.dockerignore").is_file()
    api = (ROOT / "deploy" / "Dockerfile.api").read_text()
    assert 'CMD ["python", "-m", "search_api", "--host", "0.0.0.0", "--port", "8000"]' in api
    assert '".[airflow]"' in (ROOT / "deploy" / "Dockerfile.airflow").read_text()
    for script in ("deploy/local_stack.sh", "deploy/airflow-init.sh"):
        r = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert os.access(ROOT / script, os.X_OK)
    r = subprocess.run(["sh", "-n", "deploy/minio-setup.sh"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["bash", "deploy/local_stack.sh"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "STACK_DIR": "/nonexistent/never-created"})
    assert r.returncode == 2 and "usage" in r.stderr


def _docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is missing: `make setup` installs it "
                    "(apt-get install -y --no-install-recommends docker-compose)")
    return exe


def _config(tmp_path, env_file: Path | None, extra_env: dict | None = None,
            expect_ok: bool = True):
    """`docker-compose config` in a copy of the project dir, with none of our variables set
    (but `extra_env`)."""
    work = tmp_path / "project"
    (work / "deploy").mkdir(parents=True)
    shutil.copy(COMPOSE, work / "docker-compose.yml")
    for f in ("Dockerfile.api", "Dockerfile.airflow", "minio-setup.sh"):
        shutil.copy(ROOT / "deploy" / f, work / "deploy" / f)
    (work / "models").mkdir()
    if env_file is not None:
        shutil.copy(env_file, work / ".env")
    env = {k: v for k, v in os.environ.items()
           if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
    env.update(extra_env or {})
    r = subprocess.run([_docker_compose(), "config"], cwd=work, env=env, capture_output=True,
                       text=True, timeout=60)
    if not expect_ok:
        return r
    assert r.returncode == 0, f"docker-compose config failed:\n{r.stderr}"
    assert "WARNING" not in r.stderr, r.stderr
    return yaml.safe_load(r.stdout)


@pytest.mark.parametrize("with_env_file", [False, True], ids=["defaults", "env-example"])
def test_docker_compose_config_validates(tmp_path, with_env_file):
    # API_KEY has no default (the upload routes are never open): the bare run sets it
    cfg = _config(tmp_path, ENV_EXAMPLE if with_env_file else None,
                  None if with_env_file else {"API_KEY": "from-the-shell"})
    assert set(cfg["services"]) == SERVICES
    api = cfg["services"]["api"]["environment"]
    assert api["API_KEY"] == ("local-only-api-key-change-me" if with_env_file else "from-the-shell")
    assert api["MINIO_ACCESS_KEY"] == "minioadmin" and api["MINIO_BUCKET"] == "flickr8k"
    sched = cfg["services"]["airflow-scheduler"]["environment"]
    assert sched["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == \
        "postgresql+psycopg2://airflow:airflow@postgres:5432/airflow"
    # the containers hold no dataset folder: the stack's source is the public archive
    from flickr8k.sources import PUBLIC_IMAGES_URL

    assert sched["FLICKR8K_SOURCE"] == PUBLIC_IMAGES_URL
    assert cfg["services"]["minio"]["environment"]["MINIO_ROOT_PASSWORD"] == "minioadmin"



def test_docker_compose_refuses_to_start_the_api_without_a_key(tmp_path):
    r = _config(tmp_path, None, expect_ok=False)
    assert r.returncode != 0 and "API_KEY" in r.stderr, (r.returncode, r.stderr)
