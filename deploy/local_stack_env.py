"""The environment of the no-Docker stack (deploy/local_stack.sh), resolved by core.settings.

`python -m deploy.local_stack_env` prints `export NAME=value` lines for the script to `eval`, so
the script repeats no default of the settings. Precedence is that of every process here: the
environment, then `.env`, then core/settings.py's defaults (`.env` lines that are not settings,
e.g. AIRFLOW_ADMIN_PASSWORD, pass through the same way). The stack then pins what makes it one
machine's stack: the S3 backend on loopback, the index and downloads under STACK_DIR.
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import dotenv_values
from pydantic import ValidationError

from core.settings import REPO_ROOT, Settings

# knobs of the stack itself, not settings of its services: where its state lives, its ports
# (the S3 port defaults to MINIO_ENDPOINT's)
STACK_DIR = "data/stack"
API_PORT = 8000
AIRFLOW_PORT = 8080


def _local_path(value: str, root: Path) -> str:
    """`value` made absolute when it names an existing path relative to `root` (the stack's
    processes run elsewhere); anything else (a URL, a model spec, an absolute path) unchanged."""
    if not Path(value).is_absolute() and (root / value).exists():
        return str((root / value).resolve())
    return value


def stack_env(root: Path = REPO_ROOT) -> dict[str, str]:
    """NAME -> value for the stack's processes, from the environment, `root/.env` and the
    settings' defaults."""
    environ = os.environ
    dotenv = {k: v for k, v in dotenv_values(root / ".env").items() if v is not None}
    merged = {**dotenv, **{k: v for k, v in environ.items() if v != ""}}

    def knob(name: str, default) -> str:
        return merged.get(name) or str(default)

    settings = Settings(_env_file=root / ".env")
    stack_dir = (root / knob("STACK_DIR", STACK_DIR)).resolve()
    s3_port = knob("S3_PORT", urlsplit(f"//{settings.minio_endpoint}").port or 9000)
    out = {k: v for k, v in dotenv.items() if k not in environ}
    out.update({
        "STACK_DIR": str(stack_dir),
        "S3_PORT": s3_port,
        "API_PORT": knob("API_PORT", API_PORT),
        "AIRFLOW_PORT": knob("AIRFLOW_PORT", AIRFLOW_PORT),
        "STORE_BACKEND": "s3",
        "MINIO_ENDPOINT": f"127.0.0.1:{s3_port}",
        "MINIO_SECURE": "false",
        "MINIO_ACCESS_KEY": settings.minio_access_key,
        "MINIO_SECRET_KEY": settings.minio_secret_key,
        "MINIO_BUCKET": settings.minio_bucket,
        "MODEL_PATH": _local_path(settings.model_path, root),
        "FLICKR8K_SOURCE": _local_path(settings.flickr8k_source, root),
        "INDEX_DIR": str(stack_dir / "index"),
        "FLICKR8K_WORK_DIR": str(stack_dir / "downloads"),
    })
    return out


def main() -> int:
    try:
        env = stack_env()
    except ValidationError as exc:
        print(f"error: invalid settings (environment or .env): {exc}", file=sys.stderr)
        return 2
    for name, value in env.items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
