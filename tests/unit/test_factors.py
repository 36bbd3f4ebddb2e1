"""The factors source: partial views that share four factors per pair, and a ceiling
computed as retrieval by what the modalities carry."""

from __future__ import annotations

from itertools import combinations

import numpy as np

from data_pipeline.contract import MODALITIES
from data_pipeline.factors import (
    NUM_FACTORS,
    VIEWS,
    FactorsSpec,
    _r_at_1,
    bin_centre,
    carried_values,
    ceiling,
    make_sample,
    text_bin,
)


def test_views_are_partial_and_complementary():
    for a, b in combinations(MODALITIES, 2):
        shared = set(VIEWS[a]) & set(VIEWS[b])
        assert len(shared) == 4 and set(VIEWS[a]) - shared  # each holds factors the other lacks
    assert set().union(*VIEWS.values()) == set(range(NUM_FACTORS))


def test_r_at_1_matches_brute_force():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((40, 3))
    queries = keys + 0.7 * rng.standard_normal((40, 3))
    hits = 0
    for i in range(40):
        distances = [float(((queries[i] - keys[j]) ** 2).sum()) for j in range(40)]
        best = min(range(40), key=lambda j: (distances[j], j != i))  # ties count against the query
        hits += best == i
    assert _r_at_1(queries, keys) == hits / 40 and 0 < hits < 40


def test_ceiling_is_perfect_without_noise_and_falls_with_it():
    rng = np.random.default_rng(1)
    factors = rng.standard_normal((300, NUM_FACTORS))
    bins = 1000  # fine enough that text says almost all it sees

    def ceiling_at(noise: float) -> dict[str, float]:
        views = {m: factors[:, list(d)] + noise * rng.standard_normal((300, len(d))) for m, d in VIEWS.items()}
        text_bins = np.vectorize(lambda v: text_bin(v, bins))(views["text"])
        return ceiling(carried_values(views, text_bins, bins))

    clean, noisy = ceiling_at(0.0), ceiling_at(0.3)
    assert clean["image->audio"] == 1.0 and clean["mean_R@1"] > 0.99
    assert noisy["mean_R@1"] < clean["mean_R@1"] and noisy["joint:anchor->data"] > noisy["text->image"]


def test_a_sample_says_what_its_views_carry():
    spec = FactorsSpec(num_samples=10)
    sample = make_sample(3, "train", spec, np.random.default_rng(2))
    meta = sample["json"]
    assert set(meta["modalities"]) == set(MODALITIES) and {"png", "txt", "flac"} <= set(sample)
    words = sample["txt"].decode().split()
    assert sorted(words) == sorted(
        f"{name}{b}"
        for name, b in zip(
            [("hue", "light", "xpos", "ypos", "size", "tilt", "pitch", "beat")[f] for f in VIEWS["text"]],
            meta["text_bins"],
        )
    )
    for value, b in zip(meta["views"]["text"], meta["text_bins"]):
        assert text_bin(value, spec.text_bins) == b
        assert abs(bin_centre(b, spec.text_bins) - value) < 2.0
