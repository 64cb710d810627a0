"""Dates and places written in a search query, read as filters ("query hints").

`read_hints(text, now, tz)` finds the words of a query that name when or where a photo was
taken ("beach in July 2023", "snow in Norway last winter", "kids at the lake 2019"), turns them
into a PhotoFilter and returns the rest of the text for the model to encode ("beach", "snow",
"kids at the lake"), with one Hint per phrase read so the answer can say what was read.

What is read (everything else stays in the text):
  dates    a year ("2019", "in 2019"; 1900..this year, not a count: "2000 balloons"), a month of
           a year ("July 2023", "juli 2023"; month names also in de/fr/es/it/pt/nl), a day
           ("12 March 2021", "2021-03-12", "on March 3rd"), a season of a year or the last/this
           one ("summer 2019", "last winter"), "last/this week|month|year|weekend|July",
           "yesterday", "3 weeks ago", "the past 2 years", a decade after a cue ("in the 90s"),
           year ranges ("2015-2018", "between 2015 and 2018"), and since/after/before/until
           in front of any of them (one bound only).
  places   a country, region or city of core.places.place_names(), longest name first, read
           only after a cue ("in", "near", "from", "over", "trip to" ...), capitalised at the
           end of the query ("Eiffel tower Paris"), or with the region or country it lies in
           ("Lisbon, Portugal", "Austin texas"); never a name that is also an ordinary English
           word unless written with a capital ("in Nice", not "in nice weather"), never one
           followed by a word it may qualify ("Jordan shoes", "Paris Hilton"), never a month
           ("in March" is not March, England). One country, region and city each.
Not read, on purpose: a month or season without a year or last/this ("snow in winter",
"a dog named July"): it names every one of them and the filter has no "any July"; holidays
("4th of July", "Christmas"). Seasons are the northern hemisphere's unless `tz` is a zone of
the southern one. Day boundaries are midnights in `tz`.

dateparser parses the phrases found (days, "N units ago"), restricted to English and run only
on the few phrases the patterns here select (none on a text without a digit or a date word), so
a query costs about 0.1 ms once warm; `warm_up()` loads the parsers, the place table and the word
list up front (seconds) instead of on the first query.
"""
from __future__ import annotations

import calendar
import re
from dataclasses import dataclass, field as dataclass_field
from datetime import date, datetime, timedelta, timezone
from functools import lru_cache
from typing import Any, Callable, Iterable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from indexer.photo_filter import PhotoFilter

# Longer texts are not read (the service refuses them well before: MAX_QUERY_CHARS).
MAX_HINT_TEXT_CHARS = 2000
MAX_DATE_PHRASES = 4  # read at most this many, trying at most 4x as many candidates
MAX_PLACE_WORDS = 6  # "saint vincent and the grenadines"
FIRST_PHOTO_YEAR = 1900
# A city written in lower case after a cue is read only if it is at least this much of a place
# (core.places' weight: table places around it); villages need a capital.
MIN_LOWERCASE_CITY_WEIGHT = 10


@dataclass(frozen=True)
class Hint:
    """One filter read from the text: `field` is a PhotoFilter field, or "taken" for a date
    range (value {"after": iso, "before": iso}); `text` the words it was read from."""
    field: str
    value: Any
    text: str


@dataclass(frozen=True)
class QueryHints:
    text: str  # what remains for the model ("" when the query was only hints)
    filters: PhotoFilter
    hints: list[Hint] = dataclass_field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# words

MONTHS = {
    "january": 1, "jan": 1, "february": 2, "feb": 2, "march": 3, "mar": 3, "april": 4, "apr": 4,
    "may": 5, "june": 6, "jun": 6, "july": 7, "jul": 7, "august": 8, "aug": 8, "september": 9,
    "sept": 9, "sep": 9, "october": 10, "oct": 10, "november": 11, "nov": 11, "december": 12,
    "dec": 12,
}
OTHER_MONTH_LANGUAGES = ("de", "fr", "es", "it", "pt", "nl")
SEASONS = {"spring": "spring", "summer": "summer", "autumn": "autumn", "fall": "autumn",
           "winter": "winter"}
# first month of each season, by hemisphere (meteorological seasons: three months each)
SEASON_START_MONTH = {
    "north": {"spring": 3, "summer": 6, "autumn": 9, "winter": 12},
    "south": {"spring": 9, "summer": 12, "autumn": 3, "winter": 6},
}
NUMBER_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
                "seven": 7, "eight": 8, "nine": 9, "ten": 10, "few": 3, "a few": 3,
                "couple": 2, "a couple": 2, "a couple of": 2}
