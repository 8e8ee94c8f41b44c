"""``gmeta datagen``: a synthetic cold-start dataset with planted structure, streamed to ORC.

Why synthetic: the true click probability of every row is known, so a model's AUC can be read
against the best possible one (the *oracle* columns), and the generator plants exactly the
structure meta-learning exploits: a large per-user deviation that side features cannot explain
but a few support rows reveal.

The world (all fixed by ``--seed``)
  items    latent ``v_i ~ N(0, I_d)``; category = argmax of a fixed projection of ``v_i`` plus
           noise; 1..4 tags drawn by affinity to ``v_i``; price = exp(projection of ``v_i`` + noise).
           Popularity is Zipf(``--zipf``) over a random rank order (warm and new items each form
           their own pool); it drives which items a user is shown and adds a popularity bias.
  users    side features (age bucket, gender, occupation) and an activity level; latent
           ``u = mu + s (A_age + A_gender + A_occ) + dev``: ``mu`` is the population bias, the side
           effects are drawn with per-dimension variance 0.4 / 3 each (``V_side`` = their variance
           across users at ``s = 1``, under the features' frequencies: about 0.22 at seed 0), ``s`` is
           ``--side-strength`` and ``dev ~ N(0, (0.6 + V_side (1 - s^2)) I)`` the individual deviation,
           which takes the variance the side effects lose: u's variance across users is the same
           whatever ``s``, only the share that side features explain changes. Plus a per-user bias
           ``b_u ~ N(0, 1)``. At ``s = 1`` (default regime) the deviation outweighs all side effects
           together, and a user's support click rate alone lifts a side-feature logistic model by
           about 0.05 AUC on new users.
  labels   ``p_click = sigmoid(1.6 u.v/sqrt(d) + b_u + 0.4 pop_i + 0.3 activity + c)``, ``c`` set so
           the base CTR is about 0.28; ``p_conv = sigmoid(1.2 u.(M v)/sqrt(d) - 0.4 price + c2)``
           (about 0.15 of clicks convert); ``conversion = click * Bernoulli(p_conv)``;
           ``rating`` = the click score rescaled around 3 plus noise, rounded and clipped to 1..5.
           Oracle columns ``p_click`` and ``p_ctcvr = p_click * p_conv`` are stored.

Tasks are users. A task holds its support rows first, then ``--query-size`` query rows
(``is_query`` = 1); the support size is drawn in [``--support-min``, ``--support-max``], larger for
more active users. The items of one task are distinct (sampled without replacement by popularity).

Regimes (``--regime``; a flag given explicitly overrides its regime value)
  default   support 10..40, side strength 1: ``gmeta datagen --seed 0`` as it always was.
  few-shot  support 1..20, side strength 0.5 (a quarter of the side effects' variance, the rest
            moved to the deviation): most of what separates users is individual and must be read
            off a handful of support rows, the setting where adaptation has to earn its keep.
            Compare the posterior oracle (below) with the side-only score to see how much a
            perfect adapter could gain at these support sizes.

Splits (ids: users ``[0, U)`` are warm, ``[U, U + 2C)`` are new, ``[U + 2C, U + 2C + V)`` are held
out for val; items ``[0, I)`` are warm, ``[I, I + J)`` are new; new and held-out ids never occur in
``train``, so their embeddings stay untrained)
  train           warm users ``[0, U)``; support and query drawn from warm items.
  user_cold       new users ``[U, U + C)``; support and query from warm items: only the user is new,
                  so adapting on the support set must make up for an untrained user embedding.
  item_cold       the first ``C`` warm users again (same latent, same side features, same ids and
                  task ids as in train), with a fresh draw: support from warm items, query only
                  from new items. Measures how well a model scores items whose ID embeddings were
                  never trained, for users it knows.
  user_item_cold  new users ``[U + C, U + 2C)``; support from warm items, query from new items.
  val             ``--val-users`` V (default ``C // 10``) users ``[U + 2C, U + 2C + V)`` of the training
                  population held out of train, built like user_cold (warm items only): for model
                  selection and early stopping (``gmeta train --validation-split``) without touching
                  the cold test splits. Its ids come after every other user's, and its random
                  streams are its own, so adding it leaves every other split byte-identical.
Task ids are user ids. ``--cold-users 0`` writes no cold split, ``--val-users 0`` no val split.

The per-split summary (``DIR/datagen.json``, printed too) gives rows, mean support rows, CTR, CVR
and, on query rows, for three click scores both the pooled AUC (``*_auc_click``) and GAUC
(``*_gauc_click``: per-user AUC weighted by query rows, users with both classes):
  oracle            the true ``p_click``: the ceiling, it knows each user's latent and bias.
  posterior_oracle  the best any adaptation can reach with that task's support set: the user's
                    deviation and bias (``theta = (dev, b_u)``) are inferred from the task's
                    support rows alone under the true model (true item vectors, popularity and
                    activity terms, offsets) and the true prior given the side features
                    (``theta ~ N(0, diag(dev variance, 1))`` around ``u_side``): the posterior mode
                    by Newton steps batched over users, then the Laplace predictive
                    ``sigmoid(m / sqrt(1 + pi s^2 / 8))`` of each query row (``m``, ``s^2``: the logit's
                    posterior mean and variance). Laplace is an approximation (a few clicks leave
                    the posterior skewed); on seed 0 its AUC and GAUC are within 0.001 of an
                    importance-sampled exact posterior mean in both regimes. On item_cold /
                    user_item_cold it uses the new items' true vectors, which a model has to do
                    without.
  side_only         the same score with the deviation and the bias zeroed (what side features and
                    item knowledge give without any support row).
The gap oracle - side_only is the headroom of per-user adaptation; posterior_oracle - side_only is
the part of it the support sets make reachable. The AUCs are ``gmeta.trainer.evaluation.metrics`` (``auc``;
``per_task_metrics`` + ``summarize`` for GAUC) over all query rows of a split, or over a fixed-seed
uniform sample of whole tasks holding at most ``SUMMARY_SAMPLE_ROWS`` query rows on larger splits
(the posterior is computed only for tasks that can still make the sample), so memory and time
stay bounded.

Streaming: users are generated ``--chunk-users`` at a time, vectorized with numpy, and each chunk
is written before the next is made, so memory does not grow with the row count. Random streams
are keyed by (seed, purpose, block), so the same seed and flags give byte-identical files.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from gmeta.io.fs import join, write_text
from gmeta.io.schema import DenseFeature, Schema, SparseFeature, TableSpec
from gmeta.io.tables import arrow_table
from gmeta.io.writer import TaskWriter
from gmeta.tools.common import (OutputConfig, Progress, add_output_arguments, check_flags, group_arange, prepare_out,
                                run_command)
from gmeta.trainer.evaluation.metrics import auc, per_task_metrics, summarize

# ---- fixed "physics" of the world; flags scale the world, these shape it ----
N_AGE, N_GENDER, N_OCCUPATION = 7, 2, 21
N_CATEGORIES, N_TAGS, MAX_TAGS = 24, 200, 4
AGE_P = np.array([0.05, 0.18, 0.30, 0.20, 0.12, 0.10, 0.05])
GENDER_P = np.array([0.55, 0.45])
POP_BIAS_STD = 0.3          # population-level bias mu, per latent dimension
SIDE_VAR = 0.4              # per-dimension variance the three side-feature effects are drawn with
DEV_VAR = 0.6               # per-dimension variance of the individual deviation
USER_BIAS_STD = 1.0
K_INTERACTION, K_POPULARITY, K_ACTIVITY = 1.6, 0.4, 0.3
K_CONVERSION, K_PRICE = 1.2, 0.4
K_RATING, RATING_NOISE = 0.7, 0.5
TARGET_CTR, TARGET_CVR = 0.28, 0.15
USER_BLOCK = 1024           # users are generated in fixed blocks, independent of --chunk-users
ITEM_BLOCK = 16384          # items per block when scoring tags

POSTERIOR_BLOCK_FLOATS = 1 << 22   # bounds the posterior oracle's work arrays (32 MiB of float64)
SUMMARY_SAMPLE_ROWS = 1 << 19  # query rows per split behind the summary AUCs (a uniform sample past this;
                               # AUC standard error ~1e-3 there; the sample pool holds < 1.25x this many rows)

# stream keys: default_rng([seed, KEY, ...])
_WORLD, _USERS, _ROWS, _CALIBRATION, _SUMMARY = 1, 2, 3, 4, 5

SPLITS = ("train", "user_cold", "item_cold", "user_item_cold", "val")


class DatagenError(ValueError):
    """A bad flag or an impossible request; the message names the flag."""


# named regimes: what --regime sets for the flags left unset (an explicit flag always wins)
REGIMES = {
    "default": {"support_min": 10, "support_max": 40, "side_strength": 1.0},
    "few-shot": {"support_min": 1, "support_max": 20, "side_strength": 0.5},
}
VAL_USERS_DIVISOR = 10   # --val-users default: --cold-users // 10


@dataclass(frozen=True, kw_only=True)
class DatagenConfig(OutputConfig):
    """The flags of ``gmeta datagen``. ``None`` means "the regime's value" (``support_min``,
    ``support_max``, ``side_strength``) or ``--cold-users // 10`` (``val_users``); ``validate()``
    returns the resolved config, which is what every other function expects."""

    seed: int = 0
    regime: str = "default"
    train_users: int = 2500
    cold_users: int = 400
    val_users: int | None = None
    items: int = 1000
    cold_items: int = 250
    support_min: int | None = None
    support_max: int | None = None
    side_strength: float | None = None
    query_size: int = 10
    zipf: float = 1.1
    latent_dim: int = 8
    rows_per_file: int = 1_000_000
    chunk_users: int = 2048

    def resolved(self) -> "DatagenConfig":
        """The regime's values and the val default filled in (unchanged where a flag was given)."""
        if self.regime not in REGIMES:
            raise DatagenError(f"--regime must be one of {tuple(REGIMES)} (got {self.regime!r})")
        fill = {k: v for k, v in REGIMES[self.regime].items() if getattr(self, k) is None}
        if self.val_users is None:
            fill["val_users"] = max(self.cold_users, 0) // VAL_USERS_DIVISOR
        return replace(self, **fill) if fill else self

    def validate(self) -> "DatagenConfig":
        """Check every flag; return the resolved config (see ``resolved``)."""
        cfg = self.resolved()
        task = cfg.support_max + cfg.query_size
        out = cfg.output_checks(task, "--support-max + --query-size")
        check_flags([
            out["--out"],
            (cfg.seed >= 0, "--seed", "must be >= 0", cfg.seed),
            (cfg.train_users >= 1, "--train-users", "must be >= 1", cfg.train_users),
            (cfg.cold_users >= 0, "--cold-users", "must be >= 0", cfg.cold_users),
            (cfg.val_users >= 0, "--val-users", "must be >= 0", cfg.val_users),
            (cfg.support_min >= 1, "--support-min", "must be >= 1", cfg.support_min),
            (cfg.support_max >= cfg.support_min, "--support-max", f"must be >= --support-min ({cfg.support_min})",
             cfg.support_max),
            (math.isfinite(cfg.side_strength) and 0 <= cfg.side_strength <= 1, "--side-strength",
             "must be in [0, 1]", cfg.side_strength),
            (cfg.query_size >= 1, "--query-size", "must be >= 1", cfg.query_size),
            (cfg.items >= task, "--items",
             f"must be >= --support-max + --query-size ({task}): a task's items are distinct", cfg.items),
            (cfg.cold_users == 0 or cfg.cold_items >= cfg.query_size, "--cold-items",
             f"must be >= --query-size ({cfg.query_size}) when --cold-users > 0", cfg.cold_items),
            (cfg.cold_items >= 0, "--cold-items", "must be >= 0", cfg.cold_items),
            (math.isfinite(cfg.zipf) and 0 <= cfg.zipf <= 5, "--zipf", "must be in [0, 5]", cfg.zipf),
            (1 <= cfg.latent_dim <= 256, "--latent-dim", "must be in [1, 256]", cfg.latent_dim),
            out["--rows-per-stripe"],
            (cfg.rows_per_file >= cfg.rows_per_stripe, "--rows-per-file",
             f"must be >= --rows-per-stripe ({cfg.rows_per_stripe})", cfg.rows_per_file),
            out["--compression"],
            (cfg.chunk_users >= 1, "--chunk-users", "must be >= 1", cfg.chunk_users),
        ], DatagenError)
        return cfg


