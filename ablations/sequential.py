"""Sequential seeds: a group-sequential design for paired contrasts, and the decision at a look.

A contrast gains seeds in rounds; after each round (a *look*) :func:`decide` says, per contrast,
whether its verdict is resolved (``better`` / ``worse`` / ``equivalent``), whether to stop it
as ``undetermined`` because no verdict is within reach by the last look (futility), or whether
to go on. Error rates hold under the repeated looks:

* **Efficacy bounds** (better / worse): Lan-DeMets alpha spending of O'Brien-Fleming type,
  symmetric, two-sided level L = alpha / contrasts (each side spends
  ``2 − 2Φ(z_{1−L/4} / √t)`` by information fraction t = n_k / n_max, so L in all). The bounds
  ``b_k`` solve P(|Z_j| < b_j for j < k, |Z_k| ≥ b_k) = spent(t_k) − spent(t_{k−1}) under
  Δ = 0 by recursive numerical integration of the Brownian motion of the score
  (corr(Z_i, Z_j) = √(t_i / t_j)). The SD is unknown and n small, so each z-bound is mapped to
  the t(n_k − 1) quantile with the same nominal one-sided p; with few seeds per look that
  mapping overshoots L slightly, so the level spent is calibrated to cross with probability L
  under no effect (:func:`calibrated_side_alpha`, Monte Carlo on exact null t sequences).
* **Equivalence bounds**: the same spending at one-sided level L per side (two one-sided tests
  against ±margin, each spending L). A look declares ``equivalent`` when
  Δ̂ ± c_eq·SE lies inside (−margin, +margin).
* **Futility** (non-binding, so it never adds a false verdict): at an interim look, stop as
  ``undetermined`` when the probability of reaching any verdict at the last look, with the
  current estimate taken as the truth, is below ``futility``.

For a true Δ each false verdict is nested in one one-sided crossing of level ≤ L (as for the
fixed design in :mod:`ablations.stats`), so a contrast ends in a false verdict with probability
≤ L over all its looks; ``benchmarks/bench_sequential.py`` measures it. One look is the fixed
design: the t-test at L and the TOST at L, exactly.

    design = Design.plan(margin=0.25, sd=0.5, rounds=5)      # or Design(looks=(8, 16, 24))
    verdicts = decide(design, {"hardmix vs cutmix": diffs}, look_index=1)

Bounds are cached per (information fractions, level): the integration runs once per design.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Hashable, Mapping, Optional, Sequence

import numpy as np
from scipy import optimize, special
from scipy import stats as sps

ALPHA = 0.05
POWER = 0.80
#: Grid points of the numerical integration (per look).
GRID = 401
#: Verdict codes of the vectorised rule, and their names (``continue`` only before the last
#: look).
BETTER, WORSE, EQUIVALENT, UNDETERMINED, CONTINUE = range(5)
NAMES = ("better", "worse", "equivalent", "undetermined", "continue")


# --------------------------------------------------------------------------------------------
# Boundaries
# --------------------------------------------------------------------------------------------


def obf_spent(t: np.ndarray | float, side_alpha: float) -> np.ndarray | float:
    """Lan-DeMets O'Brien-Fleming-type alpha spent on one side by information fraction ``t``
    (``side_alpha`` at t = 1)."""
    z = sps.norm.isf(side_alpha / 2)
    return 2 * sps.norm.sf(z / np.sqrt(t))


def _cross_prob(f: np.ndarray, grid: np.ndarray, w: np.ndarray, dt: float, c: float,
                drift: float = 0.0) -> float:
    """P(next |S| ≥ c, still inside before) from the sub-density ``f`` of S on ``grid``."""
    sd = math.sqrt(dt)
    mu = grid + drift * dt
    return float(np.sum(w * f * (special.ndtr((mu - c) / sd) + special.ndtr((-c - mu) / sd))))


def _grid(c: float) -> tuple[np.ndarray, np.ndarray]:
    grid = np.linspace(-c, c, GRID)
    w = np.full(GRID, grid[1] - grid[0])  # Simpson's weights
    w[1:-1:2] *= 4 / 3
    w[2:-1:2] *= 2 / 3
    w[[0, -1]] *= 1 / 3
    return grid, w


def _propagate(f: np.ndarray, grid: np.ndarray, w: np.ndarray, new: np.ndarray, dt: float,
               drift: float = 0.0) -> np.ndarray:
    sd = math.sqrt(dt)
    z = (new[:, None] - grid[None, :] - drift * dt) / sd
    return np.exp(-0.5 * z * z) @ (w * f) / (sd * math.sqrt(2 * math.pi))


@functools.lru_cache(maxsize=256)
def z_bounds(fractions: tuple[float, ...], side_alpha: float) -> tuple[float, ...]:
    """Symmetric z-bounds b_k of a two-sided group-sequential test that spends ``side_alpha``
    per side by LD-OBF at the information ``fractions`` (increasing, last 1)."""
    t = np.asarray(fractions, dtype=float)
    if t.size == 0 or np.any(np.diff(t) <= 0) or t[0] <= 0 or abs(t[-1] - 1) > 1e-12:
        raise ValueError(f"information fractions must increase to 1: {fractions}")
    spent = obf_spent(t, side_alpha)
    bounds = [float(sps.norm.isf(spent[0]))]
    # Sub-density of S_1 = Z_1 √t_1 inside the continuation region.
    c = bounds[0] * math.sqrt(t[0])
    grid, w = _grid(c)
    f = sps.norm.pdf(grid / math.sqrt(t[0])) / math.sqrt(t[0])
    for k in range(1, t.size):
        dt = t[k] - t[k - 1]
        target = 2 * (spent[k] - spent[k - 1])
        g = lambda b: _cross_prob(f, grid, w, dt, b * math.sqrt(t[k])) - target
        b = float(optimize.brentq(g, 0.0, 40.0, xtol=1e-10))
        bounds.append(b)
        c = b * math.sqrt(t[k])
        new, nw = _grid(c)
        f, grid, w = _propagate(f, grid, w, new, dt), new, nw
    return tuple(bounds)


def crossing_probability(fractions: Sequence[float], bounds: Sequence[float],
                         drift: float = 0.0) -> float:
    """P(|Z_k| ≥ b_k at some look) when Z_k = S(t_k)/√t_k and S is a Brownian motion with
    ``drift`` per unit information (the power of the z-design; its size at drift 0)."""
    t = np.asarray(fractions, dtype=float)
    sd0 = math.sqrt(t[0])
    total = float(sps.norm.sf(bounds[0] - drift * sd0) + sps.norm.cdf(-bounds[0] - drift * sd0))
    grid, w = _grid(bounds[0] * sd0)
    f = sps.norm.pdf((grid - drift * t[0]) / sd0) / sd0
    for k in range(1, t.size):
        dt = t[k] - t[k - 1]
        c = bounds[k] * math.sqrt(t[k])
        total += _cross_prob(f, grid, w, dt, c, drift)
        new, nw = _grid(c)
        f, grid, w = _propagate(f, grid, w, new, dt, drift), new, nw
    return total


def t_bound(z: float, n: int | np.ndarray) -> np.ndarray | float:
    """The t(n − 1) quantile with the nominal one-sided p of the z-bound ``z``."""
    return sps.t.isf(sps.norm.sf(z), np.asarray(n) - 1)


# --------------------------------------------------------------------------------------------
# The design
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Design:
    """A group-sequential design for ``contrasts`` paired contrasts.

    ``looks``: cumulative seeds (pairs) at each look, increasing; the last is the seed budget.
    ``alpha``: the family's two-sided level (each contrast is tested at alpha / contrasts).
    ``margin``: the smallest effect of interest in the metric's units (None: no equivalence
    verdict; a contrast then ends better, worse or undetermined). ``futility``: stop an
    interim look as undetermined when the chance of any verdict by the last look, at the
    current estimate, is below this (0 turns it off). ``calibrate``: spend the level that makes
    the t-mapped bounds cross with probability exactly L under no effect
    (:func:`calibrated_side_alpha`); False: spend L as the z-design does (the t mapping then
    overshoots L slightly, e.g. 0.052 for looks at 5, 10, ..., 30)."""

    looks: tuple[int, ...]
    alpha: float = ALPHA
    margin: Optional[float] = None
    contrasts: int = 1
    futility: float = 0.10
    calibrate: bool = True
    name: str = field(default="group-sequential, LD-OBF spending mapped to t(n-1)")

    def __post_init__(self) -> None:
        looks = tuple(int(n) for n in self.looks)
        object.__setattr__(self, "looks", looks)
        if not looks or looks[0] < 2 or any(b <= a for a, b in zip(looks, looks[1:])):
            raise ValueError(f"looks must be increasing seed counts >= 2: {self.looks}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1): {self.alpha}")
        if self.margin is not None and not self.margin > 0:
            raise ValueError(f"margin must be > 0 (or None): {self.margin}")
        if self.contrasts < 1:
            raise ValueError(f"contrasts must be >= 1: {self.contrasts}")

    @property
    def level(self) -> float:
        """The two-sided level each contrast is tested at."""
        return self.alpha / self.contrasts

    @property
    def fractions(self) -> tuple[float, ...]:
        return tuple(n / self.looks[-1] for n in self.looks)

    @property
    def z_efficacy(self) -> tuple[float, ...]:
        side = (calibrated_side_alpha(self.looks, self.level, True) if self.calibrate
                else self.level / 2)
        return z_bounds(self.fractions, side)

    @property
    def z_equivalence(self) -> tuple[float, ...]:
        side = (calibrated_side_alpha(self.looks, self.level, False) if self.calibrate
                else self.level)
        return z_bounds(self.fractions, side)

    def bounds(self, k: int, n: Optional[int] = None) -> tuple[float, float]:
        """``(c, c_eq)``: the t-bounds of look ``k`` (0-based) with ``n`` pairs (default the
        planned n): Δ̂ ± c·SE is the repeated confidence interval that decides better / worse,
        Δ̂ ± c_eq·SE the one that decides equivalence."""
        n = self.looks[k] if n is None else n
        return float(t_bound(self.z_efficacy[k], n)), float(t_bound(self.z_equivalence[k], n))

    @classmethod
    def plan(cls, margin: float, sd: float, alpha: float = ALPHA, power: float = POWER,
             rounds: int = 5, contrasts: int = 1, futility: float = 0.10) -> "Design":
        """Equally spaced looks whose last is the fixed design's seeds (:func:`fixed_seeds`,
        detecting ``margin`` with ``power`` at the planning ``sd``) times the z-design's
        inflation for ``rounds`` looks, rounded up to a multiple of ``rounds``."""
        level = alpha / contrasts
        n_fixed = fixed_seeds(margin, sd, level, power)
        frac = tuple((i + 1) / rounds for i in range(rounds))
        n_max = math.ceil(n_fixed * inflation(frac, level, power))
        size = max(2, math.ceil(n_max / rounds))
        looks = tuple(size * (i + 1) for i in range(rounds))
        return cls(looks=looks, alpha=alpha, margin=margin, contrasts=contrasts,
                   futility=futility)

    def describe(self) -> str:
        bounds = ", ".join(f"n={n}: |t| ≥ {self.bounds(k)[0]:.2f}" for k, n in
                           enumerate(self.looks))
        eq = ""
        if self.margin:
            eq = (f"; equivalent when Δ̂ ± c_eq·SE lies within ±{self.margin:g} (c_eq: "
                  + ", ".join(f"{self.bounds(k)[1]:.2f}" for k in range(len(self.looks))) + ")")
        fut = (f"; futility: stop as undetermined when P(any verdict by n={self.looks[-1]}) "
               f"< {self.futility:g} at the current estimate" if self.futility else "")
        return (f"{self.name}: {len(self.looks)} looks at {list(self.looks)} seeds, two-sided "
                f"level {self.level:.3g} per contrast ({self.contrasts} contrast"
                f"{'s' if self.contrasts != 1 else ''}, family α = {self.alpha:g}); better / "
                f"worse when {bounds}{eq}{fut}.")


#: Null sequences of the calibration (Monte Carlo SE of the crossing rate at 0.05: 0.0003).
CALIBRATION_SEQUENCES = 400_000


@functools.lru_cache(maxsize=64)
def _null_t(looks: tuple[int, ...], sequences: int = CALIBRATION_SEQUENCES) -> np.ndarray:
    """t statistics at the ``looks`` of ``sequences`` paired differences N(0, 1), shape
    (sequences, K), drawn exactly from their sufficient statistics (no σ: under no effect the
    t process does not depend on it): each round adds a block mean N(0, 1/m) and a within-block
    sum of squares χ²(m − 1); a fixed seed makes the design reproducible."""
    rng = np.random.default_rng(20231)
    out = np.empty((sequences, len(looks)))
    n, mean, ss = 0, np.zeros(sequences), np.zeros(sequences)
    for k, target in enumerate(looks):
        m = target - n
        bm = rng.standard_normal(sequences) / math.sqrt(m)
        bss = rng.chisquare(m - 1, sequences) if m > 1 else np.zeros(sequences)
        tot = n + m
        ss = ss + bss + (n * m / tot) * (mean - bm) ** 2
        mean = (n * mean + m * bm) / tot
        n = tot
        out[:, k] = mean / np.sqrt(ss / (n - 1) / n)
    return out


@functools.lru_cache(maxsize=256)
def calibrated_side_alpha(looks: tuple[int, ...], level: float, two_sided: bool) -> float:
    """The per-side spending whose t-mapped LD-OBF bounds cross with probability ``level``
    under no effect (two-sided: |t_k| ≥ c_k at some look; one-sided: t_k ≥ c_k), by bisection
    on :data:`CALIBRATION_SEQUENCES` exact null t sequences. One look: the t-test itself."""
    side0 = level / 2 if two_sided else level
    if len(looks) == 1:
        return side0
    t = _null_t(tuple(looks))
    stat = np.abs(t) if two_sided else t
    frac = tuple(n / looks[-1] for n in looks)
    ns = np.asarray(looks)

    def rate(side: float) -> float:
        c = t_bound(np.asarray(z_bounds(frac, side)), ns)
        return float(np.mean((stat >= c).any(axis=1)))

    lo, hi = side0 / 2, side0
    if rate(hi) <= level:
        return side0  # the plain mapping already holds the level
    for _ in range(16):  # to 1.5e-5 relative: far below the Monte Carlo error
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rate(mid) <= level else (lo, mid)
    return lo


def fixed_seeds(effect: float, sd: float, level: float = ALPHA, power: float = POWER) -> int:
    """Pairs a one-look paired t-test at two-sided ``level`` needs to detect a true |Δ| =
    ``effect`` with ``power`` at SD ``sd`` (statsmodels ``TTestPower``)."""
    from statsmodels.stats.power import TTestPower

    from ablations.stats import first_n

    n = first_n(lambda n: float(TTestPower().power(effect_size=effect / sd, nobs=n, alpha=level,
                                                   alternative="two-sided")), power,
                high=1_000_000)
    if math.isinf(n):
        raise ValueError(f"no n up to 1,000,000 detects {effect} at SD {sd}")
    return int(n)


@functools.lru_cache(maxsize=64)
def inflation(fractions: tuple[float, ...], level: float, power: float) -> float:
    """n_max / n_fixed of the z-design with these looks for the same ``power`` (≥ 1)."""
    bounds = z_bounds(fractions, level / 2)
    fixed = sps.norm.isf(level / 2) + sps.norm.isf(1 - power)
    drift = optimize.brentq(lambda d: crossing_probability(fractions, bounds, d) - power,
                            0.1, 20.0, xtol=1e-8)
    return float((drift / fixed) ** 2)


# --------------------------------------------------------------------------------------------
# The rule (vectorised) and the decision at a look
# --------------------------------------------------------------------------------------------


def rule(design: Design, k: int, n: int, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """Verdict codes (:data:`BETTER` ... :data:`CONTINUE`) at look ``k`` for contrasts with
    ``n`` pairs, mean difference ``mean`` and SD ``sd`` (arrays of the same shape)."""
    mean, sd = np.asarray(mean, dtype=float), np.asarray(sd, dtype=float)
    last = k == len(design.looks) - 1
    c, ce = design.bounds(k, n)
    se = sd / math.sqrt(n)
    out = np.full(mean.shape, UNDETERMINED if last else CONTINUE, dtype=np.int8)
    m = design.margin
    if m:
        eq = (mean - ce * se > -m) & (mean + ce * se < m)
        out[eq] = EQUIVALENT
    out[mean - c * se > 0] = WORSE
    out[mean + c * se < 0] = BETTER
    if not last and design.futility > 0:
        reach = _reach(design, n, mean, sd)
        out[(out == CONTINUE) & (reach < design.futility)] = UNDETERMINED
    return out


def _reach(design: Design, n: int, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """P(a verdict at the last look) if the true difference were ``mean`` and the SD ``sd``:
    the last look's estimate ~ N(mean, sd²·(N − n)/N²) given the first n."""
    big = design.looks[-1]
    c, ce = design.bounds(len(design.looks) - 1)
    half = c * sd / math.sqrt(big)
    spread = np.maximum(sd * math.sqrt(big - n) / big, 1e-12)
    p_eff = sps.norm.sf((half - mean) / spread) + sps.norm.cdf((-half - mean) / spread)
    if not design.margin:
        return p_eff
    q = np.maximum(design.margin - ce * sd / math.sqrt(big), 0.0)
    inside = lambda lo, hi: np.clip(sps.norm.cdf((hi - mean) / spread)
                                    - sps.norm.cdf((lo - mean) / spread), 0, 1)
    p_eq = inside(-q, q)
    both = np.where(q > half, inside(half, q) + inside(-q, -half), 0.0)
    return p_eff + p_eq - both


