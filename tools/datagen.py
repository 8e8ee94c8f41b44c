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
           ``u = mu + A_age + A_gender + A_occ + dev`` where ``mu`` is the population bias and
           ``dev ~ N(0, 0.6 I)`` is the individual deviation (more variance than all side effects
           together, 0.4), plus a per-user bias ``b_u ~ N(0, 1)``. A user's support click rate
           alone lifts a side-feature logistic model by about 0.05 AUC on new users.
  labels   ``p_click = sigmoid(1.6 u.v/sqrt(d) + b_u + 0.4 pop_i + 0.3 activity + c)``, ``c`` set so
           the base CTR is about 0.28; ``p_conv = sigmoid(1.2 u.(M v)/sqrt(d) - 0.4 price + c2)``
           (about 0.15 of clicks convert); ``conversion = click * Bernoulli(p_conv)``;
           ``rating`` = the click score rescaled around 3 plus noise, rounded and clipped to 1..5.
           Oracle columns ``p_click`` and ``p_ctcvr = p_click * p_conv`` are stored.

Tasks are users. A task holds its support rows first, then ``--query-size`` query rows
(``is_query`` = 1); the support size is drawn in [``--support-min``, ``--support-max``], larger for
more active users. The items of one task are distinct (sampled without replacement by popularity).

Splits (ids: users ``[0, U)`` are warm, ``[U, U + 2C)`` are new; items ``[0, I)`` are warm,
``[I, I + J)`` are new; new ids never occur in ``train``, so their embeddings stay untrained)
  train           warm users ``[0, U)``; support and query drawn from warm items.
  user_cold       new users ``[U, U + C)``; support and query from warm items: only the user is new,
                  so adapting on the support set must make up for an untrained user embedding.
  item_cold       the first ``C`` warm users again (same latent, same side features, same ids and
                  task ids as in train), with a fresh draw: support from warm items, query only
                  from new items. Measures how well a model scores items whose ID embeddings were
                  never trained, for users it knows.
  user_item_cold  new users ``[U + C, U + 2C)``; support from warm items, query from new items.
Task ids are user ids. ``--cold-users 0`` writes ``train`` only.
The per-split summary (``DIR/datagen.json``) gives rows, CTR, CVR and, on query rows, the oracle
AUC and a *side-only* AUC: the same score with the individual deviation and bias zeroed. The gap
between the two is the headroom that per-user adaptation can claim. The AUCs are
``gmeta.trainer.metrics.auc`` over all query rows of a split, or over a fixed-seed uniform sample
of ``SUMMARY_SAMPLE_ROWS`` of them on larger splits, so memory stays bounded.

Streaming: users are generated ``--chunk-users`` at a time, vectorized with numpy, and each chunk
is written before the next is made, so memory does not grow with the row count. Random streams
are keyed by (seed, purpose, block), so the same seed and flags give byte-identical files.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from gmeta.io.tables import arrow_table
from gmeta.tools.common import (OutputConfig, add_output_arguments, check_flags, group_arange, prepare_out,
                                run_command)
from gmeta.trainer.metrics import auc

# ---- fixed "physics" of the world; flags scale the world, these shape it ----
N_AGE, N_GENDER, N_OCCUPATION = 7, 2, 21
N_CATEGORIES, N_TAGS, MAX_TAGS = 24, 200, 4
AGE_P = np.array([0.05, 0.18, 0.30, 0.20, 0.12, 0.10, 0.05])
GENDER_P = np.array([0.55, 0.45])
POP_BIAS_STD = 0.3          # population-level bias mu, per latent dimension
SIDE_VAR = 0.4              # total per-dimension variance of the side-feature effects
DEV_VAR = 0.6               # per-dimension variance of the individual deviation
USER_BIAS_STD = 1.0
K_INTERACTION, K_POPULARITY, K_ACTIVITY = 1.6, 0.4, 0.3
K_CONVERSION, K_PRICE = 1.2, 0.4
K_RATING, RATING_NOISE = 0.7, 0.5
TARGET_CTR, TARGET_CVR = 0.28, 0.15
USER_BLOCK = 1024           # users are generated in fixed blocks, independent of --chunk-users
ITEM_BLOCK = 16384          # items per block when scoring tags

