"""`python -m search_api [--host H] [--port P]`: serve the API and the web page.

Exits with status 2 and a one-line error, before binding the port, when the model checkpoint is
missing or unreadable, its serving bundle is missing or stale where torch is not installed (the
error names `python -m encoder bundle`), or the settings are invalid. With the bundle present the
process never imports torch (encoder/serving.py). A missing index or an unreachable object
store do not stop it: /health says `degraded` until they are there.
"""
import argparse
import sys

from core.logs import setup_logging
from encoder.spec import CheckpointFile, parse_model_spec


def preflight(model_path: str) -> str | None:
    """Cheap checks before importing torch (seconds): why the model cannot load, or None. An
    open_clip spec is only parsed here: its loader checks the weights."""
    try:
        spec = parse_model_spec(model_path)
        if isinstance(spec, CheckpointFile):
            spec.detect_format()  # a checkpoint file's first bytes
    except (FileNotFoundError, ValueError) as exc:
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m search_api")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    args = p.parse_args(argv)
    setup_logging()

    from pydantic import ValidationError

    try:
        from core.settings import get_settings

        settings = get_settings()
    except ValidationError as exc:
        print(f"error: cannot start: invalid settings: {exc}", file=sys.stderr)
        return 2

    problem = preflight(settings.model_path)
    if problem:
        print(f"error: cannot start: {problem} (MODEL_PATH={settings.model_path})", file=sys.stderr)
        return 2

    import uvicorn

    from encoder.errors import BackboneUnavailable
    from search_api.main import build_service, create_app

    try:
        service = build_service(settings)  # fail before binding the port
    except (FileNotFoundError, ValueError, BackboneUnavailable, OSError) as exc:
        print(f"error: cannot start: {exc} (MODEL_PATH={settings.model_path})", file=sys.stderr)
        return 2
    uvicorn.run(create_app(settings, service), host=args.host, port=args.port,
                log_level=args.log_level, **server_options(settings.limits))
    return 0


def server_options(limits) -> dict:
    """uvicorn options that keep one hostile client from stalling or bloating the service
    (core.settings.RequestLimits): request-head limits and a head timeout (our httptools
    protocol; h11's bounded buffer when httptools is missing), a cap on connections, a short
    keep-alive."""
    from search_api.middleware import limited_http_protocol

    protocol = limited_http_protocol(limits.max_head_bytes, limits.max_url_bytes,
                                     limits.max_headers, limits.client_timeout_s)
    return {"http": protocol or "h11",
            "h11_max_incomplete_event_size": limits.max_head_bytes,
            "limit_concurrency": limits.max_connections,
            "timeout_keep_alive": 5}


if __name__ == "__main__":
    sys.exit(main())