@dataclass(frozen=True)
class LookVerdict:
    """One contrast at one look: its verdict (``better``, ``worse``, ``equivalent``,
    ``undetermined`` or ``continue``), whether it stops, n, the mean difference, its SD and the
    two repeated confidence intervals the look read."""

    verdict: str
    stop: bool
    look: int
    n: int
    delta: float
    sd: float
    low: float
    high: float
    eq_low: float
    eq_high: float
    reason: str


def decide(design: Design, diffs_by_contrast: Mapping[Hashable, Sequence[float]],
           look_index: int) -> dict[Hashable, LookVerdict]:
    """The decision at look ``look_index`` (0-based) for each contrast's paired differences
    (variant − reference, one per seed; lower is better). A contrast with fewer pairs than the
    look planned is judged with the planned bound mapped to t(n − 1) of the pairs it has."""
    if not 0 <= look_index < len(design.looks):
        raise ValueError(f"look_index {look_index} outside 0..{len(design.looks) - 1}")
    out: dict[Hashable, LookVerdict] = {}
    last = look_index == len(design.looks) - 1
    for key, values in diffs_by_contrast.items():
        d = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
        n = int(d.size)
        if n < 2:
            out[key] = LookVerdict("undetermined" if last else "continue", last, look_index, n,
                                   float(d.mean()) if n else math.nan, math.nan, math.nan,
                                   math.nan, math.nan, math.nan, f"{n} pair(s): nothing to test")
            continue
        mean, sd = float(d.mean()), float(d.std(ddof=1))
        code = int(rule(design, look_index, n, np.array([mean]), np.array([sd]))[0])
        c, ce = design.bounds(look_index, n)
        se = sd / math.sqrt(n)
        name = NAMES[code]
        reason = {BETTER: f"the interval lies below 0 (|t| ≥ {c:.2f})",
                  WORSE: f"the interval lies above 0 (|t| ≥ {c:.2f})",
                  EQUIVALENT: f"Δ̂ ± {ce:.2f}·SE lies within ±{design.margin:g}",
                  CONTINUE: "no bound crossed: add the next round of seeds",
                  UNDETERMINED: ("seed budget reached without a verdict" if last else
                                 f"futility: P(any verdict by n={design.looks[-1]}) < "
                                 f"{design.futility:g}")}[code]
        out[key] = LookVerdict(name, code != CONTINUE, look_index, n, mean, sd, mean - c * se,
                               mean + c * se, mean - ce * se if design.margin else math.nan,
                               mean + ce * se if design.margin else math.nan, reason)
    return out