# recurring days people name by the date: a filter on one year's would hide the others
HOLIDAY_DAYS = {(1, 1), (2, 14), (7, 4), (10, 31), (12, 24), (12, 25), (12, 31)}

# words that end or continue a phrase without being part of a name ("Norway last winter")
FUNCTION_WORDS = frozenset("""
a an the and or but with without in at on of from to for by near around across through into
onto during since after before until till last this next past ago my our his her their your its
is are was were be been taken shot while when where who what at about over under between among
me us them him it we they i you some any all no not only just very so like as than then there
here inside outside along""".split())
# the word before a date that says which bound it sets (else both: the whole period)
DATE_CUES = {"in": "in", "during": "in", "from": "in", "of": "in", "on": "in", "around": "in",
             "circa": "in", "ca": "in", "since": "since", "after": "after", "before": "before",
             "until": "until", "till": "until", "up to": "until"}
PLACE_CUES = frozenset({"in", "at", "near", "from", "around", "across", "through", "visiting",
                        "inside", "outside", "throughout", "within", "over"})
# "to" is a place cue only after a word of going somewhere ("trip to Lisbon", not "next to")
MOTION_BEFORE_TO = frozenset({"trip", "travel", "travelled", "traveled", "travelling",
                              "traveling", "going", "went", "go", "flight", "flew", "drive",
                              "drove", "road", "journey", "holiday", "holidays", "vacation",
                              "visit", "moved", "move", "moving", "welcome", "back", "way",
                              "tour", "cruise", "ride", "excursion", "honeymoon"})
# a name right after these names something else ("a dog named Paris")
NAMING_WORDS = frozenset({"named", "called", "nicknamed", "dubbed", "titled", "brand", "model"})
# the word after a bare year that says it is a year, not a count ("2019 photos")
YEAR_NOUNS = frozenset({"photos", "pictures", "pics", "images", "shots", "snaps", "selfies",
                        "videos", "holidays", "vacations", "memories", "highlights", "trips",
                        "winters", "summers"})
UNITS = frozenset({"km", "m", "ft", "mi", "kg", "lb", "lbs", "px", "mm", "cm", "cc", "hp", "ml",
                   "mph", "kmh", "rpm", "x", "mp", "k", "pm", "am", "miles", "meters",
                   "metres", "feet", "dollars", "euros", "pounds", "points", "calories"})
# a bare year after these is a number or a writing, not a date ("room 2019", "sign that says
# 2020")
NUMBER_NOUNS = frozenset({"room", "number", "no", "nr", "route", "bus", "flight", "gate",
                          "platform", "model", "page", "track", "highway", "road", "street",
                          "apartment", "suite", "code", "size", "over", "under", "about",
                          "top", "score", "named", "called", "jersey", "mile", "seat",
                          "says", "saying", "reads", "reading", "written", "spelling"})


# ---------------------------------------------------------------------------------------------
# lazily built resources, shared by every query (core.places builds its table under a lock)

@lru_cache(maxsize=1)
def _other_month_names() -> dict[str, int]:
    """Month names of a few more languages (dateparser's own locale data), for "juli 2023"."""
    from dateparser.languages.loader import default_loader

    names: dict[str, int] = {}
    keys = ["january", "february", "march", "april", "may", "june", "july", "august",
            "september", "october", "november", "december"]
    for language in OTHER_MONTH_LANGUAGES:
        info = default_loader.get_locale(language).info
        for number, key in enumerate(keys, start=1):
            for name in info.get(key, []):
                name = name.strip(".").casefold()
                if len(name) >= 3 and re.fullmatch(r"[^\W\d_]+", name) and name not in MONTHS:
                    names.setdefault(name, number)
    return names


def _place_names() -> dict:
    from core.places import place_names

    return place_names()


@lru_cache(maxsize=1)
def _english_place_words() -> frozenset[str]:
    """Place names that are also ordinary English words in lower case ("nice", "bath",
    "china", "turkey", "jordan"): Webster's list from the english-words package."""
    from english_words import get_english_words_set

    words = get_english_words_set(["web2"], lower=False, alpha=True)
    return frozenset(name for name in _place_names() if name in words)


@lru_cache(maxsize=1)
def _patterns() -> list[tuple[re.Pattern, Callable]]:
    return _build_patterns()


def warm_up() -> None:
    """Load the date parser, the place table and the word list now rather than on the first
    query (a service calls this at start-up)."""
    for phrase in ("12 March 2021", "3 weeks ago"):  # absolute and relative parsers
        _parse_cached(phrase, datetime(2000, 1, 1))
    _patterns()
    _date_trigger()
    _english_place_words()
    _name_prefixes()
    _zone_latitudes()


