"""One logging setup for every command line of the project."""
import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format=FORMAT)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # CPU-feature probing noise
