"""The web page in a real headless browser (Debian's chromium, driven by playwright).

Type a query, see thumbnails that really load with each hit's match, page on, open the full
image, then search by an uploaded image and by a dropped one (the service needs an API key for
that: the page asks for it). The same at a desktop width and on a 390 x 844 touch screen: the
header wraps there, nothing scrolls sideways, every control is on screen and can be tapped.
Screenshots of the results land in test-artifacts/ (git-ignored).

`make setup` installs Debian's chromium (playwright drives that binary; no browser download);
without it these tests fail rather than skip.
"""
from __future__ import annotations

import base64
import math
import shutil
from pathlib import Path

import pytest
from playwright import sync_api  # noqa: E402

from tests.search_api.helpers import PREFIX, serve

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]
KEY = "web-test-key"
PER_PAGE = 8

ALL_LOADED = """n => {
  const imgs = [...document.querySelectorAll('#results .hit img')];
  return imgs.length === n && imgs.every(i => i.complete && i.naturalWidth > 0);
}"""


SERVICE_OPTIONS = dict(split="all", api_key=KEY)


@pytest.fixture(scope="module")
def encoder(calibrated_encoder):
    """A model with a match scale: the page shows each hit's match."""
    return calibrated_encoder


@pytest.fixture(scope="module")
def base_url(svc):
    with serve(svc.app) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        yield p


def _open_page(browser, profile: Path, **context_options):
    # a new, empty profile directory for every run
    ctx = browser.chromium.launch_persistent_context(
        str(profile), executable_path=CHROMIUM, headless=True, args=FLAGS, **context_options)
    pg = ctx.new_page()
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(f"page error: {e}"))
    pg.on("console", lambda m: m.type == "error" and pg.errors.append(f"console: {m.text}"))
    pg.set_default_timeout(20_000)
    ARTIFACTS.mkdir(exist_ok=True)
    return ctx, pg


@pytest.fixture(scope="module")
def page(browser, tmp_path_factory):
    ctx, pg = _open_page(browser, tmp_path_factory.mktemp("chromium-profile"),
                         viewport={"width": 1280, "height": 900})
    yield pg
    ctx.close()


PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def phone(browser, tmp_path_factory):
    """A phone: 390 x 844 CSS pixels, touch, the mobile viewport rules (a page wider than the
    screen would be zoomed out, so the tests check the width against 390 itself)."""
    ctx, pg = _open_page(browser, tmp_path_factory.mktemp("chromium-phone"), viewport=PHONE,
                         device_scale_factor=3, is_mobile=True, has_touch=True)
    yield pg
    ctx.close()


def _hits(page) -> list[dict]:
    return page.eval_on_selector_all(
        "#results .hit", "els => els.map(e => ({key: e.dataset.key, score: +e.dataset.score, "
                         "similarity: +e.dataset.similarity, match: +e.dataset.match, "
                         "rank: e.querySelector('.rank').textContent, "
                         "shown: e.querySelector('.score').textContent, "
                         "title: e.querySelector('.score').title}))")