# ---------------------------------------------------------------------------------------------
# time ranges

@dataclass(frozen=True)
class _Clock:
    now: datetime  # aware, in the zone
    zone: Any
    hemisphere: str

    def day(self, d: date) -> datetime:
        return datetime(d.year, d.month, d.day, tzinfo=self.zone)


def _month_start(clock: _Clock, year: int, month: int) -> datetime:
    year, month = year + (month - 1) // 12, (month - 1) % 12 + 1
    return datetime(year, month, 1, tzinfo=clock.zone)


def _month(clock, year, month):
    return _month_start(clock, year, month), _month_start(clock, year, month + 1)


def _year(clock, year):
    return _month_start(clock, year, 1), _month_start(clock, year + 1, 1)


def _season_by_label(clock, season: str, year: int):
    """The season `year` names: the one whose middle month falls in that year (winter 2019 in
    the north: December 2018 to February 2019)."""
    first = SEASON_START_MONTH[clock.hemisphere][season]
    start_year = year - 1 if first == 12 else year
    return _month_start(clock, start_year, first), _month_start(clock, start_year, first + 3)


def _season_instances(clock, season):
    for year in range(clock.now.year + 1, clock.now.year - 3, -1):
        yield _season_by_label(clock, season, year)


def _last_season(clock, season):
    """The latest one that is over."""
    return next(r for r in _season_instances(clock, season) if r[1] <= clock.now)


def _this_season(clock, season):
    """The latest one that has begun."""
    return next(r for r in _season_instances(clock, season) if r[0] <= clock.now)


def _named_month(clock, month: int, which: str):
    year = clock.now.year
    if which == "last":  # the latest one that is over
        return _month(clock, year if month < clock.now.month else year - 1, month)
    return _month(clock, year if month <= clock.now.month else year - 1, month)  # "this"


def _week_of(clock, d: date):
    monday = d - timedelta(days=d.weekday())
    return clock.day(monday), clock.day(monday + timedelta(days=7))


def _day(clock, d: date):
    return clock.day(d), clock.day(d + timedelta(days=1))


def _period_of(clock, when: datetime, period: str):
    d = when.date()
    if period == "year":
        return _year(clock, d.year)
    if period == "month":
        return _month(clock, d.year, d.month)
    if period == "week":
        return _week_of(clock, d)
    return _day(clock, d)


def _relative(clock, which: str, unit: str):
    today = clock.now.date()
    if unit == "week":
        start, end = _week_of(clock, today)
        return (start - timedelta(days=7), start) if which == "last" else (start, end)
    if unit == "weekend":
        saturday = today - timedelta(days=(today.weekday() - 5) % 7)
        if which == "last" and (today.weekday() >= 5):
            saturday -= timedelta(days=7)  # the one before this one
        return clock.day(saturday), clock.day(saturday + timedelta(days=2))
    if unit == "month":
        shift = -1 if which == "last" else 0
        return _month(clock, today.year, today.month + shift)
    shift = -1 if which == "last" else 0
    return _year(clock, today.year + shift)


def _number(word: str) -> int | None:
    word = " ".join(word.casefold().split())
    if word.isdigit():
        return int(word)
    return NUMBER_WORDS.get(word)


def _units_back(clock, n: int, unit: str) -> datetime:
    today = clock.day(clock.now.date())
    if unit.startswith("day"):
        return today - timedelta(days=n)
    if unit.startswith("week"):
        return today - timedelta(weeks=n)
    if unit.startswith("month"):
        return _shift_months(today, -n)
    return _shift_months(today, -12 * n)


def _shift_months(when: datetime, months: int) -> datetime:
    index = when.year * 12 + when.month - 1 + months
    year, month = divmod(index, 12)

    day = min(when.day, calendar.monthrange(year, month + 1)[1])
    return when.replace(year=year, month=month + 1, day=day)


def _plausible_year(clock, year: int) -> bool:
    return FIRST_PHOTO_YEAR <= year <= clock.now.year


# ---------------------------------------------------------------------------------------------
# date patterns: each finds phrases and says which time range each names (None: not a date)

YEAR = r"(?:19|20)\d\d"
# a 4-digit year standing alone: not part of a longer number, a time, a price or a size
LONE_YEAR = rf"(?<![\w$€£#@/.:,-])(?P<y>{YEAR})(?![\w%°'’]|[.,:/-]\d)"
ORD = r"(?:st|nd|rd|th)?"


def _month_alternation(names: Iterable[str]) -> str:
    return "|".join(sorted((re.escape(n) for n in names), key=len, reverse=True))


