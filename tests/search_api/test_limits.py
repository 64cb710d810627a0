"""Every request limit is one field or constant of core.settings.RequestLimits, and the README's
"Request limits" table lists exactly these, each with its variable, its default and the modules
that enforce it (which must read it)."""
from __future__ import annotations

import re
from pathlib import Path

from core.settings import RequestLimits, Settings

ROOT = Path(__file__).resolve().parents[2]


def _fixed() -> dict:
    return {name: getattr(RequestLimits, name) for name in RequestLimits.__class_vars__}


def _table() -> dict[str, list[str]]:
    text = (ROOT / "README.md").read_text()
    assert "\n### Request limits\n" in text, "README.md has no '### Request limits' section"
    section = text.split("\n### Request limits\n", 1)[1]
    section = re.split(r"\n#{1,3} ", section, maxsplit=1)[0]
    rows = {}
    for line in section.splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = re.fullmatch(r"`(\w+)`", cells[0])
        if name:  # (the header row has none)
            rows[name.group(1)] = cells
    return rows


def test_readme_lists_every_limit_with_its_variable_default_and_enforcer():
    rows = _table()
    fields = {name: f.default for name, f in RequestLimits.model_fields.items()}
    fixed = _fixed()
    assert set(rows) == set(fields) | set(fixed), {
        "missing from README": sorted(set(fields) | set(fixed) - set(rows)),
        "not a limit": sorted(set(rows) - set(fields) - set(fixed))}
    for name, (_, variable, default, _, enforced) in rows.items():
        value = fields[name] if name in fields else fixed[name]
        assert variable == (f"`{name.upper()}`" if name in fields else "fixed"), name
        assert re.match(r"`([^`]+)`", default).group(1) == str(value), name
        modules = re.findall(r"`(search_api/[\w/]+\.py)`", enforced)
        assert modules, f"{name}: no module named where it is enforced"
        for module in modules:
            assert name in (ROOT / module).read_text(), f"{module} does not read {name}"


def test_settings_carry_the_limits_under_their_variables(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.setenv("MAX_TOP_K", "7")
    monkeypatch.setenv("CLIENT_TIMEOUT_S", "2.5")
    limits = Settings().limits
    assert isinstance(limits, RequestLimits)
    assert (limits.max_top_k, limits.client_timeout_s) == (7, 2.5)
    assert set(RequestLimits.model_fields) <= set(Settings.model_fields)


def test_the_limits_reach_what_enforces_them():
    from search_api.__main__ import server_options
    from search_api.schemas import bodies

    limits = Settings(max_top_k=7, max_batch_queries=3, max_connections=9, max_head_bytes=2048,
                      _env_file=None).limits
    schema = bodies(limits).batch.model_json_schema()
    assert schema["properties"]["queries"]["maxItems"] == 3
    assert schema["properties"]["top_k"]["maximum"] == 7
    options = server_options(limits)
    assert options["limit_concurrency"] == 9 and options["h11_max_incomplete_event_size"] == 2048
