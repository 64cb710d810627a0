"""The page's "Duplicates" view (the groups of GET /duplicates side by side, each photo with its
size and date, paged) and its "Hide duplicates" toggle (results with dedupe=true, "+N similar"
on a collapsed one), in a real headless browser against a real service over the photo library
of test_web_filters, at a desktop width and on a 390 x 844 touch screen."""
from __future__ import annotations

from pathlib import Path

import pytest

from indexer.duplicates import DuplicateGroup, DuplicateReport, report_path, write_report
from indexer.repository import IndexRepository
from tests.search_api.test_web import _assert_in_viewport, _assert_no_sideways_scroll, _layout
from tests.search_api.test_web_filters import (  # noqa: F401  (fixtures)
    BEACH,
    HOSTILE,
    LIBRARY,
    PHONE,
    SNOW,
    _open,
    _results,
    _search,
    _serve_library,
    browser,
    page,
    phone,
)

GROUPS = [BEACH[:4], sorted(SNOW + [HOSTILE])]
GROUPS_SHOWN = "() => document.querySelectorAll('#dup-groups .dup-group').length"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, encoder):
    tmp = tmp_path_factory.mktemp("library-dups")
    with _serve_library(tmp, encoder) as url:
        served = IndexRepository(tmp / "index").load()
        write_report(DuplicateReport(served.version, served.model_id, "faiss", 0.85,
                                     served.count, [DuplicateGroup(sorted(g), 0.97)
                                                    for g in GROUPS]),
                     report_path(tmp / "index"))
        yield url


GROUP_PHOTOS = """() => [...document.querySelectorAll('#dup-groups .dup-group')].map(g =>
  [...g.querySelectorAll('.dup-photo')].map(p => ({key: p.dataset.key,
    name: p.querySelector('.name').textContent, size: p.querySelector('.size').textContent,
    date: p.querySelector('.date time')?.dateTime ?? null,
    top: Math.round(p.getBoundingClientRect().top)})))"""


def test_duplicates_view_lists_groups_side_by_side_paged(page, base_url):
    _open(page, base_url)
    page.click("#dup-btn")
    page.wait_for_function(f"{GROUPS_SHOWN} === 2")
    assert page.is_hidden("#search-view") and "view=duplicates" in page.url
    groups = page.evaluate(GROUP_PHOTOS)
    assert [[p["key"] for p in g] for g in groups] == GROUPS
    for group in groups:
        assert len({p["top"] for p in group}) == 1  # side by side
        for p in group:
            assert p["size"] == "64 \u00d7 48"
    assert [p["date"][:10] for p in groups[0]] == ["2023-07-11", "2023-07-12", "2023-07-13",
                                                   "2023-07-14"]
    summary = page.text_content("#dup-summary")
    assert "8 photos in 2 groups" in summary and "Nothing is deleted" in summary
    assert page.evaluate("() => window.pwned === undefined")  # an HTML key is text
    assert any(p["name"] == HOSTILE.rsplit("/", 1)[1] for p in groups[1])
    page.screenshot(path=str(Path("test-artifacts") / "web-duplicates.png"), full_page=True)

    # paged: one group a page here, "More groups" adds the next
    page.goto(f"{base_url}/?per_page=1&view=duplicates")
    page.wait_for_function(f"{GROUPS_SHOWN} === 1")
    assert page.is_visible("#dup-more")
    page.click("#dup-more")
    page.wait_for_function(f"{GROUPS_SHOWN} === 2")
    page.wait_for_function("() => document.getElementById('dup-more').hidden")

    # a search leaves the view
    page.fill("#q", "a red circle")
    page.press("#q", "Enter")
    page.wait_for_function("() => document.getElementById('dup-view').hidden")
    assert "view=" not in page.url
    assert not page.errors, page.errors


def test_hide_duplicates_collapses_results_with_a_count(page, base_url):
    _open(page, base_url)
    _search(page, "a red circle")
    assert len(_results(page)) == len(LIBRARY)
    requests = []
    page.on("request", lambda r: "/search_images_by_text" in r.url and requests.append(r))
    page.check("#dedupe")
    page.wait_for_function(f"() => document.querySelectorAll('#results .hit').length"
                           f" === {len(LIBRARY) - 3 - 3}")
    hits = _results(page)
    assert '"dedupe":true' in requests[-1].post_data
    keys = [h["key"] for h in hits]
    # one of each group stays, with "+N similar"
    assert len(set(keys) & set(GROUPS[0])) == 1 and len(set(keys) & set(GROUPS[1])) == 1
    badges = page.eval_on_selector_all(
        "#results .hit", "els => els.map(e => e.querySelector('.similar')?.textContent ?? null)")
    assert sorted(b for b in badges if b) == ["+3 similar", "+3 similar"]
    assert "near duplicates hidden" in page.text_content("#summary")
    assert "dedupe=true" in page.url
    page.uncheck("#dedupe")
    page.wait_for_function(f"() => document.querySelectorAll('#results .hit').length"
                           f" === {len(LIBRARY)}")
    assert page.locator("#results .similar").count() == 0
    assert not page.errors, page.errors


def test_phone_duplicates_view_and_toggle(phone, base_url):
    page = phone
    _open(page, base_url)
    _assert_in_viewport(_layout(page, ["#dup-btn"]), ["#dup-btn"], min_height=44)
    page.tap("#dup-btn")
    page.wait_for_function(f"{GROUPS_SHOWN} === 2")
    _assert_no_sideways_scroll(page, PHONE["width"])
    lefts = page.eval_on_selector_all("#dup-groups .dup-group:first-child .dup-photo",
                                      "els => els.map(e => e.getBoundingClientRect().left)")
    assert len(set(lefts)) == 2  # two photos a row
    page.screenshot(path=str(Path("test-artifacts") / "web-phone-duplicates.png"),
                    full_page=True)
    page.tap("#dup-btn")  # back to searching
    assert page.is_visible("#search-view")
    page.tap("#q")
    page.keyboard.type("a red circle")
    page.tap("#search-btn")
    page.wait_for_function("() => document.getElementById('summary').textContent !== ''")
    _assert_in_viewport(_layout(page, [".toggle"]), [".toggle"], min_height=44)
    page.tap(".toggle")
    page.wait_for_function("() => document.querySelectorAll('#results .similar').length === 2")
    _assert_no_sideways_scroll(page, PHONE["width"])
    assert not page.errors, page.errors