def _build_patterns() -> list[tuple[re.Pattern, Callable]]:
    en = _month_alternation(MONTHS)
    anymonth = _month_alternation([*MONTHS, *_other_month_names()])
    season = _month_alternation(SEASONS)
    number = r"\d{1,3}|a couple of|a couple|a few|an?|one|two|three|four|five|six|seven|eight" \
             r"|nine|ten|few|couple"
    unit = r"days?|weeks?|months?|years?"
    flags = re.IGNORECASE

    def month_no(word):
        word = word.casefold().strip(".")
        return MONTHS.get(word) or _other_month_names().get(word)

    def year_range(clock, m):
        a, b = int(m.group("a")), int(m.group("b"))
        if not (_plausible_year(clock, a) and _plausible_year(clock, b) and a < b):
            return None
        return _year(clock, a)[0], _year(clock, b)[1]

    def parsed_day(clock, m):
        data = _parse(clock, m.group("d"))
        if data is None:
            return None
        when, period = data
        if not _plausible_year(clock, when.year):
            return None
        return _period_of(clock, when, period if period in ("day", "month", "year") else "day")

    def day_no_year(clock, m):
        when_month = month_no(m.group("m"))
        day = int(m.group("n"))
        if when_month is None or not 1 <= day <= 31 or (when_month, day) in HOLIDAY_DAYS:
            return None
        return parsed_day(clock, m)

    def month_year(clock, m):
        year, month = int(m.group("y")), month_no(m.group("m"))
        if month is None or not _plausible_year(clock, year):
            return None
        return _month(clock, year, month)

    def iso_month(clock, m):
        year, month = int(m.group("y")), int(m.group("mo"))
        if not 1 <= month <= 12 or not _plausible_year(clock, year):
            return None
        return _month(clock, year, month)

    def season_year(clock, m):
        year = int(m.group("y"))
        if not _plausible_year(clock, year):
            return None
        return _season_by_label(clock, SEASONS[m.group("s").casefold()], year)

    def season_relative(clock, m):
        which = m.group("w").casefold()
        name = SEASONS[m.group("s").casefold()]
        return _this_season(clock, name) if which == "this" else _last_season(clock, name)

    def month_relative(clock, m):
        which = "this" if m.group("w").casefold() == "this" else "last"
        return _named_month(clock, MONTHS[m.group("m").casefold().strip(".")], which)

    def unit_relative(clock, m):
        which = "this" if m.group("w").casefold() == "this" else "last"
        return _relative(clock, which, m.group("u").casefold())

    def day_word(clock, m):
        today = clock.now.date()
        word = m.group(0).casefold()
        return _day(clock, today - timedelta(days=1) if word == "yesterday" else today)

    def ago(clock, m):
        n = _number(m.group("n"))
        if n is None or n > 200:
            return None
        parsed = _parse(clock, m.group(0))
        if parsed is None:
            return None
        when, period = parsed
        if not _plausible_year(clock, when.year):
            return None
        return _period_of(clock, when, period)

    def past_units(clock, m):
        n = _number(m.group("n"))
        if n is None or not 1 <= n <= 200:
            return None
        start = _units_back(clock, n, m.group("u").casefold())
        if not _plausible_year(clock, start.year):
            return None
        return start, None

    def decade(clock, m):
        if m.group("c"):
            start = int(m.group("c"))
        else:
            two = int(m.group("t"))
            start = (2000 if two * 10 <= clock.now.year % 100 else 1900) + two * 10
        if not _plausible_year(clock, start):
            return None
        return _year(clock, start)[0], _year(clock, start + 10)[0]

    def bare_year(clock, m):
        year = int(m.group("y"))
        if not _plausible_year(clock, year):
            return None
        text = m.string
        before = re.search(r"([^\W\d_]+)\W*$", text[:m.start()])
        if before and before.group(1).casefold() in NUMBER_NOUNS:
            return None
        after = re.match(r"\s*([^\W\d_]+)", text[m.end():])
        if after:
            word = after.group(1).casefold()
            if word in UNITS:
                return None
            plural_count = (len(word) > 3 and word.endswith("s") and not word.endswith("ss")
                            and word not in YEAR_NOUNS and word not in FUNCTION_WORDS)
            if plural_count:
                return None
        return _year(clock, year)

    specs = [
        (rf"(?:between\s+)?(?<![\w-])(?P<a>{YEAR})\s*(?:-|–|to|until|through|and)\s*"
         rf"(?P<b>{YEAR})(?![\w-])", year_range),
        (r"(?<![\w-])(?P<d>\d{4}-\d{1,2}-\d{1,2})(?![\w-])", parsed_day),
        (rf"\b(?P<d>\d{{1,2}}{ORD}(?:\s+of)?\s+(?:{en})\.?,?\s+{YEAR})(?![\w-])", parsed_day),
        (rf"\b(?P<d>(?:{en})\.?\s+\d{{1,2}}{ORD},?\s+{YEAR})(?![\w-])", parsed_day),
        (rf"\b(?P<m>{anymonth})\.?(?:,|\s+of)?\s+(?P<y>{YEAR})(?![\w-])", month_year),
        (rf"(?<![\w-])(?P<y>{YEAR})[-/](?P<mo>\d\d)(?![\w-])", iso_month),
        (rf"\b(?P<s>{season})(?:,|\s+of)?\s+(?P<y>{YEAR})(?![\w-])", season_year),
        (rf"(?<![\w-])(?P<y>{YEAR})\s+(?P<s>{season})\b", season_year),
        (rf"\b(?P<w>last|this|past)\s+(?P<s>{season})\b", season_relative),
        (rf"\b(?P<w>last|this)\s+(?P<m>{en})\b(?!\s*\d)", month_relative),
        (r"\b(?P<w>last|this|past)\s+(?P<u>week|weekend|month|year)\b", unit_relative),
        (r"\b(?:yesterday|today)\b", day_word),
        (rf"\b(?P<n>{number})\s+(?P<u>{unit})\s+ago\b", ago),
        (rf"\b(?:the\s+)?(?:past|last)\s+(?P<n>{number})\s+(?P<u>{unit})\b", past_units),
        (rf"\b(?P<d>(?P<m>{en})\.?\s+(?P<n>\d{{1,2}}){ORD})(?![\w-]|,?\s*\d)", day_no_year),
        (rf"\b(?P<d>(?P<n>\d{{1,2}}){ORD}(?:\s+of)?\s+(?P<m>{en}))\b(?!\.?,?\s*\d)",
         day_no_year),
        (r"(?<![\w'’])(?:(?P<c>(?:19|20)\d)0s|['’]?(?P<t>\d)0s)\b", decade),
        (LONE_YEAR, bare_year),
    ]
    return [(re.compile(p, flags), f) for p, f in specs]


