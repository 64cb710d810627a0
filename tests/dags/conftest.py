import pytest

from tests.dags.helpers import migrated_home


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory) -> dict:
    """A fresh Airflow home per test module (SQLite metadata DB, migrated)."""
    return migrated_home(tmp_path_factory.mktemp("airflow_home"))
