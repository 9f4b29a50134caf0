"""Paired comparisons of strategies at matched forgetting, with intervals and corrected tests.

See docs/study.md#statistics.

Within a seed, every strategy sees the same batches (and, with ``--vary``, the same data split
and target model), so strategies are compared by their paired differences across seeds:

* the mean difference with a 95% interval (:func:`mean_interval`: studentized bootstrap from 5
  pairs, Student t below);
* a two-sided randomization test of "a and b are exchangeable within each seed": every sign
  pattern swaps a's and b's runs of the flipped seeds (at every learning rate), and the whole
  procedure, learning-rate selection included, is redone on each (exact up to 10 seeds);
* Holm's step-down correction over the comparisons of one table (:func:`holm`).

The learning rate (and length) of each strategy is chosen without selection bias by
cross-fitting (:func:`select_lr`): the value reported for a seed comes from the setting that did
best on the *other* fold of seeds. Seeds of one fold share a choice, so their values are not
independent; the randomization test accounts for it, the interval does not (docs/study.md).

>>> import numpy as np
>>> from geomkit.study.compare import holm, paired_difference
>>> holm([0.01, 0.04, 0.03])
array([0.03, 0.06, 0.06])
>>> r = paired_difference(np.array([0.6, 0.7, 0.65, 0.8]), np.array([0.4, 0.5, 0.5, 0.55]))
>>> round(r.difference, 4), r.n, r.p
(0.2, 4, 0.125)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from geomkit._validation import check_integer, check_real, invalid

__all__ = [
    "COMPARISON_COLUMNS",
    "MIN_PAIRS",
    "Paired",
    "bootstrap_interval",
    "compare",
    "holm",
    "mean_interval",
    "paired_difference",
    "select_lr",
    "strategy_table",
    "t_interval",
]

MIN_PAIRS = 3
"""Fewest seeds (pairs) for which an interval and a p-value are given: with two, a bootstrap
interval is a mere range of two numbers and a sign-flip test cannot go below p = 0.5."""

COMPARISON_COLUMNS: tuple[str, ...] = (
    "objective",
    "target",
    "metric",
    "a",
    "b",
    "difference",
    "ci_low",
    "ci_high",
    "p",
    "p_adjusted",
    "n",
    "censored_a",
    "censored_b",
    "missing_a",
    "missing_b",
)
"""The columns of ``comparison.csv``: the difference is ``a - b``, averaged over the seeds where
both reached the target (``n``); ``censored_a/b`` count the seeds where one did not,
``missing_a/b`` those whose selected run has not finished (failed or pending)."""

EXACT_PATTERNS = 1024
"""Up to this many sign patterns (10 seeds) the randomization test enumerates them all; beyond,
it draws 1,999 at random (a Monte Carlo p)."""


@dataclass(frozen=True)
class Paired:
    """The mean paired difference, its bootstrap interval, the permutation test's p and n."""

    difference: float
    low: float
    high: float
    p: float
    n: int


