"""Offline places: positions to city/region/country, and place names to what they name."""
import math
import subprocess
import sys

import pytest

from core import places
from core.places import NO_PLACE, Place, normalize_place_name, place_names, reverse


def test_import_is_light_and_loads_no_table():
    code = (
        "import sys, core.places as p\n"
        "heavy = [m for m in ('numpy', 'scipy', 'torch', 'PIL', 'pycountry', 'reverse_geocoder')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert p._table is None and p._names is None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_reverse_names_city_region_and_country_in_order_in_one_call():
    found = reverse([(48.8566, 2.3522), (38.7223, -9.1393), (40.7128, -74.0060)])
    assert found[0] == Place("Paris", "Ile-de-France", "France", "FR")
    assert found[1].city == "Lisbon" and found[1].country == "Portugal"
    assert found[1].country_code == "PT"
    assert found[2].region == "New York" and found[2].country == "United States"


def test_reverse_country_names_are_the_common_ones():
    (moscow, seoul) = reverse([(55.7558, 37.6173), (37.5665, 126.9780)])
    assert moscow.country == "Russia" and moscow.country_code == "RU"
    assert seoul.country == "South Korea"


@pytest.mark.parametrize(
    "point",
    [
        (0.0, -150.0),  # the middle of the Pacific: nothing within reach
        (math.nan, 1.0),
        (91.0, 0.0),
        (10.0, 181.0),
        (math.inf, 0.0),
        (None, 2.0),
    ],
)
def test_reverse_gives_no_place_for_open_sea_and_impossible_points(point):
    assert reverse([point, (48.8566, 2.3522)]) == [NO_PLACE, reverse([(48.8566, 2.3522)])[0]]


def test_reverse_of_nothing_loads_nothing():
    assert reverse([]) == []


def test_normalize_folds_case_accents_and_punctuation():
    assert normalize_place_name("Île-de-France") == "ile de france"
    assert normalize_place_name("  SÃO   Paulo ") == "sao paulo"
    assert normalize_place_name("Provence-Alpes-Côte d’Azur") == "provence alpes cote d azur"
    assert normalize_place_name("U.K.") == "u k"


def test_place_names_reads_cities_regions_and_countries():
    names = place_names()
    assert place_names() is names  # built once
    paris = names["paris"]
    assert [m.kind for m in paris] == ["city"] * len(paris)
    assert (paris[0].city, paris[0].country_code) == ("Paris", "FR")  # before Paris, Texas
    assert any(m.country_code == "US" for m in paris)

    norway = names["norway"]
    assert norway[0].kind == "country" and norway[0].country == "Norway"
    assert norway[0].country_code == "NO"
    assert norway[0].city is None and norway[0].region is None

    california = names["california"][0]
    assert (california.kind, california.region, california.country_code) == ("region", "California", "US")
    assert names[normalize_place_name("Île-de-France")][0].region == "Ile-de-France"


def test_place_names_knows_the_names_people_write_for_countries():
    names = place_names()
    for written, code in [
        ("Portugal", "PT"),
        ("Russia", "RU"),
        ("Russian Federation", "RU"),
        ("USA", "US"),
        ("United States", "US"),
        ("UK", "GB"),
        ("Great Britain", "GB"),
        ("South Korea", "KR"),
        ("Turkey", "TR"),
        ("Türkiye", "TR"),
        ("Czech Republic", "CZ"),
    ]:
        first = names[normalize_place_name(written)][0]
        assert (first.kind, first.country_code) == ("country", code), written


def test_place_names_has_no_ordinary_words_that_are_not_places():
    names = place_names()
    assert "july" not in names
    assert "" not in names


def test_reverse_and_place_names_agree_on_names():
    lisbon = reverse([(38.7223, -9.1393)])[0]
    matches = place_names()[normalize_place_name(lisbon.city)]
    assert any(m.kind == "city" and m.country == lisbon.country for m in matches)
    assert places.country_name("pt") == "Portugal"
    assert places.country_name("") is None and places.country_name("ZZ") is None