def projection(design: Design, look_index: int, mean: float, sd: float) -> dict:
    """Where a contrast still running after look ``look_index`` (0-based) would end if its
    estimate were the truth and nothing else changed: the first later look whose bounds the
    same Δ̂ and SD would cross (``{"look": 1-based, "seeds", "verdict"}``, or look None when
    none would by the last), and ``reach``, the chance of any verdict by the last look
    (:func:`_reach`, as futility reads it). A point projection, not a test: it is what "the
    seeds it would need" means for a design closed before its end."""
    found = {"look": None, "seeds": None, "verdict": None}
    if not (math.isfinite(mean) and math.isfinite(sd)):
        return {**found, "reach": math.nan}
    plain = Design(looks=design.looks, alpha=design.alpha, margin=design.margin,
                   contrasts=design.contrasts, futility=0.0, calibrate=design.calibrate,
                   name=design.name)
    for k in range(look_index + 1, len(design.looks)):
        code = int(rule(plain, k, design.looks[k], np.array([mean]), np.array([sd]))[0])
        if code in (BETTER, WORSE, EQUIVALENT):
            found = {"look": k + 1, "seeds": design.looks[k], "verdict": NAMES[code]}
            break
    reach = float(np.clip(_reach(design, design.looks[look_index], np.array([mean]),
                                 np.array([sd]))[0], 0.0, 1.0))
    return {**found, "reach": reach}


def simulate(design: Design, delta: float, sd: float, sequences: int,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, seeds_used)`` of ``sequences`` simulated contrasts with paired differences
    N(``delta``, ``sd``²), run through :func:`rule` look by look (all sequences at once)."""
    big = design.looks[-1]
    x = rng.normal(delta, sd, size=(sequences, big))
    csum, csq = np.cumsum(x, axis=1), np.cumsum(x * x, axis=1)
    codes = np.full(sequences, CONTINUE, dtype=np.int8)
    used = np.zeros(sequences, dtype=np.int64)
    for k, n in enumerate(design.looks):
        live = codes == CONTINUE
        if not live.any():
            break
        s, q = csum[live, n - 1], csq[live, n - 1]
        mean = s / n
        var = np.maximum(q - n * mean * mean, 0.0) / (n - 1)
        got = rule(design, k, n, mean, np.sqrt(var))
        codes[live] = got
        used[live] = n
    return codes, used