def _parse(clock: _Clock, phrase: str) -> tuple[datetime, str] | None:
    # relative phrases ("3 weeks ago") count from the clock, read to the minute so the cache
    # below keeps working across queries
    return _parse_cached(phrase, clock.now.replace(tzinfo=None, second=0, microsecond=0))


@lru_cache(maxsize=4096)
def _parse_cached(phrase: str, base: datetime) -> tuple[datetime, str] | None:
    parser = _relative_parser(base)
    data = parser.get_date_data(phrase)
    if data.date_obj is None:
        return None
    return data.date_obj, data.period or "day"


@lru_cache(maxsize=8)
def _relative_parser(base: datetime):
    from dateparser.date import DateDataParser

    return DateDataParser(languages=["en"], settings={
        "RETURN_TIME_AS_PERIOD": True, "PREFER_DATES_FROM": "past", "RELATIVE_BASE": base})


# ---------------------------------------------------------------------------------------------
# the clock: now in the service's zone, and the hemisphere its seasons follow

@lru_cache(maxsize=1)
def _zone_latitudes() -> dict[str, float]:
    """Zone name -> latitude of its principal place, from the tz database's zone1970.tab
    (the tzdata package's copy, else the system's); {} when neither is there."""
    import importlib.resources
    from pathlib import Path

    sources = []
    try:
        sources.append(importlib.resources.files("tzdata").joinpath("zoneinfo/zone1970.tab"))
    except ModuleNotFoundError:
        pass
    sources.append(Path("/usr/share/zoneinfo/zone1970.tab"))
    for source in sources:
        try:
            lines = source.read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        latitudes = {}
        for line in lines:
            parts = line.split("\t")
            if line.startswith("#") or len(parts) < 3:
                continue
            found = re.match(r"([+-])(\d\d)(\d\d)", parts[1])
            if found:
                sign = -1 if found.group(1) == "-" else 1
                latitudes[parts[2]] = sign * (int(found.group(2)) + int(found.group(3)) / 60)
        return latitudes
    return {}


def _clock(now: datetime, tz: str) -> _Clock:
    try:
        zone = ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        zone, tz = timezone.utc, "UTC"
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    latitude = _zone_latitudes().get(tz, 0.0)
    return _Clock(now.astimezone(zone), zone, "south" if latitude < 0 else "north")


# ---------------------------------------------------------------------------------------------
# reading