@dataclass(frozen=True)
class SplitSpec:
    name: str
    index: int
    first_user: int
    num_users: int
    query_new_items: bool   # query items come from the new-item pool


def split_specs(cfg: DatagenConfig) -> list:
    """The splits to write, in schema order; ``index`` keys the split's random streams, so adding
    a split never changes another one's rows."""
    cfg = cfg.resolved()
    u, c, v = cfg.train_users, cfg.cold_users, cfg.val_users
    specs = [SplitSpec("train", 0, 0, u, False)]
    if c > 0:
        specs += [SplitSpec("user_cold", 1, u, c, False),
                  SplitSpec("item_cold", 2, 0, min(c, u), True),
                  SplitSpec("user_item_cold", 3, u + c, c, True)]
    if v > 0:
        specs.append(SplitSpec("val", 4, u + 2 * c, v, False))
    return specs


# ----------------------------------------------------------------------------- the world
def _zscore(x: np.ndarray) -> np.ndarray:
    sd = x.std()
    return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)


@dataclass(frozen=True)
class Pool:
    """Items a split draws from: popularity as a CDF (for draws) and as log-weights (exact tails)."""

    cdf: np.ndarray
    logw: np.ndarray


def _zipf_pool(rng, n: int, zipf: float):
    """(Pool, standardized log popularity) of n items whose popularity ranks are a random order."""
    rank = rng.permutation(n).astype(np.float64)
    logw = -zipf * np.log1p(rank)
    cdf = np.cumsum(np.exp(logw - logw.max()))
    return Pool(cdf / cdf[-1], logw), _zscore(logw)


