"""What a score means to a person: a 0-100 match number, calibrated once per model.

A raw score is hard to read: with hubness correction (encoder/scoring.py) even the best hit
scores below zero, and plain cosines of good matches sit around 0.3. `MatchScale` turns a score
into "match" = 100 x the share of true caption->image pairs of a dev split whose score is at or
below it: 50 is a typical true match, 90 a better one than nine in ten true pairs. It is an
empirical CDF of the positive pairs' scores, kept as a few quantile knots in the model's card
(`match_scale`) and linearly interpolated, so it is monotonic non-decreasing in the score and
bounded to [0, 100] by construction; it does not depend on how many images an index holds.

Two curves are kept: `knots` for the score an index ranks by (`Scoring.scores`: the corrected
score when the model has a query bank) and `cosine_knots` for the plain cosine, which ranks the
embeddings a client sends itself. A model without the card field (open_clip specs, checkpoints
calibrated before) has no scale: `MatchScale.from_card` returns None.

`training/calibrate.py` fits a scale and writes it into a checkpoint's card.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

CARD_FIELD = "match_scale"
DEFAULT_KNOTS = 33  # every 3.125th percentile: finer than a page shows, small in the card


def _knots(values, n: int) -> tuple[float, ...]:
    values = np.asarray(values, np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("a match scale needs at least one finite positive-pair score")
    return tuple(round(float(v), 6) for v in np.quantile(values, np.linspace(0, 1, n)))


@lru_cache(maxsize=64)
def _curve(knots: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The interpolation points of a scale, made once (every search hit reads them)."""
    xs = np.asarray(knots, np.float64)
    levels = np.linspace(0.0, 100.0, len(xs))
    # equal knots (a narrow or tiny fit): keep the highest level of each, "at or below" wins
    xs, last = np.unique(xs[::-1], return_index=True)
    return xs, levels[::-1][last]


def _interpolate(knots: tuple[float, ...], values) -> np.ndarray:
    """100 x the interpolated CDF at each value, clipped to [0, 100]."""
    # plain ufuncs, not np.clip / np.nan_to_num: a search reads ~10 values, where those
    # wrappers' own cost was most of the call's
    xs, levels = _curve(knots)
    values = np.asarray(values, np.float64)
    if len(xs) == 1:
        out = np.where(values >= xs[0], 100.0, 0.0)
    else:
        out = np.interp(values, xs, levels, left=0.0, right=100.0)
        # each value inside its own segment's levels: np.interp's rounding may put a value just
        # below a knot above the knot's own level (by ~1e-14), which would break monotonicity
        seg = np.minimum(np.maximum(np.searchsorted(xs, values, side="right") - 1, 0),
                         len(xs) - 2)
        inside = values >= xs[0]
        out = np.where(inside, np.minimum(np.maximum(out, levels[seg]), levels[seg + 1]), out)
    out = np.where(np.isnan(out), 0.0, out)  # a NaN score (np.interp keeps it) matches nothing
    return np.minimum(np.maximum(out, 0.0), 100.0)


@dataclass(frozen=True)
class MatchScale:
    knots: tuple[float, ...]  # ranking-score quantiles of the positive pairs, 0..100 evenly
    cosine_knots: tuple[float, ...]  # the same for the plain cosine
    fitted_on: str  # what the pairs came from (split, data, model id)
    n_pairs: int
    scoring: str = ""  # Scoring.describe() of the scores the knots are in

    @classmethod
    def fit(cls, scores, cosines, fitted_on: str, scoring: str = "",
            n_knots: int = DEFAULT_KNOTS) -> "MatchScale":
        """From the scores (and cosines) of true caption->image pairs."""
        if n_knots < 2:
            raise ValueError("a match scale needs at least 2 knots")
        return cls(_knots(scores, n_knots), _knots(cosines, n_knots), fitted_on,
                   int(np.isfinite(np.asarray(scores, np.float64)).sum()), scoring)

    def match(self, scores) -> np.ndarray:
        """0-100 match of ranking scores (float64, same shape)."""
        return _interpolate(self.knots, scores)

    def match_cosine(self, cosines) -> np.ndarray:
        """0-100 match of plain cosines (what ranks given embeddings)."""
        return _interpolate(self.cosine_knots, cosines)

    def to_card(self) -> dict:
        return {"knots": list(self.knots), "cosine_knots": list(self.cosine_knots),
                "fitted_on": self.fitted_on, "n_pairs": self.n_pairs, "scoring": self.scoring,
                "meaning": "match = 100 x share of true dev caption->image pairs scoring at or "
                           "below (knots: evenly spaced quantiles, linearly interpolated)"}

    @classmethod
    def from_card(cls, card: dict | None) -> "MatchScale | None":
        """The scale a model card holds, or None when it holds none."""
        field = (card or {}).get(CARD_FIELD)
        if not field:
            return None
        return cls(tuple(float(k) for k in field["knots"]),
                   tuple(float(k) for k in field.get("cosine_knots") or field["knots"]),
                   str(field.get("fitted_on", "")), int(field.get("n_pairs", 0)),
                   str(field.get("scoring", "")))
