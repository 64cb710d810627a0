"""The page's "more like this" / "less like this" buttons and the query's terms as chips, in a
real headless browser against a real service over the photo library of test_web_filters (its
service, pages and helpers), at a desktop width and on a 390 x 844 touch screen."""
from __future__ import annotations

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
    base_url,
    browser,
    page,
    phone,
)

TERMS = """() => [...document.querySelectorAll('#terms .chip')].map(c => ({
  sign: c.dataset.sign, kind: c.dataset.kind, key: c.dataset.key ?? null,
  label: c.querySelector('.label').textContent,
  remove: c.querySelector('.remove').getAttribute('aria-label')}))"""


def _hit(key: str) -> str:
    """The selector of a hit's card (keys are attribute-quoted: they may hold anything)."""
    return '#results .hit[data-key="%s"]' % key.replace("\\", "\\\\").replace('"', '\\"')


def _shown(page, count: int) -> list[dict]:
    page.wait_for_function(f"() => document.getElementById('summary').textContent"
                           f".startsWith('Showing {count} of ')")
    return _results(page)


def _record(page) -> list[dict]:
    requests: list[dict] = []
    page.on("request", lambda r: r.url.endswith("/search_images_by_text")
            and requests.append(r.post_data_json))
    return requests


def test_more_and_less_like_this_add_terms_that_can_be_removed(page, base_url):
    _open(page, base_url)
    requests = _record(page)
    _search(page, "a red circle")
    assert len(_results(page)) == len(LIBRARY)
    assert page.is_hidden("#terms-row")  # one typed text: nothing more to show
    label = page.get_attribute(f"{_hit(BEACH[0])} .more", "aria-label")
    assert label == "Search again, more like " + BEACH[0].rsplit("/", 1)[-1]

    # more like this: the photo is a positive term, left out of its own results
    page.click(f"{_hit(BEACH[0])} .more")
    hits = _shown(page, len(LIBRARY) - 1)
    assert BEACH[0] not in [h["key"] for h in hits]
    sent = requests[-1]["terms"]
    assert [t.get("text") for t in sent["positive"]] == ["a red circle", None]
    assert sent["positive"][1]["key"] == BEACH[0] and sent["negative"] == []
    terms = page.evaluate(TERMS)
    assert [(t["sign"], t["kind"]) for t in terms] == [("positive", "text"),
                                                       ("positive", "photo")]
    assert terms[1]["key"] == BEACH[0] and terms[1]["label"] == "b1.jpg"
    assert terms[1]["remove"] == "Remove \u201cb1.jpg\u201d from the search"

    # less like this: a negative term
    page.click(f"{_hit(SNOW[0])} .less")
    page.wait_for_selector("#terms .chip[data-sign='negative']")
    _shown(page, len(LIBRARY) - 1)
    assert [t["key"] for t in requests[-1]["terms"]["negative"]] == [SNOW[0]]
    assert [t["sign"] for t in page.evaluate(TERMS)] == ["positive", "positive", "negative"]

    # removing the photo searches again without it: the photo is back among the results
    page.click(f"#terms .chip[data-key='{BEACH[0]}'] .remove")
    hits = _shown(page, len(LIBRARY))
    assert BEACH[0] in [h["key"] for h in hits]
    assert [t.get("key") for t in requests[-1]["terms"]["positive"]] == [None]
    assert page.evaluate("() => document.activeElement.classList.contains('remove')")

    # without its last positive term there is nothing to search: the results are cleared
    searches = len(requests)
    page.click("#terms .chip[data-kind='text'] .remove")
    page.wait_for_function("() => document.querySelectorAll('#results .hit').length === 0")
    assert page.is_hidden("#terms-row") and page.text_content("#summary") == ""
    assert len(requests) == searches and "q=" not in page.url
    assert not page.errors, page.errors


def test_filters_apply_and_the_viewer_and_odd_names_work(page, base_url):
    _open(page, base_url)
    requests = _record(page)
    _search(page, "a red circle")
    page.select_option("#f-folder", "photos/2023/beach")
    _shown(page, len(BEACH))

    page.click(f"{_hit(BEACH[1])} .thumb")  # from the viewer
    page.click("#viewer-more")
    assert page.is_hidden("#viewer")
    hits = _shown(page, len(BEACH) - 1)
    assert sorted(h["key"] for h in hits) == [k for k in BEACH if k != BEACH[1]]
    assert requests[-1]["filters"]["folders"] == ["photos/2023/beach"]
    assert requests[-1]["terms"]["positive"][-1]["key"] == BEACH[1]

    # a photo whose name is HTML is a chip of text, nothing more
    page.select_option("#f-folder", "")
    _shown(page, len(LIBRARY) - 1)
    page.click(f"{_hit(HOSTILE)} .less")
    page.wait_for_selector("#terms .chip[data-sign='negative']")
    chip = page.evaluate(TERMS)[-1]
    assert chip["key"] == HOSTILE and chip["label"] == HOSTILE.rsplit("/", 1)[-1]
    assert page.evaluate("() => window.pwned === undefined")
    assert not page.errors, page.errors


def test_phone_buttons_and_chips_fit_and_can_be_tapped(phone, base_url):
    page = phone
    _open(page, base_url)
    page.fill("#q", "a red circle")
    page.tap("#search-btn")
    _shown(page, len(LIBRARY))
    _assert_no_sideways_scroll(page, PHONE["width"])
    for button in (".more", ".less"):
        sel = f"#results .hit:nth-child(1) {button}"
        page.locator(sel).scroll_into_view_if_needed()
        _assert_in_viewport(_layout(page, [sel]), [sel], min_height=44)
    first = _results(page)[0]["key"]
    page.tap("#results .hit:nth-child(1) .more")
    hits = _shown(page, len(LIBRARY) - 1)
    assert first not in [h["key"] for h in hits]
    _assert_no_sideways_scroll(page, PHONE["width"])
    sel = "#terms .chip[data-kind='photo'] .remove"
    page.locator(sel).scroll_into_view_if_needed()
    _assert_in_viewport(_layout(page, [sel]), [sel], min_height=44)
    page.tap(sel)
    _shown(page, len(LIBRARY))
    assert page.is_hidden("#terms-row")  # only the typed text is left
    assert not page.errors, page.errors