SUMMARY_SAMPLE_ROWS = 1 << 19  # query rows per split behind the summary AUCs (a uniform sample past this;
                               # AUC standard error ~1e-3 there; the sample pool holds < 1.25x this many rows)

# stream keys: default_rng([seed, KEY, ...])
_WORLD, _USERS, _ROWS, _CALIBRATION, _SUMMARY = 1, 2, 3, 4, 5

SPLITS = ("train", "user_cold", "item_cold", "user_item_cold")


class DatagenError(ValueError):
    """A bad flag or an impossible request; the message names the flag."""


@dataclass(frozen=True, kw_only=True)
class DatagenConfig(OutputConfig):
    seed: int = 0
    train_users: int = 2500
    cold_users: int = 400
    items: int = 1000
    cold_items: int = 250
    support_min: int = 10
    support_max: int = 40
    query_size: int = 10
    zipf: float = 1.1
    latent_dim: int = 8
    rows_per_file: int = 1_000_000
    chunk_users: int = 2048

    def validate(self) -> "DatagenConfig":
        task = self.support_max + self.query_size
        out = self.output_checks(task, "--support-max + --query-size")
        check_flags([
            out["--out"],
            (self.seed >= 0, "--seed", "must be >= 0", self.seed),
            (self.train_users >= 1, "--train-users", "must be >= 1", self.train_users),
            (self.cold_users >= 0, "--cold-users", "must be >= 0", self.cold_users),
            (self.support_min >= 1, "--support-min", "must be >= 1", self.support_min),
            (self.support_max >= self.support_min, "--support-max", f"must be >= --support-min ({self.support_min})",
             self.support_max),
            (self.query_size >= 1, "--query-size", "must be >= 1", self.query_size),
            (self.items >= task, "--items",
             f"must be >= --support-max + --query-size ({task}): a task's items are distinct", self.items),
            (self.cold_users == 0 or self.cold_items >= self.query_size, "--cold-items",
             f"must be >= --query-size ({self.query_size}) when --cold-users > 0", self.cold_items),
            (self.cold_items >= 0, "--cold-items", "must be >= 0", self.cold_items),
            (math.isfinite(self.zipf) and 0 <= self.zipf <= 5, "--zipf", "must be in [0, 5]", self.zipf),
            (1 <= self.latent_dim <= 256, "--latent-dim", "must be in [1, 256]", self.latent_dim),
            out["--rows-per-stripe"],
            (self.rows_per_file >= self.rows_per_stripe, "--rows-per-file",
             f"must be >= --rows-per-stripe ({self.rows_per_stripe})", self.rows_per_file),
            out["--compression"],
            (self.chunk_users >= 1, "--chunk-users", "must be >= 1", self.chunk_users),
        ], DatagenError)
        return self


@dataclass(frozen=True)
class SplitSpec:
    name: str
    index: int
    first_user: int
    num_users: int
    query_new_items: bool   # query items come from the new-item pool


