"""The study protocol's statistics (geomkit.study: matched, compare) on synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geomkit.study.compare import (
    MIN_PAIRS,
    bootstrap_interval,
    compare,
    holm,
    paired_difference,
    select_lr,
    strategy_table,
)
from geomkit.study.matched import match

# -- matched forgetting -------------------------------------------------------------------------

accuracies = st.floats(0.0, 1.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(
    forget=st.lists(accuracies, min_size=1, max_size=12),
    retain=st.lists(accuracies, min_size=12, max_size=12),
    target=accuracies,
)
def test_match_interpolates_at_the_first_crossing_or_censors(forget, retain, target):
    trajectory = [
        (2 * i, {"forget_acc": f, "retain_acc": r})
        for i, (f, r) in enumerate(zip(forget, retain, strict=False))
    ]
    (m,) = match(trajectory, [target])
    below = [i for i, f in enumerate(forget) if f <= target]
    assert m.censored == (not below)
    if m.censored:  # counted with the lowest forget accuracy it reached, no values
        assert m.reached == min(forget)
        assert math.isnan(m.step) and math.isnan(m.values["retain_acc"])
        return
    i = below[0]
    assert m.reached == forget[i]
    if i == 0:
        assert m.step == 0 and m.values["retain_acc"] == retain[0]
        return
    assert m.bracket == (2 * (i - 1), 2 * i)
    assert 2 * (i - 1) < m.step <= 2 * i
    assert m.values["forget_acc"] == target
    low, high = sorted((retain[i - 1], retain[i]))
    assert low - 1e-12 <= m.values["retain_acc"] <= high + 1e-12
    # linear: the same weight moves the step and every metric
    w = (m.step - 2 * (i - 1)) / 2
    assert m.values["retain_acc"] == pytest.approx((1 - w) * retain[i - 1] + w * retain[i])
    assert target == pytest.approx((1 - w) * forget[i - 1] + w * forget[i])


def test_match_rejects_what_it_cannot_read():
    with pytest.raises(ValueError, match="increasing step order"):
        match([(4, {"forget_acc": 1.0}), (2, {"forget_acc": 0.0})])
    with pytest.raises(ValueError, match="finite forget_acc"):
        match([(0, {"forget_acc": math.nan})])
    with pytest.raises(ValueError, match="targets"):
        match([(0, {"forget_acc": 1.0})], [1.5])
    (m,) = match([], [0.1])
    assert m.censored


# -- statistics -----------------------------------------------------------------------------


def test_holm_matches_its_definition():
    p = np.array([0.01, 0.04, 0.03, 0.005, np.nan])
    # sorted: 0.005 x4, 0.01 x3, 0.03 x2, 0.04 x1, made monotone; NaN not counted
    assert holm(p)[:4].tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert math.isnan(holm(p)[4])
    assert holm([0.5, 0.9]).tolist() == [1.0, 1.0]  # monotone: never below a smaller p's


def test_permutation_test_is_exact_for_few_seeds():
    r = paired_difference(np.ones(5) + np.arange(5), np.zeros(5))
    assert r.p == pytest.approx(2 / 2**5)  # only the all-positive and all-negative flips
    r = paired_difference(np.ones(2), np.zeros(2))
    assert r.n == 2 < MIN_PAIRS and math.isnan(r.p) and math.isnan(r.low)
    with pytest.raises(ValueError, match="same length"):
        paired_difference(np.ones(3), np.ones(4))


@pytest.mark.parametrize("n", [5, 10])
def test_bootstrap_interval_covers_at_about_the_nominal_rate(n):
    """Paired differences drawn around a known mean: the share of 95% intervals covering it."""
    rng = np.random.default_rng(n)
    truth, trials = 0.1, 300
    covered = 0
    for trial in range(trials):
        values = truth + rng.normal(0.0, 0.05, n)
        low, high = bootstrap_interval(values, n_resamples=999, seed=trial)
        covered += low <= truth <= high
    rate = covered / trials
    # binomial sd of the rate at 0.95 over 300 trials: 0.0126; 3.5 sd either side
    assert 0.905 <= rate <= 0.995, rate


def _matches(values: dict[tuple[str, float, int], float], censored=()) -> pd.DataFrame:
    rows = []
    for (strategy, lr, seed), value in values.items():
        rows.append(
            {
                "objective": "graddiff",
                "strategy": strategy,
                "lr": lr,
                "seed": seed,
                "target": 0.1,
                "censored": (strategy, lr, seed) in censored,
                "reached": 0.05,
                "retain_acc": value,
                "general_acc": value / 2,
            }
        )
    return pd.DataFrame(rows)


def test_learning_rate_is_chosen_on_the_other_seeds():
    # lr 1e-3 is best on the even-indexed seeds (fold 0), 3e-3 on the odd ones (fold 1):
    # each seed gets the lr that won on the other fold, never its own winner
    values = {}
    for seed in range(4):
        values[("sago", 1e-3, seed)] = 0.9 if seed % 2 == 0 else 0.1
        values[("sago", 3e-3, seed)] = 0.1 if seed % 2 == 0 else 0.9
    chosen = select_lr(_matches(values)).set_index("seed")
    assert chosen.loc[[0, 2], "lr"].tolist() == [3e-3, 3e-3]
    assert chosen.loc[[1, 3], "lr"].tolist() == [1e-3, 1e-3]
    assert chosen.loc[0, "selected_on"] == "1 3"
    # reaching the target first: an lr whose runs are censored loses to one that reaches it
    censored = {("sago", 1e-3, 1), ("sago", 1e-3, 3)}
    chosen = select_lr(_matches(values, censored)).set_index("seed")
    assert chosen.loc[0, "lr"] == 3e-3


def test_comparison_counts_censored_pairs_and_corrects_over_the_table():
    values = {}
    for seed in range(6):
        values[("sum", 1e-3, seed)] = 0.5 + 0.01 * seed
        values[("sago", 1e-3, seed)] = 0.7 + 0.02 * seed
        values[("pcgrad", 1e-3, seed)] = 0.6
    frame = _matches(values, censored={("pcgrad", 1e-3, 0)})
    table = compare(frame, n_resamples=999)
    row = table[(table["a"] == "sum") & (table["b"] == "sago") & (table["metric"] == "retain_acc")]
    row = row.iloc[0]
    assert row["difference"] == pytest.approx(np.mean([-0.2 - 0.01 * s for s in range(6)]))
    assert row["ci_low"] <= row["difference"] <= row["ci_high"] < 0
    assert row["n"] == 6 and row["p"] == pytest.approx(2 / 64)
    pc = table[(table["a"] == "sum") & (table["b"] == "pcgrad")].iloc[0]
    assert pc["n"] == 5 and pc["censored_b"] == 1 and pc["censored_a"] == 0
    for _, rows in table.groupby("metric"):
        assert (rows["p_adjusted"] >= rows["p"]).all()
        assert rows["p_adjusted"].tolist() == pytest.approx(holm(rows["p"]).tolist())
    per_strategy = strategy_table(frame, n_resamples=999).set_index("strategy")
    assert per_strategy.loc["pcgrad", "censored"] == 1
    assert per_strategy.loc["pcgrad", "seeds"] == 6 and per_strategy.loc["pcgrad", "missing"] == 0
    # a run that has not finished is counted as missing, not dropped, not censored
    incomplete = frame[~((frame["strategy"] == "sago") & (frame["seed"] == 2))]
    row = compare(incomplete, n_resamples=999)
    row = row[(row["a"] == "sum") & (row["b"] == "sago")].iloc[0]
    assert row["n"] == 5 and row["missing_b"] == 1 and row["censored_b"] == 0
    assert strategy_table(incomplete).set_index("strategy").loc["sago", "missing"] == 1


def test_duplicated_runs_are_refused_and_lengths_are_selected_too():
    values = {("sago", 1e-3, seed): 0.5 for seed in range(3)}
    frame = _matches(values)
    with pytest.raises(ValueError, match="one row per objective"):
        compare(pd.concat([frame, frame.iloc[:1]]))
    # two run lengths: a (lr, steps) pair is chosen, never two runs of one seed
    long = frame.assign(steps=120, retain_acc=0.9)
    chosen = select_lr(pd.concat([frame.assign(steps=60), long]))
    assert set(chosen["steps"]) == {120} and len(chosen) == 3


def test_the_randomization_test_keeps_its_level_despite_the_selection():
    """Two strategies with the same distribution, a shared seed effect and 4 learning rates:
    the p-value of the whole procedure (selection redone under every sign pattern) rejects at
    about the nominal rate (the plain sign-flip test of the selected differences does not)."""
    rng = np.random.default_rng(0)
    rejections, trials = 0, 120
    for _ in range(trials):
        rows = []
        seed_effect = rng.normal(0, 0.1, 6)
        lr_effect = rng.normal(0, 0.05, 4)
        for strategy in ("a", "b"):
            for j, lr in enumerate((1e-3, 2e-3, 3e-3, 5e-3)):
                for s in range(6):
                    value = 0.5 + seed_effect[s] + lr_effect[j] + rng.normal(0, 0.05)
                    rows.append((strategy, lr, s, value))
        frame = _matches({(a, lr, s): v for a, lr, s, v in rows})
        p = compare(frame, ["retain_acc"], n_resamples=199)["p"].iloc[0]
        rejections += p <= 0.05
    assert rejections / trials <= 0.1, rejections / trials