class World:
    """Items, population parameters and calibration constants: everything shared by all users."""

    def __init__(self, cfg: DatagenConfig):
        cfg = self.cfg = cfg.resolved()
        d = cfg.latent_dim
        self.sqrt_d = math.sqrt(d)
        rng = np.random.default_rng([cfg.seed, _WORLD])
        n_items = cfg.items + cfg.cold_items
        self.item_v = rng.standard_normal((n_items, d))
        self.warm, warm_pop = _zipf_pool(rng, cfg.items, cfg.zipf)
        self.cold, cold_pop = _zipf_pool(rng, cfg.cold_items, cfg.zipf) if cfg.cold_items else (None, np.zeros(0))
        self.item_pop = np.concatenate([warm_pop, cold_pop])
        proj = rng.standard_normal((N_CATEGORIES, d))
        self.item_category = np.argmax(
            self.item_v @ proj.T + 0.5 * rng.standard_normal((n_items, N_CATEGORIES)), axis=1
        ).astype(np.int64)
        self.item_tags = self._tags(rng, d)
        price_dir = rng.standard_normal(d)
        log_price = 0.5 * self.item_v @ (price_dir / np.linalg.norm(price_dir)) + 0.25 * rng.standard_normal(n_items)
        self.item_price = np.exp(log_price).astype(np.float32)
        self.item_price_z = _zscore(log_price)
        conv_map = rng.standard_normal((d, d)) / self.sqrt_d
        self.item_w = self.item_v @ conv_map    # the conversion score sees items through another map
        # population: bias mu and side-feature effects; --side-strength s scales the side effects
        # and the deviation takes the variance across users they lose, so u's variance stays put
        self.mu = POP_BIAS_STD * rng.standard_normal(d)
        side_sd = math.sqrt(SIDE_VAR / 3)
        effects = [side_sd * rng.standard_normal((n, d)) for n in (N_AGE, N_GENDER, N_OCCUPATION)]
        occ_w = rng.permutation(np.arange(1, N_OCCUPATION + 1, dtype=np.float64) ** -0.7)
        self.occupation_p = occ_w / occ_w.sum()
        s = cfg.side_strength
        self.side_var = _variance_across_users(effects, (AGE_P, GENDER_P, self.occupation_p))  # at s = 1
        self.dev_var = DEV_VAR + self.side_var * (1.0 - s * s)    # exactly DEV_VAR at s = 1
        self.a_age, self.a_gender, self.a_occupation = (s * a for a in effects)
        self._block = (-1, None)                 # last user block drawn (chunks smaller than a block)
        self.c_click, self.c_conv = 0.0, 0.0     # the calibration scores with zero offsets
        self.c_click, self.c_conv = self._calibrate()

    def _tags(self, rng, d: int) -> np.ndarray:
        """[items, MAX_TAGS] int64, -1 padded: 1..MAX_TAGS tags by affinity to the item latent."""
        tag_vecs = rng.standard_normal((N_TAGS, d))
        n_items = self.item_v.shape[0]
        count = rng.integers(1, MAX_TAGS + 1, n_items)
        out = np.empty((n_items, MAX_TAGS), np.int64)
        for lo in range(0, n_items, ITEM_BLOCK):   # bounded memory for large item counts
            v = self.item_v[lo:lo + ITEM_BLOCK]
            score = 1.5 * v @ tag_vecs.T / self.sqrt_d + rng.gumbel(size=(len(v), N_TAGS))
            top = np.argpartition(-score, MAX_TAGS - 1, axis=1)[:, :MAX_TAGS]
            order = np.argsort(-np.take_along_axis(score, top, 1), axis=1, kind="stable")
            out[lo:lo + ITEM_BLOCK] = np.take_along_axis(top, order, 1)
        out[np.arange(MAX_TAGS)[None, :] >= count[:, None]] = -1
        return out

    # ---- users ----
    def _draw_users(self, rng, n: int) -> dict:
        age = rng.choice(N_AGE, n, p=AGE_P)
        gender = rng.choice(N_GENDER, n, p=GENDER_P)
        occupation = rng.choice(N_OCCUPATION, n, p=self.occupation_p)
        activity = rng.standard_normal(n)
        dev = math.sqrt(self.dev_var) * rng.standard_normal((n, self.cfg.latent_dim))
        bias = USER_BIAS_STD * rng.standard_normal(n)
        u_side = self.mu + self.a_age[age] + self.a_gender[gender] + self.a_occupation[occupation]
        return {"age": age, "gender": gender, "occupation": occupation, "activity": activity,
                "bias": bias, "u_side": u_side, "u": u_side + dev}

    def users(self, first: int, count: int) -> dict:
        """Users ``[first, first + count)``; block-keyed, so a user is the same in every split."""
        lo, hi = first // USER_BLOCK, (first + count - 1) // USER_BLOCK
        blocks = [self._user_block(b) for b in range(lo, hi + 1)]
        start = first - lo * USER_BLOCK
        out = {k: np.concatenate([b[k] for b in blocks])[start:start + count] for k in blocks[0]}
        out["user_id"] = np.arange(first, first + count, dtype=np.int64)
        return out

    def _user_block(self, b: int) -> dict:
        if self._block[0] != b:
            self._block = (b, self._draw_users(np.random.default_rng([self.cfg.seed, _USERS, b]), USER_BLOCK))
        return self._block[1]

    # ---- scores ----
    def click_logit(self, u, bias, activity, item) -> np.ndarray:
        s = np.einsum("ij,ij->i", u, self.item_v[item]) / self.sqrt_d
        return K_INTERACTION * s + bias + K_POPULARITY * self.item_pop[item] + K_ACTIVITY * activity + self.c_click

    def conv_logit(self, u, item) -> np.ndarray:
        s = np.einsum("ij,ij->i", u, self.item_w[item]) / self.sqrt_d
        return K_CONVERSION * s - K_PRICE * self.item_price_z[item] + self.c_conv

    # ---- the posterior oracle ----
    def posterior_features(self, item: np.ndarray) -> np.ndarray:
        """[rows, d + 1]: the click logit is ``side_logit + x . (dev, b_u)`` with these ``x``."""
        x = np.empty((len(item), self.cfg.latent_dim + 1))
        x[:, :-1] = (K_INTERACTION / self.sqrt_d) * self.item_v[item]
        x[:, -1] = 1.0
        return x

    @property
    def prior_var(self) -> np.ndarray:
        """Prior variances of ``(dev, b_u)`` given the side features: the generative ones."""
        return np.r_[np.full(self.cfg.latent_dim, self.dev_var), USER_BIAS_STD ** 2]

    def posterior_click(self, cols: dict) -> np.ndarray:
        """The posterior oracle's click probability of every query row of ``cols`` (whole tasks,
        grouped by task, support rows first): the Laplace predictive of the task's user given only
        its support rows, the true item vectors and the true prior (see ``laplace_posterior``)."""
        tid = cols["task_id"]
        new = np.r_[True, tid[1:] != tid[:-1]] if len(tid) else np.zeros(0, bool)
        g = np.cumsum(new) - 1
        q = cols["is_query"] == 1
        x = self.posterior_features(cols["item_id"])
        off = np.asarray(cols["side_logit"], np.float64)
        n_sup = np.bincount(g[~q], minlength=int(new.sum()))
        k = x.shape[1]
        # users per block: the padded rows and the k x k Hessians stay within POSTERIOR_BLOCK_FLOATS
        block = max(1, POSTERIOR_BLOCK_FLOATS // (k * (k + max(int(n_sup.max(initial=0)), 1))))
        out = []
        for lo in range(0, len(n_sup), block):   # one block at the default sizes
            sup, qry = ~q & (g >= lo) & (g < lo + block), q & (g >= lo) & (g < lo + block)
            theta, hess = laplace_posterior(x[sup], off[sup], cols["click"][sup], n_sup[lo:lo + block],
                                            self.prior_var)
            out.append(laplace_predictive(theta, hess, x[qry], off[qry], g[qry] - lo))
        return np.concatenate(out) if out else np.zeros(0)

    def _calibrate(self):
        """Offsets c, c2 so that the base CTR and the CVR of clicks hit their targets, measured on
        a train-like sample drawn exactly as tasks are (support sizes, distinct items)."""
        rng = np.random.default_rng([self.cfg.seed, _CALIBRATION])
        users = self._draw_users(rng, 4096)
        g, item, _ = task_rows(self, rng, users["activity"], query_new_items=False)
        u = users["u"][g]
        click0 = self.click_logit(u, users["bias"][g], users["activity"][g], item)
        conv0 = self.conv_logit(u, item)
        c = _solve_offset(click0, np.ones(len(item)), TARGET_CTR)
        c2 = _solve_offset(conv0, _sigmoid(click0 + c), TARGET_CVR)
        return c, c2


def _variance_across_users(effects, probs) -> float:
    """Variance across users, averaged over dimensions, of the sum of independent categorical
    effects (``effects[f]`` [categories, d], category frequencies ``probs[f]``)."""
    total = 0.0
    for a, p in zip(effects, probs):
        centered = a - p @ a
        total += float((p @ (centered * centered)).mean())
    return total


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))   # overflow-free