def test_text_search_thumbnails_paging_and_viewer(page, base_url):
    page.goto(f"{base_url}/?per_page={PER_PAGE}")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('24')")
    assert page.title() == "Image search"

    page.fill("#q", "a red circle")
    page.press("#q", "Enter")
    page.wait_for_function(ALL_LOADED, arg=PER_PAGE)
    hits = _hits(page)
    assert [h["rank"] for h in hits] == [f"#{i}" for i in range(1, PER_PAGE + 1)]
    assert all(h["key"].startswith(PREFIX) for h in hits)
    # one number, the match, falls along the list; the ranking score and cosine are in the title
    assert all(h["shown"] == f"{math.floor(h['match'] + 0.5)}% match" for h in hits)  # JS round
    shown = [int(h["shown"].split("%")[0]) for h in hits]
    assert shown == sorted(shown, reverse=True) and all(0 <= m <= 100 for m in shown)
    assert all(f"ranking score {h['score']:.3f}" in h["title"]
               and f"{h['similarity']:.3f}" in h["title"] for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert "Showing 8 of 24" in page.text_content("#summary")
    assert "q=a+red+circle" in page.url  # the search can be shared as a link
    page.screenshot(path=str(ARTIFACTS / "web-results.png"), full_page=True)

    # more results on demand, appended below, until there are no more
    page.click("#more")
    page.wait_for_function(ALL_LOADED, arg=2 * PER_PAGE)
    page.click("#more")
    page.wait_for_function(ALL_LOADED, arg=3 * PER_PAGE)
    all_hits = _hits(page)
    assert [h["rank"] for h in all_hits] == [f"#{i}" for i in range(1, 25)]
    assert len({h["key"] for h in all_hits}) == 24
    assert page.is_hidden("#more")

    # a click shows the full image
    page.click("#results .hit:nth-child(3) .thumb")
    page.wait_for_function("() => { const i = document.getElementById('viewer-img');"
                           " return i.complete && i.naturalWidth > 0; }")
    assert page.is_visible("#viewer")
    src = page.get_attribute("#viewer-img", "src")
    assert src == "/images/" + all_hits[2]["key"]  # the original, not the thumbnail
    assert all_hits[2]["key"].rsplit("/", 1)[-1] in page.text_content("#viewer-caption")
    assert all_hits[2]["shown"] in page.text_content("#viewer-caption")
    page.keyboard.press("Escape")
    assert page.is_hidden("#viewer")
    assert not page.errors, page.errors

    # ?min_match=N keeps the matches of N% and more
    cut = all_hits[5]["match"]
    page.goto(f"{base_url}/?per_page=24&min_match={cut}&q=a+red+circle")
    page.wait_for_function("() => document.getElementById('summary').textContent.includes('of')")
    kept = _hits(page)
    assert [h["key"] for h in kept] == [h["key"] for h in all_hits if h["match"] >= cut]
    assert not page.errors, page.errors


def test_search_by_uploaded_and_dropped_image(page, base_url, tiny_flickr):
    root, meta = tiny_flickr
    name = meta["names"][13]
    path = root / "Images" / name
    page.goto(f"{base_url}/?per_page={PER_PAGE}")

    # the service wants a key for uploads: the page says so and offers a field for it
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#error:not([hidden])")
    assert "API key" in page.text_content("#error")
    assert page.is_visible("#api-key")
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.errors[:] = [e for e in page.errors if "401" not in e]  # that refusal was expected

    page.set_input_files("#file", str(path))
    page.wait_for_function(ALL_LOADED, arg=PER_PAGE)
    hits = _hits(page)
    # the image finds itself: score 1, beyond every true caption pair of the calibration
    assert hits[0]["key"] == PREFIX + name and abs(hits[0]["score"] - 1.0) < 1e-3
    assert hits[0]["shown"] == "100% match"
    assert page.is_visible("#query-image") and page.is_hidden("#error")
    page.wait_for_function("() => document.getElementById('query-thumb').naturalWidth > 0")
    page.click("#more")  # paging works for image searches too
    page.wait_for_function(ALL_LOADED, arg=2 * PER_PAGE)
    page.screenshot(path=str(ARTIFACTS / "web-image-results.png"), full_page=True)

    # drop another image anywhere on the page
    other = meta["names"][2]
    b64 = base64.b64encode((root / "Images" / other).read_bytes()).decode()
    page.evaluate("""b64 => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], 'dropped.jpg', {type: 'image/jpeg'}));
        for (const type of ['dragenter', 'dragover', 'drop'])
            document.body.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true,
                                                             cancelable: true}));
    }""", b64)
    page.wait_for_function(f"() => document.querySelector('#results .hit')?.dataset.key"
                           f" === '{PREFIX + other}'")
    page.wait_for_function(ALL_LOADED, arg=PER_PAGE)
    assert page.is_hidden("#drop")
    assert not page.errors, page.errors


def test_errors_are_shown_not_thrown(page, base_url):
    page.goto(base_url + "/")
    page.evaluate("() => { document.getElementById('q').removeAttribute('maxlength'); }")
    page.fill("#q", "x" * 1500)  # over the service's query limit
    page.press("#q", "Enter")
    page.wait_for_selector("#error:not([hidden])")
    assert "at most 1000 characters" in page.text_content("#error")
    assert page.eval_on_selector_all("#results .hit", "els => els.length") == 0


# Where the page's controls are: the document's width against the window's, and for each
# selector its box and whether a tap at its centre lands on it (nothing covers it).
LAYOUT = """sels => ({
  scrollWidth: document.documentElement.scrollWidth, innerWidth: innerWidth,
  innerHeight: innerHeight,
  boxes: Object.fromEntries(sels.map(s => {
    const e = document.querySelector(s), r = e.getBoundingClientRect();
    const at = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
    return [s, {left: r.left, right: r.right, top: r.top, bottom: r.bottom, height: r.height,
                onTop: !!at && (at === e || e.contains(at))}];
  })),
})"""
HEADER_CONTROLS = ["#q", "#search-btn", "label.upload"]


def _layout(page, selectors) -> dict:
    return page.evaluate(LAYOUT, selectors)


def _assert_in_viewport(layout, selectors, min_height=0):
    for sel in selectors:
        box = layout["boxes"][sel]
        assert 0 <= box["left"] and box["right"] <= layout["innerWidth"], (sel, box)
        assert 0 <= box["top"] and box["bottom"] <= layout["innerHeight"], (sel, box)
        assert box["onTop"], f"{sel} is covered by something else"
        assert box["height"] >= min_height, (sel, box)


def _assert_no_sideways_scroll(page, width):
    layout = _layout(page, [])
    assert layout["innerWidth"] == width  # not zoomed out to fit something wider
    assert layout["scrollWidth"] <= layout["innerWidth"], layout


def test_desktop_header_stays_on_one_row(page, base_url):
    page.goto(f"{base_url}/?per_page={PER_PAGE}")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('24')")
    _assert_no_sideways_scroll(page, 1280)
    layout = _layout(page, ["h1", *HEADER_CONTROLS])
    _assert_in_viewport(layout, HEADER_CONTROLS)
    title = layout["boxes"]["h1"]
    middle = (title["top"] + title["bottom"]) / 2
    for sel in HEADER_CONTROLS:  # title, field and both buttons side by side
        box = layout["boxes"][sel]
        assert abs((box["top"] + box["bottom"]) / 2 - middle) < 6, (sel, box, title)


def test_phone_layout_every_control_works(phone, base_url, tiny_flickr):
    """At 390 x 844 the header wraps, "Search by image" is fully on screen, nothing scrolls
    sideways, and every control works by touch: search, more, the viewer, the upload, the key."""
    page = phone
    page.goto(f"{base_url}/?per_page={PER_PAGE}")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('24')")
    _assert_no_sideways_scroll(page, PHONE["width"])
    layout = _layout(page, ["h1", "#search-form", *HEADER_CONTROLS])
    assert layout["boxes"]["#search-form"]["top"] >= layout["boxes"]["h1"]["bottom"]  # wrapped
    _assert_in_viewport(layout, HEADER_CONTROLS, min_height=44)

    page.tap("#q")
    page.keyboard.type("a red circle")
    page.tap("#search-btn")
    page.wait_for_function(ALL_LOADED, arg=PER_PAGE)
    _assert_no_sideways_scroll(page, PHONE["width"])
    boxes = page.eval_on_selector_all("#results .hit", "els => els.map(e => {"
                                      " const r = e.getBoundingClientRect();"
                                      " return [r.left, r.right]; })")
    assert all(0 <= left and right <= PHONE["width"] for left, right in boxes), boxes
    assert len({left for left, _ in boxes}) >= 2  # thumbnails side by side, not one a screen
    page.screenshot(path=str(ARTIFACTS / "web-phone-results.png"), full_page=True)

    page.locator("#more").scroll_into_view_if_needed()
    _assert_in_viewport(_layout(page, ["#more"]), ["#more"], min_height=44)
    page.tap("#more")
    page.wait_for_function(ALL_LOADED, arg=2 * PER_PAGE)
    _assert_no_sideways_scroll(page, PHONE["width"])

    page.tap("#results .hit:nth-child(2) .thumb")
    page.wait_for_function("() => { const i = document.getElementById('viewer-img');"
                           " return i.complete && i.naturalWidth > 0; }")
    _assert_in_viewport(_layout(page, ["#viewer-img", "#viewer-close"]),
                        ["#viewer-img", "#viewer-close"])
    _assert_no_sideways_scroll(page, PHONE["width"])
    page.tap("#viewer-close")
    assert page.is_hidden("#viewer")

    # "Search by image" opens the phone's picker; the first try asks for the key
    root, meta = tiny_flickr
    name = meta["names"][7]
    page.evaluate("() => window.scrollTo(0, 0)")
    with page.expect_file_chooser() as chooser:
        page.tap("label.upload")
    chooser.value.set_files(str(root / "Images" / name))
    page.wait_for_selector("#error:not([hidden])")
    assert "API key" in page.text_content("#error")
    page.errors[:] = [e for e in page.errors if "401" not in e]  # that refusal was expected
    page.evaluate("() => window.scrollTo(0, 0)")
    _assert_in_viewport(_layout(page, ["#api-key"]), ["#api-key"])
    _assert_no_sideways_scroll(page, PHONE["width"])
    page.tap("#api-key")
    page.keyboard.type(KEY)
    page.dispatch_event("#api-key", "change")
    with page.expect_file_chooser() as chooser:
        page.tap("label.upload")
    chooser.value.set_files(str(root / "Images" / name))
    page.wait_for_function(f"() => document.querySelector('#results .hit')?.dataset.key"
                           f" === '{PREFIX + name}'")
    page.wait_for_function(ALL_LOADED, arg=PER_PAGE)
    _assert_no_sideways_scroll(page, PHONE["width"])
    page.screenshot(path=str(ARTIFACTS / "web-phone-image-results.png"), full_page=True)
    assert not page.errors, page.errors
