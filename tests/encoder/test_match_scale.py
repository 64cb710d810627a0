"""The 0-100 match scale: monotonic and bounded for any scores, read back from a card as it was
written, None for a card without one."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from encoder.match_scale import CARD_FIELD, MatchScale

finite = st.floats(-4.0, 4.0, allow_nan=False)
any_float = st.floats(allow_nan=True, allow_infinity=True)


@settings(max_examples=200, deadline=None)
@given(fit=st.lists(finite, min_size=1, max_size=60), probe=st.lists(any_float, max_size=40),
       n_knots=st.integers(2, 40))
# np.interp's rounding put a value just below a knot ~1e-14 above the knot's own level
@example(fit=[0.0, 0.0, 0.0, 1.0, 1.0, 1.0, -0.8984375, -2.877043990575208e-195], probe=[],
         n_knots=18)
def test_match_is_monotonic_and_bounded(fit, probe, n_knots):
    scale = MatchScale.fit(fit, fit, "test", n_knots=n_knots)
    values = np.sort(np.asarray(probe + fit, np.float64))
    finite_values = values[~np.isnan(values)]
    for match in (scale.match(finite_values), scale.match_cosine(finite_values)):
        assert np.all((match >= 0) & (match <= 100))
        assert np.all(np.diff(match) >= 0)  # non-decreasing in the score
    assert np.all(scale.match(values) >= 0) and np.all(scale.match(values) <= 100)  # NaN: 0


def test_match_is_the_share_of_true_pairs_at_or_below():
    rng = np.random.default_rng(0)
    pairs = rng.normal(0.3, 0.1, 5000)
    scale = MatchScale.fit(pairs, pairs - 0.5, "test")
    for q in (0.1, 0.25, 0.5, 0.9):
        x = np.quantile(pairs, q)
        assert scale.match(x) == pytest.approx(100 * q, abs=1.0)
        assert scale.match_cosine(x - 0.5) == pytest.approx(100 * q, abs=1.0)
    assert scale.match(pairs.min() - 1) == 0 and scale.match(pairs.max() + 1) == 100


def test_card_round_trip_and_absent_scale():
    scale = MatchScale.fit([0.1, 0.2, 0.2, 0.4], [0.5, 0.6, 0.7, 0.8], "dev", "cosine", 5)
    card = {"model_id": "m", CARD_FIELD: scale.to_card()}
    back = MatchScale.from_card(card)
    assert back == scale and back.n_pairs == 4
    assert MatchScale.from_card({"model_id": "m"}) is None
    assert MatchScale.from_card(None) is None
    with pytest.raises(ValueError):
        MatchScale.fit([float("nan")], [0.0], "dev")