@dataclass
class _Read:
    start: int  # where the words removed from the text begin (the cue included)
    end: int
    text: str  # the words as written
    field: str
    value: Any
    after: datetime | None = None
    before: datetime | None = None


@lru_cache(maxsize=1)
def _date_trigger() -> re.Pattern:
    words = [*MONTHS, *_other_month_names(), *SEASONS, "yesterday", "today", "last", "this",
             "past", "ago"]
    return re.compile(rf"\d|\b(?:{_month_alternation(words)})\b", re.IGNORECASE)


_DATE_CUE = re.compile(r"\b(in|during|from|of|on|around|circa|ca\.?|since|after|before|until|"
                       r"till|up to)\s+(?:the\s+)?$", re.IGNORECASE)
# a day without a year or a decade counts as a date only after one of these ("on March 3rd",
# "in the 90s"; "80s fashion" is a style, "March 3" may be anything)
_NEEDS_CUE = {"day_no_year": {"on", "from", "since", "until", "till", "before", "after"},
              "decade": {"in", "from", "during", "of", "since", "after", "before", "until"}}


def _date_cue(text: str, start: int) -> re.Match | None:
    return _DATE_CUE.search(text, max(0, start - 16), start)


def _find_dates(text: str, clock: _Clock) -> list[_Read]:
    if not _date_trigger().search(text):  # no digit nor date word: nothing to look for
        return []
    candidates = []
    for order, (pattern, handler) in enumerate(_patterns()):
        for m in pattern.finditer(text):
            candidates.append((m.start(), -(m.end() - m.start()), order, m, handler))
            if len(candidates) > 64:  # a hostile text full of years: read none of the rest
                break
    candidates.sort(key=lambda c: c[:3])
    read: list[_Read] = []
    tried = 0
    for start, _, _, m, handler in candidates:
        end = m.end()
        if any(start < r.end and r.start < end for r in read):
            continue
        if len(read) >= MAX_DATE_PHRASES or tried >= 4 * MAX_DATE_PHRASES:
            break
        cue = _date_cue(text, start)
        cues_needed = _NEEDS_CUE.get(handler.__name__)
        if cues_needed is not None and (cue is None or cue.group(1).casefold() not in cues_needed):
            continue
        tried += 1
        span = handler(clock, m)
        if span is None:
            continue
        after, before = span
        kind = DATE_CUES.get(" ".join(cue.group(1).casefold().rstrip(".").split()), "in") \
            if cue else "in"
        if kind == "since":
            before = None
        elif kind == "after":
            after, before = before, None
        elif kind == "before":
            after, before = None, after
        elif kind == "until":
            after = None
        if after is None and before is None:
            continue
        begin = cue.start() if cue else start
        read.append(_Read(begin, end, text[begin:end], "taken", None, after, before))
    return read


def _combine_dates(read: list[_Read]) -> tuple[datetime | None, datetime | None]:
    """One range for every date phrase: a one-sided bound narrows ("after 2015 ... before
    2018"); whole periods together cover all of them ("2019 and 2020")."""
    if any(r.after is None or r.before is None for r in read):
        afters = [r.after for r in read if r.after is not None]
        befores = [r.before for r in read if r.before is not None]
        return (max(afters) if afters else None), (min(befores) if befores else None)
    return min(r.after for r in read), max(r.before for r in read)


_WORD = re.compile(r"[^\W\d_]+(?:[-'’.][^\W\d_]+)*\.?")


