"""`python -m search_api [--host H] [--port P]`: serve the API; exits non-zero if the model is missing."""
import argparse
import logging
import sys


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m search_api")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from search_api.config import get_api_settings
    from search_api.main import build_state, create_app

    settings = get_api_settings()
    try:
        state = build_state(settings)  # fail before binding the port
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: cannot start: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(create_app(settings, state), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
