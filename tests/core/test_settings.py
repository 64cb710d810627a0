"""One Settings object: every field comes from the variable of the same name, and the README
lists exactly these variables."""
import re
from pathlib import Path

import pytest

from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_each_field_reads_its_upper_case_variable(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.setenv("MODEL_PATH", "/m/model.pt")
    monkeypatch.setenv("MAX_TOP_K", "7")
    monkeypatch.setenv("MINIO_SECURE", "true")
    monkeypatch.setenv("INDEX_KEEP_VERSIONS", "2")
    s = Settings()
    assert (s.model_path, s.max_top_k, s.minio_secure, s.index_keep_versions) == \
        ("/m/model.pt", 7, True, 2)


def test_dotenv_is_read_and_environment_wins(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("MINIO_BUCKET=from-dotenv\nMAX_QUERY_CHARS=12\n")
    monkeypatch.setenv("MAX_QUERY_CHARS", "34")
    s = Settings()
    assert s.minio_bucket == "from-dotenv" and s.max_query_chars == 34


@pytest.mark.parametrize("name,value", [("MAX_TOP_K", "0"), ("TEXT_BATCH_MAX", "-1"),
                                        ("EMBED_BATCH_SIZE", "many")])
def test_invalid_values_are_refused(monkeypatch, tmp_path, name, value):
    from pydantic import ValidationError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.lower()):
        Settings()


def test_readme_lists_exactly_the_settings():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    listed = set()
    for row in section.splitlines():
        if row.startswith("|") and not row.startswith("|---"):
            first_cell = row.split("|")[1]
            listed |= set(re.findall(r"`([A-Z][A-Z0-9_]+)`", first_cell))
    fields = {name.upper() for name in Settings.model_fields}
    assert listed == fields, {"missing from README": sorted(fields - listed),
                              "not a setting": sorted(listed - fields)}
