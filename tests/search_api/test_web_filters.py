"""The page's filter bar, query-hint chips, each hit's date and place and the details panel, in
a real headless browser against a real service (as tests/search_api/test_web.py), at a desktop
width and on a 390 x 844 touch screen.

The photos are made here: JPEGs with camera EXIF (date with its offset, make and model, GPS) in
folders as people keep them, one without EXIF, and one whose name is HTML (the page must show
it as text). A second service serves a version stored without metadata: there the page shows
none of it and asks for none of it.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import Settings
from indexer import pipeline
from indexer.vector_index import open_index
from objectstore import LocalStore
from search_api.main import build_service, create_app
from tests.photo_samples import BLUE, GREEN, RED, YELLOW, photo_bytes, photo_exif
from tests.search_api.helpers import republish, serve
from tests.search_api.test_web import (  # noqa: F401  (fixtures)
    PHONE,
    _assert_in_viewport,
    _assert_no_sideways_scroll,
    _layout,
    _open_page,
    browser,
)

PREFIX = "photos/"
LISBON, OSLO = (38.7223, -9.1393), (59.9139, 10.7522)
HOSTILE = 'photos/misc/<img src=x onerror="window.pwned=1"> & co.jpg'
# key -> (EXIF or None, colour)
LIBRARY = {
    **{f"photos/2023/beach/b{i}.jpg": (photo_exif(f"2023:07:1{i} 18:30:05", "+01:00", "Canon",
                                                  "EOS R6", LISBON), YELLOW)
       for i in range(1, 5)},
    "photos/2023/beach/b5.jpg": (photo_exif("2023:08:02 10:00:00", "+01:00", "Canon", "EOS R6",
                                            LISBON), BLUE),
    **{f"photos/2024/Snow/s{i}.jpg": (photo_exif(f"2024:01:1{i} 09:00:00", "+01:00", "Apple",
                                                 "iPhone 12", OSLO), GREEN)
       for i in range(1, 4)},
    HOSTILE: (None, RED),
}
BEACH = sorted(k for k in LIBRARY if "/beach/" in k)
SNOW = sorted(k for k in LIBRARY if "/Snow/" in k)


def _serve_library(tmp: Path, encoder, strip_metadata: bool = False):
    store = LocalStore(tmp / "store", "b")
    for key, (exif, color) in LIBRARY.items():
        store.put(key, photo_bytes("JPEG", exif, (64, 48), color), "image/jpeg")
    settings = Settings(_env_file=None, index_dir=str(tmp / "index"), images_prefix=PREFIX,
                        reload_interval_s=0)
    index = open_index(settings)
    pipeline.rebuild(store, encoder, index, PREFIX, progress=False)
    if strip_metadata:  # a version as indexes were made before photos had metadata
        republish(index.repo)
    service = build_service(settings, encoder=encoder, index=open_index(settings), store=store)
    return serve(create_app(settings, service))


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, encoder):
    with _serve_library(tmp_path_factory.mktemp("library"), encoder) as url:
        yield url


@pytest.fixture(scope="module")
def page(browser, tmp_path_factory):  # noqa: F811
    ctx, pg = _open_page(browser, tmp_path_factory.mktemp("chromium-profile"),
                         viewport={"width": 1280, "height": 900})
    yield pg
    ctx.close()


@pytest.fixture(scope="module")
def phone(browser, tmp_path_factory):  # noqa: F811
    ctx, pg = _open_page(browser, tmp_path_factory.mktemp("chromium-phone"), viewport=PHONE,
                         device_scale_factor=3, is_mobile=True, has_touch=True)
    yield pg
    ctx.close()


RESULTS = """() => [...document.querySelectorAll('#results .hit')].map(e => ({
  key: e.dataset.key,
  name: e.querySelector('.name').textContent,
  date: e.querySelector('.meta time')?.dateTime ?? null,
  place: e.querySelector('.meta .place')?.textContent ?? null,
  camera: e.querySelector('.meta')?.title ?? null}))"""
SEARCHED = "() => !document.body.classList.contains('busy')"


def _results(page) -> list[dict]:
    page.wait_for_function(SEARCHED)
    return page.evaluate(RESULTS)


def _options(page, select: str) -> list[str]:
    return page.eval_on_selector_all(f"{select} option", "os => os.map(o => o.textContent)")


def _search(page, text: str):
    page.fill("#q", text)
    page.press("#q", "Enter")
    page.wait_for_function("() => document.getElementById('summary').textContent !== ''")
    page.wait_for_function(SEARCHED)


def _open(page, base_url, query=""):
    page.goto(f"{base_url}/?per_page=20{query}")
    page.wait_for_function("() => document.getElementById('status').textContent"
                           ".includes('9 images')")
    # the filter bar is shown once /facets answers, a request of its own beside /status
    page.wait_for_load_state("networkidle")


def test_filter_bar_choices_come_from_the_facets(page, base_url):
    _open(page, base_url)
    assert page.is_visible("#filter-box") and page.is_visible("#f-folder")  # open on a desktop
    assert "with a date" in page.text_content("#status")
    for name, control in [("Year", "f-year"), ("From", "f-after"), ("To", "f-before"),
                          ("Place", "f-place"), ("Folder", "f-folder"), ("Camera", "f-camera")]:
        # each control is named by its label (screen readers, get_by_label)
        assert page.get_by_label(name, exact=True).get_attribute("id") == control
    assert {"photos/2023/beach (5)", "photos/2024/Snow (3)"} <= set(_options(page, "#f-folder"))
    places = _options(page, "#f-place")
    assert {"Portugal (5)", "Norway (3)", "Lisbon (5)", "Oslo (3)"} <= set(places)
    assert {"2023 (5)", "2024 (3)"} <= set(_options(page, "#f-year"))
    assert {"EOS R6 (5)", "iPhone 12 (3)"} <= {o for o in _options(page, "#f-camera")} or \
        {"Canon EOS R6 (5)", "Apple iPhone 12 (3)"} <= set(_options(page, "#f-camera"))
    assert not page.errors, page.errors


def test_filters_restrict_the_search_and_show_in_the_address(page, base_url):
    _open(page, base_url)
    _search(page, "a red circle")
    everything = _results(page)
    assert len(everything) == len(LIBRARY)

    # each hit's date and place under its thumbnail, the camera in its title
    by_key = {h["key"]: h for h in everything}
    assert by_key[BEACH[0]]["date"] == "2023-07-11"  # 18:30 at +01:00 is 17:30 UTC
    assert by_key[BEACH[0]]["place"] == "Lisbon, Portugal"
    assert "EOS R6" in by_key[BEACH[0]]["camera"]
    assert by_key[SNOW[2]]["date"] == "2024-01-13" and by_key[SNOW[2]]["place"] == "Oslo, Norway"
    assert by_key[HOSTILE]["place"] is None  # no position, no place

    page.select_option("#f-folder", "photos/2024/Snow")
    page.wait_for_function("() => document.getElementById('summary').textContent"
                           ".includes('of 3 ')")
    assert sorted(h["key"] for h in _results(page)) == SNOW
    assert "folder=photos%2F2024%2FSnow" in page.url and "q=a+red+circle" in page.url
    assert "(1 set)" in page.text_content("#filter-count")

    # the year fills the date range; with the folder nothing is left: said so, not an error
    page.select_option("#f-year", "2023")
    page.wait_for_function("() => document.getElementById('summary').textContent"
                           " === 'No images match these filters.'")
    assert page.input_value("#f-after") == "2023-01-01"
    assert page.input_value("#f-before") == "2023-12-31"
    assert "after=2023-01-01" in page.url and "before=2024-01-01" in page.url
    assert page.is_hidden("#error")

    page.select_option("#f-folder", "")
    page.wait_for_function("() => document.getElementById('summary').textContent"
                           ".includes('of 5 ')")
    assert sorted(h["key"] for h in _results(page)) == BEACH

    # a date range by hand: 11 to 13 July 2023, both days included
    page.fill("#f-after", "2023-07-11")
    page.fill("#f-before", "2023-07-13")
    page.dispatch_event("#f-before", "change")
    page.wait_for_function("() => document.getElementById('summary').textContent"
                           ".includes('of 3 ')")
    assert sorted(h["key"] for h in _results(page)) == BEACH[:3]
    assert page.input_value("#f-year") == "custom"

    # a place and a camera
    page.click("#f-clear")
    page.wait_for_function(f"() => document.getElementById('summary').textContent"
                           f".includes('of {len(LIBRARY)} ')")
    page.select_option("#f-place", "country:Norway")
    page.wait_for_function("() => document.getElementById('summary').textContent"
                           ".includes('of 3 ')")
    assert sorted(h["key"] for h in _results(page)) == SNOW
    page.select_option("#f-place", "")
    camera = next(v for v in page.eval_on_selector_all(
        "#f-camera option", "os => os.map(o => o.value)") if "EOS" in v)
    page.select_option("#f-camera", camera)
    page.wait_for_function("() => document.getElementById('summary').textContent"
                           ".includes('of 5 ')")
    assert sorted(h["key"] for h in _results(page)) == BEACH

    # the address brings the same search back
    url = page.url
    page.goto(url)
    page.wait_for_function("() => document.getElementById('summary').textContent"
                           ".includes('of 5 ')")
    assert page.input_value("#f-camera") == camera
    assert not page.errors, page.errors


CHIPS = """() => [...document.querySelectorAll('#chips .chip')].map(c => ({
  kind: c.dataset.kind, label: c.querySelector('.label').textContent,
  remove: c.querySelector('.remove').getAttribute('aria-label')}))"""


def test_words_read_as_filters_are_chips_that_can_be_removed(page, base_url):
    _open(page, base_url)
    requests = []
    page.on("request", lambda r: r.url.endswith("/search_images_by_text")
            and requests.append(r.post_data_json))

    _search(page, "a red circle in Portugal in July 2023")
    chips = {c["kind"]: c for c in page.evaluate(CHIPS)}
    assert sorted(chips) == ["date", "place"], chips
    assert "Portugal" in chips["place"]["label"] and "July 2023" in chips["date"]["label"]
    assert all(c["remove"].startswith("Remove the") for c in chips.values())
    assert sorted(h["key"] for h in _results(page)) == BEACH[:4]  # b5 is from August
    encoded = page.text_content("#summary").split("\u201c")[1].split("\u201d")[0]
    assert "red circle" in encoded and "Portugal" not in encoded  # what the model was given
    assert requests[-1].get("parse_hints", True) is True and "filters" not in requests[-1]

    # removing the date: the words go back to the model, the place stays as a sent filter
    page.click("#chips .chip[data-kind='date'] .remove")
    page.wait_for_function("() => document.getElementById('summary').textContent"
                           ".includes('of 5 ')")
    assert sorted(h["key"] for h in _results(page)) == BEACH
    assert requests[-1]["parse_hints"] is False
    assert requests[-1]["query"] == "a red circle in Portugal in July 2023"
    assert requests[-1]["filters"]["country"].casefold() in ("portugal", "pt")
    assert "taken_after" not in requests[-1]["filters"]
    assert [c["kind"] for c in page.evaluate(CHIPS)] == ["place"]
    assert page.evaluate("() => document.activeElement.classList.contains('remove')")
    assert "parse_hints=false" in page.url

    # with the keyboard: the focused chip's button removes the last one, focus goes to the query
    page.keyboard.press("Enter")
    page.wait_for_function(f"() => document.getElementById('summary').textContent"
                           f".includes('of {len(LIBRARY)} ')")
    assert page.is_hidden("#chips-row")
    assert page.evaluate("() => document.activeElement.id") == "q"
    assert requests[-1]["parse_hints"] is False and "filters" not in requests[-1]

    # a new query reads its words again
    _search(page, "a red circle in Norway")
    assert [c["kind"] for c in page.evaluate(CHIPS)] == ["place"]
    assert sorted(h["key"] for h in _results(page)) == SNOW
    assert "parse_hints" not in page.url
    assert not page.errors, page.errors


def test_details_panel_and_names_shown_as_text(page, base_url):
    _open(page, base_url, "&q=a+red+circle")
    page.wait_for_function(f"() => document.querySelectorAll('#results .hit').length"
                           f" === {len(LIBRARY)}")
    hits = _results(page)
    # a key that is HTML stays text: no element made of it, no script run
    hostile = next(h for h in hits if h["key"] == HOSTILE)
    assert hostile["name"] == HOSTILE.rsplit("/", 1)[-1]
    assert page.evaluate("() => window.pwned === undefined")
    assert page.eval_on_selector_all("#results img", "is => is.every(i => i.src.includes("
                                     "'/images/'))")

    position = [h["key"] for h in hits].index(BEACH[1])
    page.click(f"#results .hit:nth-child({position + 1}) .thumb")
    page.wait_for_selector("#details:not([hidden])")
    details = page.eval_on_selector_all(
        "#details-list dd", "ds => Object.fromEntries(ds.map(d => [d.dataset.field,"
                            " d.textContent]))")
    assert details["key"] == BEACH[1]
    assert "2023" in details["taken_at"] and "UTC" in details["taken_at"]
    assert details["place"] == "Lisbon, Portugal"
    assert details["position"] == "38.72230, -9.13930"
    assert details["camera"] == "Canon EOS R6"
    assert details["size"].startswith("64 \u00d7 48 pixels")
    assert details["folder"] == "photos/2023/beach"
    assert "image/jpeg" in details["file"]
    page.keyboard.press("Escape")
    assert page.is_hidden("#viewer")

    # the photo without EXIF: its date is the file's, said so; its name is text here too
    position = [h["key"] for h in hits].index(HOSTILE)
    page.click(f"#results .hit:nth-child({position + 1}) .thumb")
    page.wait_for_selector("#details:not([hidden])")
    assert page.text_content("#details-list dd[data-field='key']") == HOSTILE
    assert "last changed" in page.text_content("#details-list dd[data-field='taken_at']")
    assert page.evaluate("() => window.pwned === undefined")
    page.keyboard.press("Escape")
    assert not page.errors, page.errors


def test_phone_filters_and_details_fit(phone, base_url):
    page = phone
    _open(page, base_url)
    assert not page.evaluate("() => document.getElementById('filter-box').open")  # folded
    page.tap("#filter-box summary")
    layout = _layout(page, ["#f-year", "#f-after", "#f-before", "#f-place", "#f-folder",
                            "#f-camera"])
    _assert_in_viewport(layout, list(layout["boxes"]), min_height=44)
    _assert_no_sideways_scroll(page, PHONE["width"])

    page.tap("#q")
    page.keyboard.type("a red circle")
    page.tap("#search-btn")
    page.wait_for_function(f"() => document.querySelectorAll('#results .hit').length"
                           f" === {len(LIBRARY)}")
    page.select_option("#f-folder", "photos/2023/beach")
    page.wait_for_function("() => document.getElementById('summary').textContent"
                           ".includes('of 5 ')")
    _assert_no_sideways_scroll(page, PHONE["width"])
    page.screenshot(path=str(Path("test-artifacts") / "web-phone-filters.png"), full_page=True)

    page.tap("#results .hit:nth-child(1) .thumb")
    page.wait_for_selector("#details:not([hidden])")
    _assert_no_sideways_scroll(page, PHONE["width"])
    box = _layout(page, ["#details", "#viewer-close"])
    assert 0 <= box["boxes"]["#details"]["left"] and \
        box["boxes"]["#details"]["right"] <= PHONE["width"]
    _assert_in_viewport(box, ["#viewer-close"], min_height=44)
    page.tap("#viewer-close")
    assert page.is_hidden("#viewer")

    # a chip fits and can be tapped away
    page.tap("#f-clear")
    page.evaluate("() => window.scrollTo(0, 0)")
    page.fill("#q", "a red circle in Norway")
    page.tap("#search-btn")
    page.wait_for_selector("#chips .chip")
    page.wait_for_function(SEARCHED)
    assert sorted(h["key"] for h in _results(page)) == SNOW
    _assert_no_sideways_scroll(page, PHONE["width"])
    page.locator("#chips .remove").scroll_into_view_if_needed()
    _assert_in_viewport(_layout(page, ["#chips .remove"]), ["#chips .remove"], min_height=44)
    page.tap("#chips .remove")
    page.wait_for_function(f"() => document.getElementById('summary').textContent"
                           f".includes('of {len(LIBRARY)} ')")
    assert page.is_hidden("#chips-row")
    assert not page.errors, page.errors


@pytest.fixture(scope="module")
def legacy_url(tmp_path_factory, encoder):
    with _serve_library(tmp_path_factory.mktemp("legacy"), encoder, strip_metadata=True) as url:
        yield url


def test_a_version_without_metadata_shows_none(page, legacy_url):
    """An index made before photos had metadata: no bar, no chips, no dates, no details, and no
    failed request in the console."""
    _open(page, legacy_url)
    _search(page, "a red circle")
    assert len(_results(page)) == len(LIBRARY)
    assert page.is_hidden("#filter-box") and page.is_hidden("#chips-row")
    assert page.eval_on_selector_all("#results .meta", "ms => ms.length") == 0
    page.click("#results .hit:nth-child(1) .thumb")
    page.wait_for_function("() => { const i = document.getElementById('viewer-img');"
                           " return i.complete && i.naturalWidth > 0; }")
    page.wait_for_timeout(300)  # the details request, if any, is back
    assert page.is_hidden("#details")
    page.keyboard.press("Escape")
    assert not page.errors, page.errors