def split_specs(cfg: DatagenConfig) -> list:
    u, c = cfg.train_users, cfg.cold_users
    specs = [SplitSpec("train", 0, 0, u, False)]
    if c > 0:
        specs += [SplitSpec("user_cold", 1, u, c, False),
                  SplitSpec("item_cold", 2, 0, min(c, u), True),
                  SplitSpec("user_item_cold", 3, u + c, c, True)]
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
        self.cfg = cfg
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
        # population: bias mu and side-feature effects
        self.mu = POP_BIAS_STD * rng.standard_normal(d)
        side_sd = math.sqrt(SIDE_VAR / 3)
        self.a_age = side_sd * rng.standard_normal((N_AGE, d))
        self.a_gender = side_sd * rng.standard_normal((N_GENDER, d))
        self.a_occupation = side_sd * rng.standard_normal((N_OCCUPATION, d))
        occ_w = rng.permutation(np.arange(1, N_OCCUPATION + 1, dtype=np.float64) ** -0.7)
        self.occupation_p = occ_w / occ_w.sum()
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
        dev = math.sqrt(DEV_VAR) * rng.standard_normal((n, self.cfg.latent_dim))
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
    from gmeta.io.schema import DenseFeature, Schema, SparseFeature, TableSpec

    n_users = cfg.train_users + 2 * cfg.cold_users
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
    """A uniform random sample of at most ``cap`` rows of a stream of column dicts: the rows with
    the ``cap`` smallest random keys (bottom-k), so memory stays bounded on any split size. Rows
    whose key cannot make the cut are dropped on arrival and the pool is trimmed back to ``cap``
    whenever it grows by a quarter (rarely, once the cut has settled)."""

    def __init__(self, rng: np.random.Generator, cap: int):
        self.rng, self.cap = rng, int(cap)
        self.parts, self.held = [], 0   # (keys, columns) of rows that may still make the sample
        self.cut = np.inf               # the cap-th smallest key so far: larger keys never make it

    def add(self, cols: dict) -> None:
        keys = self.rng.random(len(next(iter(cols.values()))))
        keep = keys < self.cut
        self.parts.append((keys[keep], {k: v[keep] for k, v in cols.items()}))
        self.held += int(np.count_nonzero(keep))
        if self.held >= self.cap + self.cap // 4 + 1:
            self._trim()

    def _trim(self) -> None:
        if not self.parts:
            return
        keys = np.concatenate([p[0] for p in self.parts])
        best = np.argpartition(keys, self.cap - 1)[:self.cap] if keys.size > self.cap else slice(None)
        cols = {k: np.concatenate([p[1][k] for p in self.parts])[best] for k in self.parts[0][1]}  # a column at a time
        keys = keys[best]
        if keys.size == self.cap:
            self.cut = keys.max()
        self.parts, self.held = [(keys, cols)], keys.size

    def rows(self) -> dict:
        """The sampled rows (all rows seen, while they are at most ``cap``)."""
        self._trim()
        return self.parts[0][1] if self.parts else {}


class SplitStats:
    """Per-split counts, accumulated chunk by chunk, and query-row AUCs (``gmeta.trainer.metrics.auc``,
    exact with mid-rank ties) over all query rows, or a uniform sample of ``sample_rows`` of them."""

    def __init__(self, rng: np.random.Generator, sample_rows: int = SUMMARY_SAMPLE_ROWS):
        self.users = self.rows = self.query_rows = 0
        self.clicks = self.conversions = 0.0
        self.rating_sum = 0.0
        self.query = RowSample(rng, sample_rows)

    def add(self, cols: dict) -> None:
        q = cols["is_query"] == 1
        self.users += len(np.unique(cols["task_id"]))
        self.rows += len(q)
        self.query_rows += int(q.sum())
        self.clicks += float(cols["click"].sum())
        self.conversions += float(cols["conversion"].sum())
        self.rating_sum += float(cols["rating"].sum())
        scores = {k: cols[k][q] for k in ("p_click", "p_ctcvr", "side_logit")}
        self.query.add({**scores, "click": cols["click"][q].astype(np.int8),
                        "conversion": cols["conversion"][q].astype(np.int8)})

    def summary(self) -> dict:
        r = lambda x: round(float(x), 6) if math.isfinite(x) else None  # noqa: E731 (JSON has no NaN)
        q = self.query.rows()
        a = lambda score, label: r(auc(q[score], q[label])) if q else None  # noqa: E731
        return {"users": self.users, "rows": self.rows, "query_rows": self.query_rows,
                "ctr": r(self.clicks / max(self.rows, 1)),
                "cvr": r(self.conversions / max(self.clicks, 1)),
                "mean_rating": r(self.rating_sum / max(self.rows, 1)),
                "oracle_auc_click": a("p_click", "click"), "oracle_auc_ctcvr": a("p_ctcvr", "conversion"),
                "side_only_auc_click": a("side_logit", "click")}


