"""Scoring never depends on how many stamps arrive: every shipped model, every count 0..200.

Regression for issue #10 item 1: a CPU chunk of exactly one stamp crashed the shared-scale
normalisation (an in-place scatter from a view of the same tensor), so N = 1, 65, 129, ...
candidates failed the whole CCD.
"""

from __future__ import annotations

import numpy as np
import pytest

from classifier.infer import WEIGHTS_DIR, Scorer
from classifier.normalize import normalize_stamps
from classifier.synthetic import make_synthetic_set

SHIPPED = sorted(p.stem for p in WEIGHTS_DIR.glob("*.pt"))
N_MAX = 200


@pytest.fixture(scope="module")
def stamps():
    return make_synthetic_set(N_MAX, seed=21).stamps.astype(np.float32)


def test_every_model_is_shipped():
    assert {"triplet", "pair", "pair-direct", "triplet-paper", "pair-paper"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_count_from_0_to_200_scores_like_one_batch(name, stamps):
    scorer = Scorer(name)
    reference = scorer.score(stamps)
    assert reference.shape == (N_MAX,) and np.isfinite(reference).all()
    for n in range(N_MAX + 1):
        got = scorer.score(stamps[:n])
        assert got.shape == (n,)
        np.testing.assert_allclose(got, reference[:n], rtol=0, atol=1e-5, err_msg=f"{name}, N={n}")


@pytest.mark.parametrize("name", SHIPPED)
def test_batch_size_that_does_not_divide_the_count(name, stamps):
    reference = Scorer(name).score(stamps)
    for batch, chunk in ((7, 64), (48, 5), (199, 64)):
        scorer = Scorer(name, batch_size=batch, cpu_chunk=chunk)
        for n in (1, 8, 49, 97, 197, 200):
            np.testing.assert_allclose(scorer.score(stamps[:n]), reference[:n], rtol=0, atol=1e-5,
                                       err_msg=f"{name}, batch {batch}, chunk {chunk}, N={n}")


@pytest.mark.parametrize("scheme", ["shared", "paper"])
@pytest.mark.parametrize("channels", [("template", "search", "difference"), ("template", "search")])
def test_normalisation_of_one_stamp_equals_its_row_in_a_batch(scheme, channels, stamps):
    x = stamps[:5, : len(channels)]
    batch = normalize_stamps(x, scheme, channels)
    for i in range(5):
        np.testing.assert_allclose(normalize_stamps(x[i:i + 1], scheme, channels)[0], batch[i], atol=1e-6)