def _solve_offset(logit, weight, target: float) -> float:
    """c such that the weighted mean of sigmoid(logit + c) equals target (bisection)."""
    lo, hi = -30.0, 30.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if np.average(_sigmoid(logit + mid), weights=weight) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------- posterior oracle
def laplace_posterior(x, offset, y, n_rows, prior_var, max_steps: int = 50, tol: float = 1e-10):
    """MAP estimate and Hessian, for every user at once, of a Bayesian logistic regression:
    ``y ~ Bernoulli(sigmoid(offset + x . theta))``, ``theta ~ N(0, diag(prior_var))``.

    ``x`` [R, k], ``offset`` [R], ``y`` [R] (0/1): the rows of all users, grouped by user, user
    ``j`` holding ``n_rows[j]`` of them (0 is allowed: that user keeps the prior). Returns
    ``theta`` [U, k] (the posterior mode) and ``hess`` [U, k, k] (the negative log posterior's
    Hessian there: the Laplace approximation's precision). Newton steps batched over users on a
    padded [U, S, k] layout, with per-user step halving, so every step lowers each user's
    objective (the objective is strictly convex; no loop over users or rows).
    """
    n_rows = np.asarray(n_rows, np.int64)
    n_users, k = len(n_rows), x.shape[1]
    width = max(int(n_rows.max(initial=0)), 1)
    g, slot = np.repeat(np.arange(n_users), n_rows), group_arange(n_rows)
    xs = np.zeros((n_users, width, k))
    off, ys, mask = np.zeros((n_users, width)), np.zeros((n_users, width)), np.zeros((n_users, width))
    xs[g, slot], off[g, slot], ys[g, slot], mask[g, slot] = x, offset, y, 1.0
    prec = 1.0 / np.asarray(prior_var, np.float64)

    def objective(theta):
        eta = off + np.einsum("usk,uk->us", xs, theta)
        nll = mask * (np.logaddexp(0.0, eta) - ys * eta)
        return nll.sum(1) + 0.5 * (theta * theta * prec).sum(1), eta

    def hessian(eta):
        p = _sigmoid(eta)
        w = mask * p * (1.0 - p)
        return np.matmul(xs.transpose(0, 2, 1), xs * w[..., None]) + np.diag(prec), p

    theta = np.zeros((n_users, k))
    f, eta = objective(theta)
    for _ in range(max_steps):
        hess, p = hessian(eta)
        grad = np.einsum("usk,us->uk", xs, mask * (p - ys)) + prec * theta
        step = _cholesky_solve(np.linalg.cholesky(hess), grad)
        t = np.ones(n_users)
        for _ in range(30):                                     # halve where the objective rose
            cand = theta - t[:, None] * step
            f_new, eta_new = objective(cand)
            worse = f_new > f + 1e-12 * np.abs(f)
            if not worse.any():
                break
            t = np.where(worse, 0.5 * t, t)
        theta, f, eta = cand, f_new, eta_new
        if np.abs(t[:, None] * step).max(initial=0.0) < tol:
            break
    return theta, hessian(eta)[0]