def _find_places(text: str, taken: list[_Read]) -> list[_Read]:
    from core.places import normalize_place_name

    names = _place_names()
    english = _english_place_words()
    words = list(_WORD.finditer(text))
    lowered = [w.group(0).rstrip(".").casefold() for w in words]
    normalized = [normalize_place_name(w.group(0)) for w in words]
    prefixes = _name_prefixes()
    caps_mean_something = any(w.group(0)[0].islower() for w in words)

    def capitalised(i: int) -> bool:
        return caps_mean_something and words[i].group(0)[0].isupper()

    def gap(i: int, j: int) -> str:  # what lies between word i and word j
        return text[words[i].end():words[j].start()]

    def in_date(pos: int) -> bool:
        return any(r.start <= pos < r.end for r in taken)

    read: list[_Read] = []
    fields: set[str] = set()
    i = 0
    while i < len(words) and len(fields) < 3:
        # the longest name starting here: extend while the words begin some name
        found, key, n = None, normalized[i], 1
        while key in prefixes:
            if key in names:
                found = n, key
            if i + n >= len(words) or n >= MAX_PLACE_WORDS or gap(i + n - 1, i + n).strip():
                break
            key, n = f"{key} {normalized[i + n]}", n + 1
        if found is None or in_date(words[i].start()) or found[1] in _date_words():
            i += 1
            continue
        n, key = found
        last = i + n - 1
        start, end = words[i].start(), words[last].end()
        match = names[key][0]
        # the word before: a cue ("in", "trip to", "in the"), a naming word, or a separator
        cue_at = None
        p = i - 1
        if p >= 0 and lowered[p] == "the" and not gap(p, i).strip():
            p -= 1
        if p >= 0 and not gap(p, p + 1).strip():
            if lowered[p] in PLACE_CUES or (lowered[p] == "to" and p > 0 and lowered[p - 1] in MOTION_BEFORE_TO):
                cue_at = p
        if i > 0 and lowered[i - 1] in NAMING_WORDS:
            i += 1
            continue
        # the word after: the end, a separator, a date, a function word or the region or
        # country the place lies in ("Austin texas"); not a word the name would qualify
        # ("Jordan shoes") or the rest of a longer name ("Paris Hilton")
        container = None
        if last + 1 < len(words) and not gap(last, last + 1).strip() \
                and not in_date(words[last + 1].start()) \
                and lowered[last + 1] not in FUNCTION_WORDS:
            container = _container_after(text, words, normalized, last + 1, key)
            if container is None:
                i += 1
                continue
            match = container[0]
        ambiguous = key in english
        if cue_at is not None:
            if ambiguous and not capitalised(i):
                i += 1
                continue
            if not capitalised(i) and match.kind == "city" and match.weight < MIN_LOWERCASE_CITY_WEIGHT:
                i += 1
                continue
        else:
            before = gap(i - 1, i) if i > 0 else ""
            after_sep = last + 1 >= len(words) or bool(gap(last, last + 1).strip()) \
                or in_date(words[last + 1].start())
            separated = i > 0 and ("," in before or (
                not before.strip() and lowered[i - 1] not in FUNCTION_WORDS
                and not capitalised(i - 1)))
            plain_country = match.kind == "country" and not capitalised(i)
            # a word that is also English only in a list after a comma ("Kyoto, Japan")
            listed = ambiguous and capitalised(i) and "," in before
            if (ambiguous and not listed) or not after_sep or not separated \
                    or not (capitalised(i) or plain_country):
                i += 1
                continue
        field = match.kind
        if field in fields:  # "Paris or Rome": one city per filter; the rest stays text
            i += 1
            continue
        fields.add(field)
        begin = words[cue_at].start() if cue_at is not None else start
        read.append(_Read(begin, end, text[begin:end], field, _place_value(match)))
        i = last + 1
        if container is not None:
            outer, outer_end = container[1], words[container[2]].end()
            if outer.kind not in fields:
                fields.add(outer.kind)
                read.append(_Read(words[last + 1].start(), outer_end,
                                  text[words[last + 1].start():outer_end], outer.kind,
                                  _place_value(outer)))
            i = container[2] + 1
    read.extend(_places_before_comma(text, read, taken + read, fields, english))
    return read


@lru_cache(maxsize=1)
def _name_prefixes() -> frozenset[str]:
    """Every name of the table and each of its leading words ("new", "new york", ...)."""
    prefixes = set()
    for name in _place_names():
        words = name.split()
        for n in range(1, min(len(words), MAX_PLACE_WORDS) + 1):
            prefixes.add(" ".join(words[:n]))
    return frozenset(prefixes)


def _place_value(match) -> str:
    return {"country": match.country, "region": match.region, "city": match.city}[match.kind]


def _container_after(text, words, normalized, first: int, key: str):
    """(the place `key` names inside it, the region or country the words from `first` name,
    the index of the last of those words), or None when they name none that holds it."""
    names, prefixes = _place_names(), _name_prefixes()
    candidates, outer_key, n = [], normalized[first], 1
    while outer_key in prefixes:
        if outer_key in names:
            candidates.append((n, outer_key))
        if first + n >= len(words) or n >= MAX_PLACE_WORDS \
                or text[words[first + n - 1].end():words[first + n].start()].strip():
            break
        outer_key, n = f"{outer_key} {normalized[first + n]}", n + 1
    for n, outer_key in reversed(candidates):
        for outer in names[outer_key]:
            if outer.kind == "city" or outer_key in _date_words():
                continue
            for inner in names[key]:
                if inner.kind != outer.kind and inner.kind != "country" and (
                        inner.region == outer.region if outer.kind == "region"
                        else inner.country == outer.country):
                    return inner, outer, first + n - 1
    return None


