"""The viewer's "Why this photo?": the heat map of GET /explain over the photo for the current
query, shown while a mouse is on the button and pinned by a click or a tap; for a query of
several terms (a photo added with "more like this") too. In a real headless browser against a
real service over the photo library of test_web_filters, at a desktop width and on a 390 x 844
touch screen."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from tests.search_api.test_web import _assert_in_viewport, _assert_no_sideways_scroll, _layout
from tests.search_api.test_web_filters import (  # noqa: F401  (fixtures)
    BEACH,
    HOSTILE,
    LIBRARY,
    PHONE,
    _open,
    _results,
    _search,
    base_url,
    browser,
    page,
    phone,
)

HEAT_LOADED = """() => { const h = document.getElementById('viewer-heat');
  return !h.hidden && h.complete && h.naturalWidth > 0; }"""


def _open_viewer(page, key: str) -> None:
    position = [h["key"] for h in _results(page)].index(key)
    page.click(f"#results .hit:nth-child({position + 1}) .thumb")
    page.wait_for_function("() => { const i = document.getElementById('viewer-img');"
                           " return i.complete && i.naturalWidth > 0; }")


def _explained(page) -> dict:
    src = page.get_attribute("#viewer-heat", "src")
    assert src.startswith("/explain?")
    return {k: v[0] for k, v in parse_qs(urlsplit(src).query).items()}


def _covers_the_photo(page) -> None:
    boxes = _layout(page, ["#viewer-img", "#viewer-heat"])["boxes"]
    img, heat = boxes["#viewer-img"], boxes["#viewer-heat"]
    for side in ("left", "top", "right", "bottom"):
        assert abs(img[side] - heat[side]) <= 1, (img, heat)


def test_hover_shows_where_the_query_matches(page, base_url):
    _open(page, base_url)
    answers = []
    page.on("response", lambda r: "/explain?" in r.url and answers.append(r))
    _search(page, "a red circle")
    _open_viewer(page, BEACH[0])
    assert page.is_visible("#viewer-why") and page.is_hidden("#viewer-heat")
    assert page.get_attribute("#viewer-why", "aria-pressed") == "false"

    page.hover("#viewer-why")  # a mouse on the button: the map over the photo
    page.wait_for_function(HEAT_LOADED)
    assert _explained(page) == {"key": BEACH[0], "q": "a red circle", "size": "768"}
    assert answers[-1].status == 200 and answers[-1].headers["content-type"] == "image/png"
    _covers_the_photo(page)
    assert "Warmer" in page.text_content("#why-note")
    page.screenshot(path=str(Path("test-artifacts") / "web-explain.png"))
    page.mouse.move(5, 5)  # and gone when it leaves
    page.wait_for_function("() => document.getElementById('viewer-heat').hidden")

    # a click pins it, a second click takes it away
    page.click("#viewer-why")
    page.wait_for_function(HEAT_LOADED)
    assert page.get_attribute("#viewer-why", "aria-pressed") == "true"
    page.mouse.move(5, 5)
    assert page.is_visible("#viewer-heat")
    page.click("#viewer-why")
    assert page.is_hidden("#viewer-heat")

    # a key that is HTML is only a parameter
    page.keyboard.press("Escape")
    _open_viewer(page, HOSTILE)
    page.click("#viewer-why")
    page.wait_for_function(HEAT_LOADED)
    assert _explained(page)["key"] == HOSTILE
    assert page.evaluate("() => window.pwned === undefined")
    page.keyboard.press("Escape")
    assert page.is_hidden("#viewer-heat")
    assert not page.errors, page.errors


def test_a_query_of_several_terms_is_explained_as_searched(page, base_url):
    _open(page, base_url)
    _search(page, "a red circle")
    page.click('#results .hit[data-key="%s"] .more' % BEACH[1])
    page.wait_for_selector("#terms .chip[data-kind='photo']")
    page.wait_for_function("() => document.getElementById('summary').textContent"
                           f".startsWith('Showing {len(LIBRARY) - 1} of ')")
    _open_viewer(page, BEACH[2])
    page.click("#viewer-why")
    page.wait_for_function(HEAT_LOADED)
    assert _explained(page)["q"] == f'a red circle + key:"{BEACH[1]}"'
    page.keyboard.press("Escape")
    assert not page.errors, page.errors


def test_phone_tap_shows_and_hides_the_map(phone, base_url):
    page = phone
    _open(page, base_url)
    page.tap("#q")
    page.keyboard.type("a red circle")
    page.tap("#search-btn")
    page.wait_for_function(f"() => document.querySelectorAll('#results .hit').length"
                           f" === {len(LIBRARY)}")
    page.tap("#results .hit:nth-child(1) .thumb")
    page.wait_for_function("() => { const i = document.getElementById('viewer-img');"
                           " return i.complete && i.naturalWidth > 0; }")
    page.locator("#viewer-why").scroll_into_view_if_needed()
    _assert_in_viewport(_layout(page, ["#viewer-why"]), ["#viewer-why"], min_height=44)
    page.tap("#viewer-why")
    page.wait_for_function(HEAT_LOADED)
    _covers_the_photo(page)
    _assert_no_sideways_scroll(page, PHONE["width"])
    page.screenshot(path=str(Path("test-artifacts") / "web-phone-explain.png"))
    page.tap("#viewer-why")
    assert page.is_hidden("#viewer-heat")
    page.tap("#viewer-close")
    assert not page.errors, page.errors


def test_an_image_search_has_nothing_to_explain(page, base_url):
    _open(page, base_url)
    _search(page, "a red circle")
    _open_viewer(page, BEACH[0])
    assert page.is_visible("#viewer-why")
    page.keyboard.press("Escape")
    page.evaluate("() => { current = {kind: 'image', file: null}; }")
    page.click("#results .hit:nth-child(1) .thumb")
    assert page.is_hidden("#viewer-why")
    page.keyboard.press("Escape")