def laplace_predictive(theta, hess, x, offset, user) -> np.ndarray:
    """Click probability of rows (``x`` [R, k], ``offset`` [R], ``user`` [R] index into ``theta``)
    under the Laplace posterior N(theta, hess^-1): the logit's mean m and variance s^2 integrated
    through the sigmoid with the probit approximation, ``sigmoid(m / sqrt(1 + pi s^2 / 8))``."""
    user = np.asarray(user, np.int64)
    mean = offset + np.einsum("rk,rk->r", x, theta[user])
    order = np.argsort(user, kind="stable")                  # a user's rows side by side
    counts = np.bincount(user, minlength=len(theta))
    slot = group_arange(counts)
    rhs = np.zeros((len(theta), x.shape[1], max(int(counts.max(initial=0)), 1)))
    rhs[user[order], :, slot] = x[order]                     # [U, k, rows of the user]
    z = _forward_solve(np.linalg.cholesky(hess), rhs)        # s^2 = x' hess^-1 x = |L^-1 x|^2
    var = np.empty(len(user))
    var[order] = np.einsum("ukm,ukm->um", z, z)[user[order], slot]
    return _sigmoid(mean / np.sqrt(1.0 + (math.pi / 8.0) * var))


# Triangular solves written out (loops over k, vectorized over the batch): numpy's batched LAPACK
# solve/inv call threaded OpenBLAS once per tiny matrix and stall on busy machines (Cholesky does not).
def _forward_solve(low: np.ndarray, b: np.ndarray) -> np.ndarray:
    """z with low z = b, batched: low [U, k, k] lower triangular, b [U, k] or [U, k, m]."""
    z = np.zeros_like(b)
    for j in range(low.shape[-1]):
        z[:, j] = (b[:, j] - np.einsum("ui,ui...->u...", low[:, j, :j], z[:, :j])) / _col(low[:, j, j], b)
    return z


def _cholesky_solve(low: np.ndarray, b: np.ndarray) -> np.ndarray:
    """x with (low low') x = b, batched like ``_forward_solve``."""
    z = _forward_solve(low, b)
    x = np.zeros_like(z)
    for j in reversed(range(low.shape[-1])):
        x[:, j] = (z[:, j] - np.einsum("ui,ui...->u...", low[:, j + 1:, j], x[:, j + 1:])) / _col(low[:, j, j], b)
    return x


def _col(diag: np.ndarray, b: np.ndarray) -> np.ndarray:
    return diag if b.ndim == 2 else diag[:, None]


# ----------------------------------------------------------------------------- sampling
def sample_with_replacement(rng, cdf: np.ndarray, n: int) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(cdf) - 1)