@lru_cache(maxsize=1)
def _date_words() -> frozenset[str]:
    """Words that are dates before they are places ("in March" is never March, England)."""
    weekdays = "monday tuesday wednesday thursday friday saturday sunday"
    return frozenset([*MONTHS, *_other_month_names(), *SEASONS, *weekdays.split(),
                      "today", "yesterday", "christmas", "easter"])


def _places_before_comma(text, read, taken, fields, english) -> list[_Read]:
    """"Lisbon, Portugal", "Paris, Texas": a name just before a region or country that was
    read, after a comma, is read too when it names a place inside that one."""
    from core.places import normalize_place_name

    names = _place_names()
    found = []
    for outer in list(read):
        if outer.field not in ("country", "region"):
            continue
        head = re.search(r"((?:[^\W\d_][\w'’.-]*[ \t]+){0,3}[^\W\d_][\w'’.-]*)[ \t]*,[ \t]*$",
                         text[max(0, outer.start - 80):outer.start])
        if head is None:
            continue
        offset = max(0, outer.start - 80) + head.start(1)
        words = list(_WORD.finditer(head.group(1)))
        for k in range(len(words)):
            start, end = offset + words[k].start(), offset + words[-1].end()
            key = normalize_place_name(text[start:end])
            inside = [m for m in names.get(key, ()) if m.kind != "country" and m.kind != outer.field
                      and (m.country if outer.field == "country" else m.region) == outer.value]
            if not inside or inside[0].kind in fields or any(
                    start < r.end and r.start < end for r in taken):
                continue
            if key in english and not text[start].isupper():
                continue
            before = text[max(0, start - 20):start].split()
            if before and before[-1].casefold() in NAMING_WORDS:
                continue
            match = inside[0]
            fields.add(match.kind)
            value = match.city if match.kind == "city" else match.region
            found.append(_Read(start, end, text[start:end], match.kind, value))
            break
    return found


_DANGLING = frozenset({"in", "at", "on", "of", "from", "during", "since", "near", "and", "the",
                       "around", "to", "or", "with", "before", "after", "until"})


def _remaining(text: str, spans: list[_Read]) -> str:
    """The text without the words read, and without the commas and cue words they leave at
    either end ("beach in July 2023" -> "beach")."""
    kept, at = [], 0
    for r in sorted(spans, key=lambda r: r.start):
        kept.append(text[at:r.start])
        at = r.end
    kept.append(text[at:])
    rest = " ".join("  ".join(kept).split())
    rest = re.sub(r"\s+([,;.!?])", r"\1", rest)
    rest = re.sub(r"([,;])(?:\s*[,;])+", r"\1", rest)
    words = rest.split()
    while words and (words[-1].strip(",;:-–") == "" or words[-1].strip(",;:").casefold() in _DANGLING):
        words.pop()
    while words and (words[0].strip(",;:-–") == "" or words[0].strip(",;:").casefold()
                     in _DANGLING - {"the"}):
        words.pop(0)
    return " ".join(words).strip(" ,;:-–")


def read_hints(text: str, now: datetime, tz: str = "UTC") -> QueryHints:
    """The dates and places written in `text` as a PhotoFilter, the hints that say which words
    set it, and the rest of the text (see the module doc). `now` is the service's clock (naive:
    UTC); `tz` the zone the dates are meant in (unknown: UTC)."""
    if not text or len(text) > MAX_HINT_TEXT_CHARS:
        return QueryHints(text, PhotoFilter(), [])
    clock = _clock(now, tz)
    dates = _find_dates(text, clock)
    places = _find_places(text, dates)
    hints: list[tuple[int, Hint]] = []
    values: dict[str, Any] = {}
    if dates:
        after, before = _combine_dates(dates)
        if after is not None and before is not None and after >= before:
            dates = []  # contradictory bounds: leave the words to the model
        else:
            words = ", ".join(r.text for r in dates)
            at = min(r.start for r in dates)
            if after is not None and before is not None:
                hints.append((at, Hint("taken", {"after": after.isoformat(),
                                                 "before": before.isoformat()}, words)))
            elif after is not None:
                hints.append((at, Hint("taken_after", after.isoformat(), words)))
            else:
                hints.append((at, Hint("taken_before", before.isoformat(), words)))
            values.update(taken_after=after, taken_before=before)
    for place in places:
        hints.append((place.start, Hint(place.field, place.value, place.text)))
        values[place.field] = place.value
    read = dates + places
    if not read:
        return QueryHints(text, PhotoFilter(), [])
    hints.sort(key=lambda pair: pair[0])
    return QueryHints(_remaining(text, read),
                      PhotoFilter(**{k: v for k, v in values.items() if v is not None}),
                      [hint for _, hint in hints])