# ----------------------------------------------------------------------------- driver
class _Progress:
    """Rows written and rows/s on stderr, at most every ``every`` seconds."""

    def __init__(self, quiet: bool, every: float = 2.0):
        self.quiet, self.every = quiet, every
        self.t0 = self.last = time.perf_counter()
        self.rows = 0

    def tick(self, split: str, rows: int, force: bool = False) -> None:
        self.rows += rows
        now = time.perf_counter()
        if self.quiet or not (force or now - self.last >= self.every):
            return
        self.last = now
        rate = self.rows / max(now - self.t0, 1e-9)
        print(f"datagen: {split:<15} {self.rows:>12,} rows written  {rate:>12,.0f} rows/s",
              file=sys.stderr, flush=True)


def generate(cfg: DatagenConfig) -> dict:
    """Write the dataset; return the summary that also goes to ``DIR/datagen.json``."""
    from gmeta.io.fs import join, write_text
    from gmeta.io.writer import TaskWriter

    cfg.validate()
    specs = split_specs(cfg)
    prepare_out(cfg.out, cfg.overwrite, ("schema.json", "datagen.json", *SPLITS), error=DatagenError)
    t0 = time.perf_counter()
    world = World(cfg)
    schema = build_schema(cfg)
    progress = _Progress(cfg.quiet)
    splits = {}
    for spec in specs:
        stats = SplitStats(np.random.default_rng([cfg.seed, _SUMMARY, spec.index]))
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
    lines = [f"{'split':<15} {'users':>7} {'rows':>10} {'ctr':>6} {'cvr':>6} "
             f"{'oracle_auc':>10} {'ctcvr_auc':>9} {'side_only':>9}"]
    total = 0
    for name, s in summary["splits"].items():
        total += s["rows"]
        f = {k: float("nan") if v is None else v for k, v in s.items()}
        lines.append(f"{name:<15} {f['users']:>7,} {f['rows']:>10,} {f['ctr']:>6.3f} {f['cvr']:>6.3f} "
                     f"{f['oracle_auc_click']:>10.4f} {f['oracle_auc_ctcvr']:>9.4f} "
                     f"{f['side_only_auc_click']:>9.4f}")
    sec = summary.get("seconds", float("nan"))
    lines.append(f"{total:,} rows in {sec:.1f} s ({total / max(sec, 1e-9):,.0f} rows/s)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    d = DatagenConfig(out="")
    a = parser.add_argument
    a("--out", required=True, help="dataset directory (local path or hdfs://...)")
    a("--seed", type=int, default=d.seed, help="same seed and flags give byte-identical files")
    a("--train-users", type=int, default=d.train_users, help="warm users (train tasks)")
    a("--cold-users", type=int, default=d.cold_users,
      help="users in each cold split (user_cold, item_cold, user_item_cold); 0 writes train only")
    a("--items", type=int, default=d.items, help="warm items")
    a("--cold-items", type=int, default=d.cold_items, help="new items, seen only in cold-item queries")
    a("--support-min", type=int, default=d.support_min, help="fewest support rows per task")
    a("--support-max", type=int, default=d.support_max, help="most support rows per task")
    a("--query-size", type=int, default=d.query_size, help="query rows per task")
    a("--zipf", type=float, default=d.zipf, help="Zipf exponent of item popularity (0 = uniform)")
    a("--latent-dim", type=int, default=d.latent_dim, help="dimension of the user/item latents")
    a("--rows-per-file", type=int, default=d.rows_per_file, help="rows per ORC file")
    a("--chunk-users", type=int, default=d.chunk_users,
      help="users generated and written per chunk (bounds memory; part of the data's identity)")
    add_output_arguments(parser, d, quiet_help="no progress or summary output")


def main(args) -> int:
    return run_command("datagen", DatagenConfig, args, generate, DatagenError, format_summary, "datagen.json")