def sample_distinct(rng, pool: Pool, need: np.ndarray, rounds: int = 4) -> np.ndarray:
    """For every group g, ``need[g]`` distinct pool indices drawn by popularity without replacement.

    Draws with replacement and keeps each index's first occurrence (the same law as sequential
    sampling without replacement). Groups still short after a few rounds (a thin, skewed tail) are
    finished exactly with Gumbel top-k over the items they do not hold yet. Loops run over rounds
    and blocks, never rows. Returns the indices concatenated by group, in draw order.
    """
    n_groups, n_pool = len(need), len(pool.cdf)
    need = need.astype(np.int64)
    if n_groups and need.max() > n_pool:
        raise DatagenError(f"a task needs {need.max()} distinct items but the pool has {n_pool}")
    group = item = pos = np.zeros(0, np.int64)
    drawn = np.zeros(n_groups, np.int64)
    short, deficit = np.arange(n_groups), need
    for rnd in range(rounds):
        k = (deficit[short] + deficit[short] // 2 + 4) << rnd
        g = np.repeat(short, k)
        group = np.concatenate([group, g])
        item = np.concatenate([item, sample_with_replacement(rng, pool.cdf, int(k.sum()))])
        pos = np.concatenate([pos, drawn[g] + group_arange(k)])
        drawn[short] += k
        group, item, pos = _first_distinct(group, item, pos, need, n_pool)
        deficit = need - np.bincount(group, minlength=n_groups)
        short = np.flatnonzero(deficit > 0)
        if short.size == 0:
            return item
    # exact finish: Gumbel top-k among the items a short group does not hold yet
    block = max(1, (1 << 22) // n_pool)
    for lo in range(0, short.size, block):
        rows = short[lo:lo + block]
        keys = pool.logw[None, :] + rng.gumbel(size=(rows.size, n_pool))
        held = np.isin(group, rows)
        keys[np.searchsorted(rows, group[held]), item[held]] = -np.inf
        kmax = int(deficit[rows].max())
        top = np.argpartition(-keys, kmax - 1, axis=1)[:, :kmax]
        order = np.take_along_axis(top, np.argsort(-np.take_along_axis(keys, top, 1), axis=1, kind="stable"), 1)
        take = np.arange(kmax)[None, :] < deficit[rows][:, None]
        g = np.repeat(rows, deficit[rows])
        group = np.concatenate([group, g])
        item = np.concatenate([item, order[take]])
        pos = np.concatenate([pos, drawn[g] + group_arange(deficit[rows])])
    order = np.lexsort((pos, group))
    return item[order]


def _first_distinct(group, item, pos, need, n_pool: int):
    """Keep each (group, item)'s earliest draw, then each group's first ``need`` in draw order."""
    order = np.argsort(group * (int(pos.max()) + 1) + pos)          # (group, pos) order
    group, item, pos = group[order], item[order], pos[order]
    _, first = np.unique(group * n_pool + item, return_index=True)  # earliest of each pair
    first.sort()
    group, item, pos = group[first], item[first], pos[first]
    rank = group_arange(np.bincount(group, minlength=len(need)))
    keep = rank < need[group]
    return group[keep], item[keep], pos[keep]


# ----------------------------------------------------------------------------- one chunk
def task_rows(world: World, rng, activity: np.ndarray, query_new_items: bool):
    """Which items each user's task holds: (user index per row, item id, is_query), grouped by
    user with support rows first. More active users get larger support sets."""
    cfg = world.cfg
    n_users = len(activity)
    span = cfg.support_max - cfg.support_min + 1
    frac = _sigmoid(1.2 * activity + 0.8 * rng.standard_normal(n_users))
    n_sup = np.minimum(cfg.support_min + (frac * span).astype(np.int64), cfg.support_max)
    n_qry = np.full(n_users, cfg.query_size, np.int64)
    per_user = n_sup + n_qry
    if query_new_items:
        starts = np.cumsum(per_user) - per_user
        item = np.empty(per_user.sum(), np.int64)
        item[np.repeat(starts, n_sup) + group_arange(n_sup)] = sample_distinct(rng, world.warm, n_sup)
        item[np.repeat(starts + n_sup, n_qry) + group_arange(n_qry)] = (
            sample_distinct(rng, world.cold, n_qry) + cfg.items)
    else:
        item = sample_distinct(rng, world.warm, per_user)
    g = np.repeat(np.arange(n_users), per_user)
    is_query = (group_arange(per_user) >= n_sup[g]).astype(np.int8)
    return g, item, is_query


def chunk_columns(world: World, split: SplitSpec, chunk: int, first_user: int, n_users: int) -> dict:
    """All columns (numpy) for users ``[first_user, first_user + n_users)`` of ``split``.

    Rows are grouped by user, support rows first. ``item_tags`` is a [rows, MAX_TAGS] -1-padded
    matrix; everything else is 1-D. Also returns ``side_logit`` (not a dataset column).
    """
    rng = np.random.default_rng([world.cfg.seed, _ROWS, split.index, chunk])
    users = world.users(first_user, n_users)
    g, item, is_query = task_rows(world, rng, users["activity"], split.query_new_items)
    u, bias, act = users["u"][g], users["bias"][g], users["activity"][g]
    click_logit = world.click_logit(u, bias, act, item)
    p_click = _sigmoid(click_logit)
    p_conv = _sigmoid(world.conv_logit(u, item))
    n = len(item)
    click = rng.random(n) < p_click
    conversion = click & (rng.random(n) < p_conv)
    rating = np.clip(np.rint(3.0 + K_RATING * (click_logit - world.c_click)
                             + RATING_NOISE * rng.standard_normal(n)), 1, 5)
    side_logit = world.click_logit(users["u_side"][g], np.zeros(n), act, item)
    f32 = np.float32
    return {
        "task_id": users["user_id"][g],
        "is_query": is_query,
        "click": click.astype(f32),
        "conversion": conversion.astype(f32),
        "rating": rating.astype(f32),
        "user_id": users["user_id"][g],
        "age": users["age"][g].astype(np.int64),
        "gender": users["gender"][g].astype(np.int64),
        "occupation": users["occupation"][g].astype(np.int64),
        "item_id": item,
        "item_category": world.item_category[item],
        "item_tags": world.item_tags[item],
        "item_price": world.item_price[item],
        "user_activity": act.astype(f32),
        "p_click": p_click.astype(f32),
        "p_ctcvr": (p_click * p_conv).astype(f32),
        "side_logit": side_logit,
    }


def iter_split(world: World, split: SplitSpec):
    """Yield the split's column dicts, ``--chunk-users`` users at a time (the streaming path)."""
    step = world.cfg.chunk_users
    for chunk, lo in enumerate(range(0, split.num_users, step)):
        yield chunk_columns(world, split, chunk, split.first_user + lo, min(step, split.num_users - lo))


# ----------------------------------------------------------------------------- schema / arrow
def build_schema(cfg: DatagenConfig):
    cfg = cfg.resolved()
    n_users = cfg.train_users + 2 * cfg.cold_users + cfg.val_users
    return Schema(
        labels=("click", "conversion", "rating"),
        sparse=(SparseFeature("user_id", "user_id", group="user"),
                SparseFeature("age", "age", group="user"),
                SparseFeature("gender", "gender", group="user"),
                SparseFeature("occupation", "occupation", group="user"),
                SparseFeature("item_id", "item_id", group="item"),
                SparseFeature("item_category", "item_category", group="item"),
                SparseFeature("item_tags", "tag", max_len=MAX_TAGS, group="item")),
        dense=(DenseFeature("item_price", "item"), DenseFeature("user_activity", "user")),
        tables=(TableSpec("user_id", n_users), TableSpec("age", N_AGE), TableSpec("gender", N_GENDER),
                TableSpec("occupation", N_OCCUPATION), TableSpec("item_id", cfg.items + cfg.cold_items),
                TableSpec("item_category", N_CATEGORIES), TableSpec("tag", N_TAGS)),
        oracle=("p_click", "p_ctcvr"),
        item_id_feature="item_id",
        splits=tuple(s.name for s in split_specs(cfg)),
        meta={"source": "gmeta datagen", "seed": cfg.seed, "warm_users": cfg.train_users,
              "warm_items": cfg.items},
    ).validate("gmeta datagen schema")


# ----------------------------------------------------------------------------- metrics
class RowSample:
    """A uniform random sample of whole tasks holding at most ``cap`` rows, from a stream of column
    dicts (tasks contiguous, never split over two dicts): every row carries its task's random key
    (``task_keys``) and the sample is the tasks with the smallest keys (bottom-k), so memory stays
    bounded on any split size and per-task metrics (GAUC) see every query row of a sampled task.
    Rows whose key cannot make the cut are dropped on arrival and the pool is trimmed back to
    ``cap`` whenever it grows by a quarter (rarely, once the cut has settled)."""

    def __init__(self, rng: np.random.Generator, cap: int):
        self.rng, self.cap = rng, int(cap)
        self.parts, self.held = [], 0   # (keys, columns) of rows that may still make the sample
        self.cut = np.inf               # tasks with keys >= cut never make it

    def task_keys(self, task_id: np.ndarray) -> np.ndarray:
        """One uniform key per task (one draw per task, in stream order), repeated on its rows."""
        new = np.r_[True, task_id[1:] != task_id[:-1]] if len(task_id) else np.zeros(0, bool)
        return self.rng.random(int(new.sum()))[np.cumsum(new) - 1]

    def add(self, cols: dict, keys: np.ndarray) -> None:
        keep = keys < self.cut
        self.parts.append((keys[keep], {k: v[keep] for k, v in cols.items()}))
        self.held += int(np.count_nonzero(keep))
        if self.held >= self.cap + self.cap // 4 + 1:
            self._trim()

    def _trim(self) -> None:
        if not self.parts:
            return
        keys = np.concatenate([p[0] for p in self.parts])
        if keys.size > self.cap:
            self.cut = np.partition(keys, self.cap)[self.cap]   # the (cap+1)-th smallest row key:
            best = keys < self.cut                               # whole tasks, at most cap rows
        else:
            best = slice(None)
        cols = {k: np.concatenate([p[1][k] for p in self.parts])[best] for k in self.parts[0][1]}  # a column at a time
        keys = keys[best]
        self.parts, self.held = [(keys, cols)], keys.size

    def rows(self) -> dict:
        """The sampled rows (all rows seen, while they are at most ``cap``)."""
        self._trim()
        return self.parts[0][1] if self.parts else {}


# the summary's scores of query rows: name -> (column, is a probability)
SCORES = {"oracle": ("p_click", True), "posterior_oracle": ("posterior_p_click", True),
          "side_only": ("side_logit", False)}


class SplitStats:
    """Per-split counts, accumulated chunk by chunk, and query-row AUCs (``gmeta.trainer.evaluation.metrics``:
    pooled ``auc`` and GAUC from ``per_task_metrics`` / ``summarize``, exact with mid-rank ties) over
    all query rows, or over a uniform sample of whole tasks holding at most ``sample_rows`` of them.

    ``posterior`` (e.g. ``World.posterior_click``) maps a column dict of whole tasks to a click
    probability per query row; it runs only on the tasks that may still make the sample, so its
    cost stays bounded too. Without it the posterior-oracle entries are None.
    """

    def __init__(self, rng: np.random.Generator, sample_rows: int = SUMMARY_SAMPLE_ROWS, posterior=None):
        self.users = self.rows = self.query_rows = 0
        self.clicks = self.conversions = 0.0
        self.rating_sum = 0.0
        self.query = RowSample(rng, sample_rows)
        self.posterior = posterior

    def add(self, cols: dict) -> None:
        q = cols["is_query"] == 1
        self.users += len(np.unique(cols["task_id"]))
        self.rows += len(q)
        self.query_rows += int(q.sum())
        self.clicks += float(cols["click"].sum())
        self.conversions += float(cols["conversion"].sum())
        self.rating_sum += float(cols["rating"].sum())
        keys = self.query.task_keys(cols["task_id"])
        cand = keys < self.query.cut                       # tasks that may still make the sample
        if not cand.all():
            cols, keys, q = {k: v[cand] for k, v in cols.items()}, keys[cand], q[cand]
        scores = {k: cols[k][q] for k in ("task_id", "p_click", "p_ctcvr", "side_logit")}
        if self.posterior is not None:
            scores["posterior_p_click"] = self.posterior(cols)
        self.query.add({**scores, "click": cols["click"][q].astype(np.int8),
                        "conversion": cols["conversion"][q].astype(np.int8)}, keys[q])

    def summary(self) -> dict:
        r = lambda x: round(float(x), 6) if x is not None and math.isfinite(x) else None  # noqa: E731 (JSON has no NaN)
        q = self.query.rows()

        def pooled(score, label):
            return r(auc(q[score], q[label])) if q and score in q else None

        def gauc(score, probability):
            if not q or score not in q:
                return None
            per_task = per_task_metrics(q["task_id"], q[score], q["click"], probabilities=probability)
            return r(summarize(per_task, n_boot=0)["gauc"]["value"])

        out = {"users": self.users, "rows": self.rows, "query_rows": self.query_rows,
               "mean_support_rows": r((self.rows - self.query_rows) / max(self.users, 1)),
               "ctr": r(self.clicks / max(self.rows, 1)),
               "cvr": r(self.conversions / max(self.clicks, 1)),
               "mean_rating": r(self.rating_sum / max(self.rows, 1)),
               "oracle_auc_ctcvr": pooled("p_ctcvr", "conversion")}
        for name, (column, probability) in SCORES.items():
            out[f"{name}_auc_click"] = pooled(column, "click")
            out[f"{name}_gauc_click"] = gauc(column, probability)
        return out


# ----------------------------------------------------------------------------- driver
def generate(cfg: DatagenConfig) -> dict:
    """Write the dataset; return the summary that also goes to ``DIR/datagen.json``."""
    cfg = cfg.validate()
    specs = split_specs(cfg)
    prepare_out(cfg.out, cfg.overwrite, ("schema.json", "datagen.json", *SPLITS), error=DatagenError)
    t0 = time.perf_counter()
    world = World(cfg)
    schema = build_schema(cfg)
    progress = Progress("datagen", cfg.quiet, unit="rows written")
    splits = {}
    for spec in specs:
        stats = SplitStats(np.random.default_rng([cfg.seed, _SUMMARY, spec.index]), posterior=world.posterior_click)
        progress.begin()
        with TaskWriter(cfg.out, schema, split=spec.name, rows_per_stripe=cfg.rows_per_stripe,
                        rows_per_file=cfg.rows_per_file, compression=cfg.compression) as writer:
            for cols in iter_split(world, spec):
                writer.write(arrow_table(schema, cols))
                stats.add(cols)
                progress.tick(spec.name, len(cols["task_id"]))
        progress.tick(spec.name, 0, force=True)
        splits[spec.name] = stats.summary()
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "overwrite", "quiet")}
    summary = {"generator": "gmeta datagen", "settings": settings,
               "offsets": {"c_click": round(world.c_click, 6), "c_conv": round(world.c_conv, 6)},
               "splits": splits}
    # written last: a run that dies midway leaves no schema.json, so no reader mistakes it for data
    write_text(join(cfg.out, "datagen.json"), json.dumps(summary, indent=2, sort_keys=True, allow_nan=False) + "\n")
    schema.save(cfg.out)
    summary["seconds"] = time.perf_counter() - t0
    return summary