def paired_difference(
    a: np.ndarray,
    b: np.ndarray,
    *,
    confidence: float = 0.95,
    n_resamples: int = 9999,
    seed: int = 0,
) -> Paired:
    """Mean of ``a - b`` (paired), with a studentized bootstrap interval and a sign-flip test.

    For differences already paired (no selection involved): :func:`mean_interval` and
    :func:`scipy.stats.permutation_test` (sign flips). With fewer than :data:`MIN_PAIRS` pairs
    the interval and p are NaN.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise invalid("a, b", (a.shape, b.shape), "two 1-d arrays of the same length")
    confidence = check_real("confidence", confidence, 0.0, 1.0, strict=True, strict_high=True)
    n_resamples = check_integer("n_resamples", n_resamples, 1)
    diff = a - b
    n = int(diff.size)
    mean = float(diff.mean()) if n else math.nan
    if n < MIN_PAIRS:
        return Paired(mean, math.nan, math.nan, math.nan, n)
    low, high = mean_interval(diff, confidence, n_resamples, seed)
    test = stats.permutation_test(
        (diff,),
        np.mean,
        permutation_type="samples",
        n_resamples=n_resamples,
        alternative="two-sided",
        random_state=np.random.default_rng(seed),
    )
    return Paired(mean, low, high, float(min(1.0, test.pvalue)), n)


def bootstrap_interval(
    values: np.ndarray, confidence: float = 0.95, n_resamples: int = 9999, seed: int = 0
) -> tuple[float, float]:
    """The studentized (bootstrap-t) interval of the mean of ``values``.

    Each resample's mean is studentized by its own standard error; the interval is
    ``mean - t*_(1-a/2) se, mean - t*_(a/2) se`` (Efron and Tibshirani, *An Introduction to the
    Bootstrap*, 1993, ch. 12). With the handful of seeds a study has, it keeps its nominal
    coverage where the percentile and BCa intervals do not (measured on normal data, 400
    trials: 0.96 and 0.95 at 5 and 10 values, against BCa's 0.86 and 0.90; docs/study.md);
    below 5 values it undercovers (:func:`mean_interval` then uses Student's t).
    :func:`scipy.stats.bootstrap` offers no studentized method, hence this function. NaN for
    fewer than :data:`MIN_PAIRS` values; the value itself when they are all equal.

    >>> bootstrap_interval(np.array([0.5, 0.5, 0.5]))
    (0.5, 0.5)
    >>> low, high = bootstrap_interval(np.array([0.1, 0.3, 0.2, 0.25, 0.15]))
    >>> bool(low < 0.2 < high)
    True
    """
    values = np.asarray(values, dtype=float)
    confidence = check_real("confidence", confidence, 0.0, 1.0, strict=True, strict_high=True)
    n_resamples = check_integer("n_resamples", n_resamples, 1)
    n = values.size
    if n < MIN_PAIRS:
        return math.nan, math.nan
    if np.all(values == values[0]):
        return float(values[0]), float(values[0])
    mean, se = values.mean(), values.std(ddof=1) / math.sqrt(n)
    rng = np.random.default_rng(seed)
    samples = values[rng.integers(0, n, size=(n_resamples, n))]
    ses = samples.std(axis=1, ddof=1) / math.sqrt(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        # a resample of one repeated value has no spread: its t is infinite (kept, not dropped:
        # dropping it shortens the interval; at 3 values it is a ninth of the resamples)
        t = (samples.mean(axis=1) - mean) / ses
    t = t[~np.isnan(t)]
    alpha = 1.0 - confidence
    upper, lower = np.quantile(t, [1 - alpha / 2, alpha / 2])
    return float(mean - upper * se), float(mean - lower * se)


T_BELOW = 5
"""Below this many values :func:`mean_interval` is Student's t interval, not the bootstrap."""


def mean_interval(
    values: np.ndarray, confidence: float = 0.95, n_resamples: int = 9999, seed: int = 0
) -> tuple[float, float]:
    """The interval of the mean of ``values`` a study reports: NaN below :data:`MIN_PAIRS`
    values, Student's t below :data:`T_BELOW` (where the bootstrap undercovers: 0.84 at 3
    normal values), else :func:`bootstrap_interval`.

    >>> low, high = mean_interval(np.array([0.1, 0.3, 0.2]))
    >>> round(low, 4), round(high, 4)
    (-0.0484, 0.4484)
    """
    values = np.asarray(values, dtype=float)
    n = values.size
    if n < MIN_PAIRS or n >= T_BELOW:
        return bootstrap_interval(values, confidence, n_resamples, seed)
    return t_interval(values, confidence)


def t_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Student's t interval of the mean of ``values`` (NaN below 2 values).

    >>> t_interval(np.array([1.0, 1.0]))
    (1.0, 1.0)
    """
    values = np.asarray(values, dtype=float)
    n = values.size
    if n < 2:
        return math.nan, math.nan
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * values.std(ddof=1) / math.sqrt(n)
    return float(values.mean() - half), float(values.mean() + half)


def holm(p: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaN entries stay NaN and are not counted)."""
    p = np.asarray(p, dtype=float)
    adjusted = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m, running = len(order), 0.0
    for rank, index in enumerate(order):
        running = max(running, (m - rank) * p[index])
        adjusted[index] = min(1.0, running)
    return adjusted


SETTING: tuple[str, ...] = ("lr", "steps")
"""What is selected per strategy: a learning rate and a run length."""

_KEYS = ("objective", "strategy", "lr", "steps", "seed", "target")


def _prepare(matches: pd.DataFrame) -> pd.DataFrame:
    """``matches`` with a ``steps`` column; ValueError naming any duplicated run x target."""
    frame = matches.copy()
    if "steps" not in frame.columns:
        frame["steps"] = 0
    duplicated = frame.duplicated(list(_KEYS), keep=False)
    if duplicated.any():
        first = frame.loc[duplicated, list(_KEYS)].iloc[0].to_dict()
        raise invalid(
            "matches",
            f"{int(duplicated.sum())} rows repeating {first}",
            "one row per objective, strategy, lr, steps, seed and target",
        )
    frame["censored"] = frame["censored"].astype(bool)
    return frame


@dataclass
class _Cells:
    """One objective x target x strategy as seeds x settings arrays."""

    present: np.ndarray  # [S, K] a finished run
    reached: np.ndarray  # [S, K] it reached the target
    approach: np.ndarray  # [S, K] its forget accuracy reached (NaN where absent)
    values: dict[str, np.ndarray]  # metric -> [S, K], NaN unless reached


def _cells(
    group: pd.DataFrame, seeds: list[int], settings: list[tuple], metrics: Sequence[str]
) -> _Cells:
    shape = (len(seeds), len(settings))
    row_of, column_of = {s: i for i, s in enumerate(seeds)}, {k: j for j, k in enumerate(settings)}
    present, reached = np.zeros(shape, bool), np.zeros(shape, bool)
    approach = np.full(shape, np.nan)
    values = {m: np.full(shape, np.nan) for m in metrics}
    for record in group.to_dict("records"):
        i, j = row_of[record["seed"]], column_of[tuple(record[k] for k in SETTING)]
        present[i, j], reached[i, j] = True, not record["censored"]
        approach[i, j] = record.get("reached", np.nan)
        if reached[i, j]:
            for m in metrics:
                values[m][i, j] = record.get(m, np.nan)
    return _Cells(present, reached, approach, values)


def _choose(
    cells: _Cells, score: np.ndarray, settings: list[tuple], fold: np.ndarray
) -> np.ndarray:
    """The setting index chosen for every seed, from the seeds of the other folds: the highest
    share of finished runs reaching the target, then the highest mean ``score`` over those,
    then the lowest mean forget accuracy reached, then the smallest lr and length."""
    choice = np.zeros(len(fold), dtype=int)
    lrs = np.array([k[0] for k in settings], dtype=float)
    steps = np.array([k[1] for k in settings], dtype=float)
    for k in np.unique(fold):
        others = fold != k
        if not others.any():  # a single fold: the choice is in-sample
            others = np.ones_like(others)
        finished = cells.present[others].sum(axis=0)
        hits = cells.reached[others].sum(axis=0)
        share = np.where(finished > 0, hits / np.maximum(finished, 1), -np.inf)
        with np.errstate(invalid="ignore"):
            total = np.where(cells.reached[others], score[others], 0.0).sum(axis=0)
            mean = np.where(hits > 0, total / np.maximum(hits, 1), -np.inf)
            near = np.where(cells.present[others], cells.approach[others], 0.0).sum(axis=0)
            near = np.where(finished > 0, near / np.maximum(finished, 1), np.inf)
        mean = np.nan_to_num(mean, nan=-np.inf)
        order = np.lexsort((steps, lrs, near, -mean, -share))
        choice[fold == k] = order[0]
    return choice


def _fold_of(seeds: list[int], folds: int) -> np.ndarray:
    return np.array([i % folds for i in range(len(seeds))])


def _layout(frame: pd.DataFrame) -> tuple[list[int], list[tuple]]:
    seeds = sorted(int(s) for s in frame["seed"].unique())
    settings = sorted({tuple(r) for r in frame[list(SETTING)].itertuples(index=False)})
    return seeds, settings


def select_lr(matches: pd.DataFrame, metric: str = "retain_acc", folds: int = 2) -> pd.DataFrame:
    """The setting (learning rate, length) of each objective x strategy x target x seed, chosen
    on the other seeds.

    Seeds are dealt into ``folds`` folds (in sorted order, alternately); for a seed in fold k
    the setting is the one whose finished runs on the other folds reached the target most often
    (as a share), then had the highest mean ``metric`` there, then came closest to the target,
    then the smallest learning rate and length. With a single seed the choice is made on that
    seed itself (``selected_on`` says so).

    Parameters
    ----------
    matches : DataFrame
        One row per run x target: ``objective, strategy, lr, steps, seed, target, censored,
        reached`` and ``metric`` (``matched.csv``).

    Returns
    -------
    DataFrame
        ``objective, strategy, target, seed, lr, steps, selected_on``.
    """
    folds = check_integer("folds", folds, 2)
    frame = _prepare(matches)
    if metric not in frame.columns:
        raise invalid("metric", metric, f"a column of matches ({', '.join(frame.columns)})")
    rows = []
    for (objective, target), group in frame.groupby(["objective", "target"], sort=False):
        seeds, settings = _layout(group)
        fold = _fold_of(seeds, folds)
        for strategy, own in group.groupby("strategy", sort=False):
            cells = _cells(own, seeds, settings, [metric])
            choice = _choose(cells, cells.values[metric], settings, fold)
            for i, seed in enumerate(seeds):
                others = [s for s, f in zip(seeds, fold, strict=True) if f != fold[i]] or [seed]
                lr, steps = settings[choice[i]]
                rows.append(
                    {
                        "objective": objective,
                        "strategy": strategy,
                        "target": target,
                        "seed": seed,
                        "lr": lr,
                        "steps": steps,
                        "selected_on": " ".join(str(s) for s in others),
                    }
                )
    columns = ["objective", "strategy", "target", "seed", "lr", "steps", "selected_on"]
    return pd.DataFrame(rows, columns=columns)


def _pick(cells: _Cells, choice: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """Per seed at its chosen setting: finished, reached, and each metric's value."""
    rows = np.arange(len(choice))
    values = {m: v[rows, choice] for m, v in cells.values.items()}
    return cells.present[rows, choice], cells.reached[rows, choice], values


def _patterns(n: int, rng: np.random.Generator) -> np.ndarray:
    """Sign patterns (True: swap a and b at that seed); the identity first."""
    if 2**n <= EXACT_PATTERNS:
        grid = (np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1
        return grid.astype(bool)
    drawn = rng.random((1999, n)) < 0.5
    return np.vstack([np.zeros((1, n), bool), drawn])


def _swap(a: _Cells, b: _Cells, flip: np.ndarray) -> tuple[_Cells, _Cells]:
    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.where(flip[:, None], y, x)

    def cells(x: _Cells, y: _Cells) -> _Cells:
        return _Cells(
            mix(x.present, y.present),
            mix(x.reached, y.reached),
            mix(x.approach, y.approach),
            {m: mix(x.values[m], y.values[m]) for m in x.values},
        )

    return cells(a, b), cells(b, a)


def compare(
    matches: pd.DataFrame,
    metrics: Sequence[str] = ("retain_acc", "general_acc"),
    *,
    select_on: str = "retain_acc",
    folds: int = 2,
    n_resamples: int = 9999,
    seed: int = 0,
) -> pd.DataFrame:
    """Every pair of strategies, per objective, target and metric, at cross-fitted settings.

    The p-value is that of a randomization test of the whole procedure (module docstring);
    Holm's correction runs over the rows of one objective and metric (its pairs x targets).
    Returns a DataFrame with :data:`COMPARISON_COLUMNS`.
    """
    folds = check_integer("folds", folds, 2)
    frame = _prepare(matches)
    wanted = list(metrics)
    needed = list(dict.fromkeys([select_on, *wanted]))
    for metric in needed:
        if metric not in frame.columns:
            raise invalid("metrics", metric, f"columns of matches ({', '.join(frame.columns)})")
    rng = np.random.default_rng(seed)
    rows = []
    for (objective, target), group in frame.groupby(["objective", "target"], sort=False):
        seeds, settings = _layout(group)
        fold = _fold_of(seeds, folds)
        by_strategy = {
            s: _cells(own, seeds, settings, needed)
            for s, own in group.groupby("strategy", sort=False)
        }
        patterns = _patterns(len(seeds), rng)
        for a, b in itertools.combinations(by_strategy, 2):
            statistics = {m: np.full(len(patterns), np.nan) for m in wanted}
            observed = None
            for index, flip in enumerate(patterns):
                left, right = _swap(by_strategy[a], by_strategy[b], flip)
                pick_a = _pick(left, _choose(left, left.values[select_on], settings, fold))
                pick_b = _pick(right, _choose(right, right.values[select_on], settings, fold))
                both = pick_a[1] & pick_b[1]
                if index == 0:
                    observed = (pick_a, pick_b, both)
                if both.sum() >= MIN_PAIRS:
                    for m in wanted:
                        statistics[m][index] = np.mean(pick_a[2][m][both] - pick_b[2][m][both])
            pick_a, pick_b, both = observed
            for metric in wanted:
                diff = pick_a[2][metric][both] - pick_b[2][metric][both]
                t = statistics[metric]
                p = math.nan
                if not np.isnan(t[0]):
                    p = float(np.mean(np.abs(np.nan_to_num(t, nan=0.0)) >= abs(t[0]) - 1e-12))
                low, high = mean_interval(diff, n_resamples=n_resamples)
                rows.append(
                    {
                        "objective": objective,
                        "target": target,
                        "metric": metric,
                        "a": a,
                        "b": b,
                        "difference": float(diff.mean()) if diff.size else math.nan,
                        "ci_low": low,
                        "ci_high": high,
                        "p": p,
                        "n": int(both.sum()),
                        "censored_a": int((pick_a[0] & ~pick_a[1]).sum()),
                        "censored_b": int((pick_b[0] & ~pick_b[1]).sum()),
                        "missing_a": int((~pick_a[0]).sum()),
                        "missing_b": int((~pick_b[0]).sum()),
                    }
                )
    table = pd.DataFrame(rows, columns=[c for c in COMPARISON_COLUMNS if c != "p_adjusted"])
    table.insert(COMPARISON_COLUMNS.index("p_adjusted"), "p_adjusted", np.nan)
    for _, index in table.groupby(["objective", "metric"], sort=False).groups.items():
        table.loc[index, "p_adjusted"] = holm(table.loc[index, "p"].to_numpy(float))
    return table


def strategy_table(
    matches: pd.DataFrame,
    metrics: Sequence[str] = ("retain_acc", "general_acc"),
    *,
    select_on: str = "retain_acc",
    folds: int = 2,
    n_resamples: int = 9999,
) -> pd.DataFrame:
    """Per objective x target x strategy at cross-fitted settings: the seeds, how many runs
    were censored or missing (not finished), the forget accuracy actually reached and each
    metric's mean with its 95% interval (:func:`mean_interval`, over the runs that reached the
    target)."""
    frame = _prepare(matches)
    selection = select_lr(frame, select_on, folds)
    keys = ["objective", "strategy", "target", "seed", "lr", "steps"]
    chosen = selection.merge(frame, on=keys, how="left")  # a missing run stays, as NaN
    rows = []
    for (objective, target, strategy), group in chosen.groupby(
        ["objective", "target", "strategy"], sort=False
    ):
        finished = group[group["censored"].notna()]
        reached = finished[~finished["censored"].astype(bool)]
        settings = sorted({(lr, n) for lr, n in zip(group["lr"], group["steps"], strict=True)})
        row = {
            "objective": objective,
            "target": target,
            "strategy": strategy,
            "lr": " ".join(f"{lr:g}" for lr in sorted({k[0] for k in settings})),
            "steps": " ".join(str(int(n)) for n in sorted({k[1] for k in settings})),
            "seeds": len(group),
            "censored": len(finished) - len(reached),
            "missing": len(group) - len(finished),
            "reached": float(reached["reached"].mean()) if len(reached) else math.nan,
        }
        for metric in metrics:
            values = reached[metric].to_numpy(float)
            low, high = mean_interval(values, n_resamples=n_resamples)
            row[metric] = float(values.mean()) if len(values) else math.nan
            row[f"{metric}_low"], row[f"{metric}_high"] = low, high
        rows.append(row)
    return pd.DataFrame(rows)