def format_summary(summary: dict) -> str:
    st = summary["settings"]
    lines = [f"regime {st['regime']}: support {st['support_min']}..{st['support_max']}, "
             f"side strength {st['side_strength']:g}",
             "query rows: oracle, posterior, side_only = click AUC pooled / GAUC (per user, weighted by rows); "
             "oracle_auc_ctcvr = pooled AUC of the true p_ctcvr on conversions",
             f"{'split':<15} {'users':>7} {'rows':>10} {'support':>7} {'ctr':>6} {'cvr':>6} {'oracle_auc_ctcvr':>16} "
             f"{'oracle':>13} {'posterior':>13} {'side_only':>13}"]
    total = 0
    for name, s in summary["splits"].items():
        total += s["rows"]
        f = {k: float("nan") if v is None else v for k, v in s.items()}
        pair = lambda n: f"{f[n + '_auc_click']:.4f}/{f[n + '_gauc_click']:.4f}"  # noqa: E731
        lines.append(f"{name:<15} {f['users']:>7,} {f['rows']:>10,} {f['mean_support_rows']:>7.1f} "
                     f"{f['ctr']:>6.3f} {f['cvr']:>6.3f} {f['oracle_auc_ctcvr']:>16.4f} "
                     f"{pair('oracle'):>13} {pair('posterior_oracle'):>13} {pair('side_only'):>13}")
    sec = summary.get("seconds", float("nan"))
    lines.append(f"{total:,} rows in {sec:.1f} s ({total / max(sec, 1e-9):,.0f} rows/s)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    d = DatagenConfig(out="")
    regimes = "; ".join(f"{name} = support {v['support_min']}..{v['support_max']}, side strength "
                        f"{v['side_strength']:g}"
                        for name, v in REGIMES.items())
    by_regime = lambda key: ", ".join(f"{REGIMES[n][key]:g} ({n})" for n in REGIMES)  # noqa: E731
    a = parser.add_argument
    a("--out", required=True, help="dataset directory (local path or hdfs://...)")
    a("--seed", type=int, default=d.seed, help="same seed and flags give byte-identical files (default: %(default)s)")
    a("--regime", choices=tuple(REGIMES), default=d.regime,
      help=f"named defaults of --support-min/--support-max/--side-strength ({regimes}); a flag given "
           f"explicitly wins (default: %(default)s)")
    a("--train-users", type=int, default=d.train_users, help="warm users (train tasks) (default: %(default)s)")
    a("--cold-users", type=int, default=d.cold_users,
      help="users in each cold split (user_cold, item_cold, user_item_cold); 0 writes no cold split "
           "(default: %(default)s)")
    a("--val-users", type=int, default=None,
      help="users of the val split: new users from the training population, held out of train, support and "
           f"query from warm items (like user_cold); 0 writes no val split (default: --cold-users // "
           f"{VAL_USERS_DIVISOR}, {d.cold_users // VAL_USERS_DIVISOR} with the default --cold-users)")
    a("--items", type=int, default=d.items, help="warm items (default: %(default)s)")
    a("--cold-items", type=int, default=d.cold_items,
      help="new items, seen only in cold-item queries (default: %(default)s)")
    a("--support-min", type=int, default=None,
      help=f"fewest support rows per task (default: by --regime: {by_regime('support_min')})")
    a("--support-max", type=int, default=None,
      help=f"most support rows per task (default: by --regime: {by_regime('support_max')})")
    a("--side-strength", type=float, default=None,
      help="0..1: scales the side-feature effects on the user latent (A_age, A_gender, A_occ; their variance "
           "by its square), the individual deviation takes the variance they lose, so the latent's total "
           f"variance stays the same; lower = side features explain less (default: by --regime: "
           f"{by_regime('side_strength')})")
    a("--query-size", type=int, default=d.query_size, help="query rows per task (default: %(default)s)")
    a("--zipf", type=float, default=d.zipf,
      help="Zipf exponent of item popularity, 0 = uniform (default: %(default)s)")
    a("--latent-dim", type=int, default=d.latent_dim, help="dimension of the user/item latents (default: %(default)s)")
    a("--rows-per-file", type=int, default=d.rows_per_file, help="rows per ORC file (default: %(default)s)")
    a("--chunk-users", type=int, default=d.chunk_users,
      help="users generated and written per chunk (bounds memory; part of the data's identity) "
           "(default: %(default)s)")
    add_output_arguments(parser, d, quiet_help="no progress or summary output")


def main(args) -> int:
    return run_command("datagen", DatagenConfig, args, generate, DatagenError, format_summary, "datagen.json")
