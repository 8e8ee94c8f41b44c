"""MovieLens-100K / -1M / latest -> Meta-IO cold-start tasks (MeLU protocol).

Layouts (detected from the files present in ``--src``; 100K and 1M text is latin-1, latest UTF-8):
  100K  ``u.data`` (user \\t item \\t rating \\t ts), ``u.user`` (id|age|gender|occupation|zip),
        ``u.item`` (id|title|release date|video date|url|19 genre flags)
  1M    ``ratings.dat`` (UserID::MovieID::Rating::Timestamp), ``users.dat``
        (UserID::Gender::Age::Occupation::Zip), ``movies.dat`` (MovieID::Title (Year)::G1|G2)
  latest  ``ratings.csv`` (userId,movieId,rating,timestamp; half stars 0.5..5), ``movies.csv``
        (movieId,title,genres; quoted CSV); no user file: a user is an id and a history

Features: ``user_id``, ``age`` (the 1M age groups; 100K ages are bucketed the same way),
``gender``, ``occupation`` (100K names -> ids in sorted order; 1M codes as given), ``zip`` (first
character of the zip code, vocabulary-mapped), ``item_id``, ``genres`` (list), ``year`` (release
decade: 0 unknown, 1 before 1940, 2 the 1940s, ..., 7 the 1990s, 8 2000 and later). The latest
layout has no demographics: its user features are ``user_id`` alone, and its genre vocabulary
is the file's own (sorted names; "(no genres listed)" is no genre). Labels: ``rating`` (float)
and ``click`` = rating >= 4. There is no conversion label.

Implicit protocol (``--negatives N``, N > 0): every rated item is a positive (``click`` 1) and
each task gets label-0 rows for items its user never rated, drawn uniformly (seeded) from the
items of the task's temperature (warm items for train, val and user_cold; cold items for the
cold-item splits): N in the query set and ``--support-negatives`` x the support positives in the
support set, each negative placed right after a positive so any prefix of the support set is
balanced. The label is then ``click`` only (a sampled row has no rating).

Protocol. Users with ``--min-ratings``..``--max-ratings`` ratings (13..100, as MeLU) are kept.
Warm and cold are decided by time, so the cold side is what arrives last:
  cold users  the ``--cold-user-frac`` of kept users whose FIRST rating is latest
              (``--cold-users time``), or a seeded uniform draw of them (``--cold-users random``);
  cold items  the ``--cold-item-frac`` of catalogue items released latest (100K: release date,
              1M and latest: year; ties go to the item first rated later).
  val users   a ``--val-fraction`` of the warm users, drawn uniformly at random (``--seed``; the
              same seed gives the same users), held out of train for validation.
Every rating then falls into exactly one split by (user, item) temperature, and each split's
tasks are the users' ratings in that split (MeLU's four states, plus val):
  train           warm users (not val) x warm items
  user_cold       cold users x warm items
  item_cold       train users x cold items  (the users also have train tasks: existing users,
                  new items; the query items never occur in train)
  user_item_cold  cold users x cold items  (the users also have user_cold tasks)
  val             val users x warm items  (training-population users never seen in train, same
                  item pool as train, built like user_cold); their cold-item ratings are dropped
                  (counted in ``ratings_of_val_users_on_cold_items``), so item_cold keeps meaning
                  "users the model was trained on"
A task is kept if it has at least ``--min-ratings`` rows; its ``--query-size`` most recent
ratings (ties by item id) are the query set, the earlier ones the support set. No cold or val
user is in train and no cold item occurs in train. Ids: warm users (val ones included, in raw-id
order) and warm items come first (``[0, warm)``), then cold ones, so cold ids are never trained in
``train``; val users keep their warm ids, which train never uses either.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from gmeta.io import fs
from gmeta.io.fs import join, write_text
from gmeta.io.schema import Schema, SparseFeature, TableSpec
from gmeta.io.tables import arrow_table
from gmeta.io.writer import TaskWriter
from gmeta.tools.common import OutputConfig, add_output_arguments, check_flags, group_arange, prepare_out, run_command

SPLITS = ("train", "user_cold", "item_cold", "user_item_cold", "val")   # index = split code in build_tasks
VAL = SPLITS.index("val")
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
          "Romance", "Sci-Fi", "Thriller", "War", "Western")
AGE_GROUPS = (1, 18, 25, 35, 45, 50, 56)      # the 1M codes; a group starts at this age
N_OCCUPATIONS_1M = 21
RATING_FIELDS = ("user", "item", "rating", "ts")
N_YEAR_BUCKETS = 9
LAYOUTS = {
    "100k": ("u.data", "u.user", "u.item"),
    "1m": ("ratings.dat", "users.dat", "movies.dat"),
    "latest": ("ratings.csv", None, "movies.csv"),     # (ratings, users, items); no user file
}
# per layout: the ratings file's separator, the user file's field order and separator
DELIMITERS = {"100k": ("\t", "|"), "1m": ("::", "::"), "latest": (",", None)}
RATING_RANGE = {"100k": (1, 5), "1m": (1, 5), "latest": (0.5, 5.0)}
NO_GENRES = "(no genres listed)"
COLD_USER_RULES = ("time", "random")
USER_FIELDS = {"100k": ("id", "age", "gender", "occupation", "zip"), "1m": ("id", "gender", "age", "occupation", "zip")}


class ConvertError(ValueError):
    """Bad input files or flags; the message names the file (and line/column) or the flag."""


@dataclass(frozen=True, kw_only=True)
class MovieLensConfig(OutputConfig):
    src: str
    min_ratings: int = 13
    max_ratings: int = 100
    query_size: int = 10
    cold_user_frac: float = 0.2
    cold_item_frac: float = 0.2
    cold_users: str = "time"
    val_fraction: float = 0.1
    negatives: int = 0              # > 0: implicit protocol, this many label-0 rows per query set
    support_negatives: float = 1.0  # implicit: label-0 rows per support positive
    seed: int = 0

    def validate(self) -> "MovieLensConfig":
        out = self.output_checks(self.max_ratings, "--max-ratings")
        check_flags([
            (bool(self.src), "--src", "must name a directory", repr(self.src)),
            out["--out"],
            (self.query_size >= 1, "--query-size", "must be >= 1", self.query_size),
            (self.min_ratings > self.query_size, "--min-ratings",
             f"must exceed --query-size ({self.query_size}) so every task has support rows", self.min_ratings),
            (self.max_ratings >= self.min_ratings, "--max-ratings",
             f"must be >= --min-ratings ({self.min_ratings})", self.max_ratings),
            (0.0 <= self.cold_user_frac < 1.0, "--cold-user-frac", "must be in [0, 1)", self.cold_user_frac),
            (0.0 <= self.cold_item_frac < 1.0, "--cold-item-frac", "must be in [0, 1)", self.cold_item_frac),
            (self.cold_users in COLD_USER_RULES, "--cold-users", f"must be one of {COLD_USER_RULES}",
             repr(self.cold_users)),
            (0.0 <= self.val_fraction < 1.0, "--val-fraction", "must be in [0, 1)", self.val_fraction),
            (self.negatives >= 0, "--negatives", "must be >= 0 (0: explicit ratings)", self.negatives),
            (self.support_negatives >= 0, "--support-negatives", "must be >= 0", self.support_negatives),
            (self.seed >= 0, "--seed", "must be >= 0", self.seed),
            out["--rows-per-stripe"],
            out["--compression"],
        ], ConvertError)
        return self


# ----------------------------------------------------------------------------- reading
def detect_layout(src: str) -> str:
    """'100k' or '1m' from the files present; a clear error listing both layouts otherwise."""
    info = fs.file_info(src)
    if info.type != fs.pafs.FileType.Directory:
        raise ConvertError(f"--src {src!r} is not a directory")
    names = {e.base_name for e in fs.list_dir(src)}
    files_of = {k: [f for f in v if f] for k, v in LAYOUTS.items()}
    for layout, files in files_of.items():
        if all(f in names for f in files):
            return layout
    expected = "; ".join(f"MovieLens-{k.upper()}: {', '.join(v)}" for k, v in files_of.items())
    partial = {k: [f for f in v if f not in names] for k, v in files_of.items() if any(f in names for f in v)}
    hint = "".join(f" ({k.upper()} files found but missing {m})" for k, m in partial.items())
    raise ConvertError(f"--src {src!r} is neither MovieLens layout{hint}; expected {expected}")


def read_delimited(path: str, names, types: dict, delimiter: str):
    """A headerless latin-1 text table -> pyarrow Table; errors name the file and the column."""
    with fs.open_input_file(path) as f:
        data = f.read()
    if len(delimiter) > 1:   # pyarrow splits on one byte; '::' never occurs inside a field
        data = data.replace(delimiter.encode("latin-1"), b"\x1f")
        delimiter = "\x1f"
    try:
        return pacsv.read_csv(
            pa.BufferReader(data),
            read_options=pacsv.ReadOptions(column_names=list(names), encoding="latin-1"),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ConvertError(f"{path}: cannot parse as {len(names)} fields {list(names)} separated by "
                           f"{delimiter!r}: {exc}") from None


def _np(col) -> np.ndarray:
    return col.to_numpy(zero_copy_only=False)


def _age_group(age: np.ndarray) -> np.ndarray:
    """Raw age (100K) or 1M age code -> 0..6."""
    return np.searchsorted(np.array(AGE_GROUPS), age, side="right") - 1


def _vocab(values: np.ndarray):
    """(sorted distinct values, id of each value)."""
    uniq, ids = np.unique(values, return_inverse=True)
    return uniq, ids.astype(np.int64)


def _year_bucket(year: np.ndarray) -> np.ndarray:
    """0 unknown (year <= 0), 1 before 1940, 2..7 the 1940s..1990s, 8 from 2000."""
    b = np.clip((year - 1930) // 10, 1, N_YEAR_BUCKETS - 1)
    return np.where(year > 0, b, 0).astype(np.int64)


def _flags_to_padded(flags: np.ndarray) -> np.ndarray:
    """[n, G] 0/1 genre flags -> [n, L] genre ids, valid first, -1 padded (L = most per item)."""
    width = max(int(flags.sum(axis=1).max(initial=0)), 1)
    order = np.argsort(-flags, axis=1, kind="stable")[:, :width]           # set flags first, by id
    return np.where(np.take_along_axis(flags, order, 1) > 0, order, -1).astype(np.int64)


def _check_range(values: np.ndarray, lo, hi, path: str, column: str, header_lines: int = 0) -> None:
    bad = np.flatnonzero(~((values >= lo) & (values <= hi)))     # NaN is outside too
    if bad.size:
        raise ConvertError(f"{path}: line {bad[0] + 1 + header_lines}: column {column!r} = {values[bad[0]]} is "
                           f"outside [{lo}, {hi}]")


def _load_ratings(path: str, layout: str) -> dict:
    """The user/item/rating/timestamp file of any layout, ratings checked against the layout's
    star range (whole stars for 100K and 1M, half stars for latest)."""
    lo, hi = RATING_RANGE[layout]
    if layout == "latest":
        r = read_csv_with_header(path, {"userId": pa.int64(), "movieId": pa.int64(), "rating": pa.float64(),
                                        "timestamp": pa.int64()})
        ratings = dict(zip(RATING_FIELDS, (_np(r[k]) for k in ("userId", "movieId", "rating", "timestamp"))))
    else:
        r = read_delimited(path, RATING_FIELDS, dict.fromkeys(RATING_FIELDS, pa.int64()), DELIMITERS[layout][0])
        ratings = {k: _np(r[k]) for k in r.column_names}
    _check_range(ratings["rating"], lo, hi, path, "rating", header_lines=int(layout == "latest"))
    return ratings


def read_csv_with_header(path: str, types: dict):
    """A UTF-8 CSV file with a header row -> pyarrow Table of exactly ``types``' columns; a missing
    column or a value that does not parse is an error naming the file and the column."""
    with fs.open_input_file(path) as f:
        data = f.read()
    header = data.split(b"\n", 1)[0].decode("utf-8", "replace").strip().split(",")
    missing = [c for c in types if c not in header]
    if missing:
        raise ConvertError(f"{path}: the header {header} lacks the column(s) {missing}")
    try:
        return pacsv.read_csv(pa.BufferReader(data),
                              convert_options=pacsv.ConvertOptions(column_types=types, include_columns=list(types),
                                                                   strings_can_be_null=False))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ConvertError(f"{path}: cannot parse as CSV with columns {list(types)}: {exc}") from None


def load(src: str, layout: str) -> dict:
    """Ratings, users and items of any layout (the user and item files are the parts that differ)."""
    ratings_file, users_file, items_file = LAYOUTS[layout]
    ratings = _load_ratings(fs.join(src, ratings_file), layout)
    if users_file is None:      # latest: a user is an id and a history
        users = {"id": np.unique(ratings["user"])}
    else:
        users = _load_users(fs.join(src, users_file), layout, DELIMITERS[layout][1])
    load_items = {"100k": _load_items_100k, "1m": _load_items_1m, "latest": _load_items_latest}[layout]
    return {"ratings": ratings, "users": users, "items": load_items(fs.join(src, items_file))}


def _load_users(path: str, layout: str, sep: str) -> dict:
    """Users: raw id, age group, gender (1 = F), occupation id, first character of the zip code.
    100K names occupations (ids in sorted-name order); 1M gives the codes, checked for range."""
    i64, s = pa.int64(), pa.string()
    by_name = layout == "100k"
    u = read_delimited(path, USER_FIELDS[layout], {"id": i64, "age": i64, "gender": s, "zip": s,
                                                   "occupation": s if by_name else i64}, sep)
    gender = _np(u["gender"])
    _check_gender(gender, path)
    if by_name:
        occ_names, occupation = _vocab(_np(u["occupation"]))
        n_occupations = len(occ_names)
    else:
        occupation, n_occupations = _np(u["occupation"]), N_OCCUPATIONS_1M
        _check_range(occupation, 0, N_OCCUPATIONS_1M - 1, path, "occupation")
    zip_first = _np(pc.utf8_slice_codeunits(pc.utf8_upper(u["zip"]), 0, 1))
    return {"id": _np(u["id"]), "age": _age_group(_np(u["age"])), "gender": (gender == "F").astype(np.int64),
            "occupation": occupation, "zip_first": zip_first, "n_occupations": n_occupations}


def _load_items_100k(path: str) -> dict:
    i64, s = pa.int64(), pa.string()
    names = ["id", "title", "release", "video", "url"] + [f"g{k}" for k in range(len(GENRES))]
    t = read_delimited(path, names, {"id": i64, "title": s, "release": s, "video": s, "url": s,
                                     **{f"g{k}": i64 for k in range(len(GENRES))}}, "|")
    flags = np.stack([_np(t[f"g{k}"]) for k in range(len(GENRES))], axis=1)
    for k, genre in enumerate(GENRES):
        _check_range(flags[:, k], 0, 1, path, f"genre flag {genre}")
    stamp = pc.strptime(t["release"], format="%d-%b-%Y", unit="s", error_is_null=True)
    bad = np.flatnonzero(_np(pc.and_(pc.is_null(stamp), pc.not_equal(t["release"], ""))))
    if bad.size:
        raise ConvertError(f"{path}: line {bad[0] + 1}: release date {t['release'][int(bad[0])].as_py()!r} "
                           f"is not DD-Mon-YYYY")
    release = _np(pc.fill_null(pc.cast(stamp, pa.int64()), np.iinfo(np.int64).min))
    year = _np(pc.fill_null(pc.year(stamp), 0))
    return {"id": _np(t["id"]), "release": release, "year": _year_bucket(year), "genres": _flags_to_padded(flags)}


def _load_items_1m(path: str) -> dict:
    s = pa.string()
    t = read_delimited(path, ("id", "title", "genres"), {"id": pa.int64(), "title": s, "genres": s}, "::")
    year = _title_year(t["title"])
    flags = _genre_flags(t["genres"], GENRES, path)
    return {"id": _np(t["id"]), "release": year, "year": _year_bucket(year), "genres": _flags_to_padded(flags)}


def _load_items_latest(path: str) -> dict:
    """movies.csv of the latest layout; the genre vocabulary is the file's own (sorted names)."""
    t = read_csv_with_header(path, {"movieId": pa.int64(), "title": pa.string(), "genres": pa.string()})
    names = sorted(set(pc.list_flatten(pc.split_pattern(t["genres"], "|")).to_pylist()) - {NO_GENRES, ""})
    flags = _genre_flags(t["genres"], tuple(names) + (NO_GENRES, ""), path)[:, :len(names)]
    year = _title_year(t["title"])
    return {"id": _np(t["movieId"]), "release": year, "year": _year_bucket(year),
            "genres": _flags_to_padded(flags), "genre_names": tuple(names)}


def _title_year(titles) -> np.ndarray:
    """The release year at the end of a title, ``Name (1995)`` (or ``(1995-1997)``); 0 if none."""
    found = pc.extract_regex(pc.utf8_trim_whitespace(titles), r"\((?P<year>\d{4})(?:[-–]\d{4})?\)$")
    return _np(pc.fill_null(pc.cast(pc.struct_field(found, "year"), pa.int64()), 0))


def _genre_flags(genres, vocabulary, path: str) -> np.ndarray:
    """``G1|G2`` strings -> [n, len(vocabulary)] 0/1 flags; a name outside the vocabulary is an error."""
    parts = pc.split_pattern(genres, "|")
    flat = pc.list_flatten(parts)
    gid = pc.index_in(flat, value_set=pa.array(vocabulary))
    if gid.null_count:
        bad = flat[int(np.flatnonzero(_np(pc.is_null(gid)))[0])].as_py()
        raise ConvertError(f"{path}: unknown genre {bad!r}; expected one of {list(vocabulary)}")
    counts = _np(pc.list_value_length(parts))
    flags = np.zeros((len(counts), len(vocabulary)), np.int64)
    flags[np.repeat(np.arange(len(counts)), counts), _np(gid)] = 1
    return flags


def _check_gender(gender: np.ndarray, path: str) -> None:
    bad = np.flatnonzero((gender != "M") & (gender != "F"))
    if bad.size:
        raise ConvertError(f"{path}: line {bad[0] + 1}: gender {gender[bad[0]]!r} is not M or F")


def _index_of(ids: np.ndarray, wanted: np.ndarray, path: str, what: str, ids_path: str) -> np.ndarray:
    """Position of each wanted id (read from ``path``) in ``ids`` (read from ``ids_path``, unique);
    an id listed twice or an unknown id is an error naming the file it is in."""
    order = np.argsort(ids, kind="stable")
    if np.any(ids[order][1:] == ids[order][:-1]):
        dup = ids[order][1:][ids[order][1:] == ids[order][:-1]][0]
        raise ConvertError(f"{ids_path}: {what} id {dup} is listed twice")
    pos = np.minimum(np.searchsorted(ids[order], wanted), len(ids) - 1)
    missing = np.flatnonzero(ids[order][pos] != wanted)
    if missing.size:
        raise ConvertError(f"{path}: line {missing[0] + 1}: {what} id {wanted[missing[0]]} is not in the "
                           f"{what} file")
    return order[pos]


# ----------------------------------------------------------------------------- protocol
def _latest_fraction(frac: float, *keys) -> np.ndarray:
    """Boolean mask of the ``frac`` share of entries that sort last by ``keys`` (primary first)."""
    n = len(keys[0])
    k = int(round(frac * n))
    cold = np.zeros(n, bool)
    if k:
        cold[np.lexsort(tuple(reversed(keys)))[n - k:]] = True
    return cold


def _val_users(kept_warm: np.ndarray, raw_id: np.ndarray, frac: float, seed: int) -> np.ndarray:
    """The ``frac`` share of the users ``kept_warm`` (positions) held out for val: a seeded uniform
    draw over the users in raw-id order, so it depends on the seed and the user set only."""
    k = int(round(frac * len(kept_warm)))
    by_id = kept_warm[np.argsort(raw_id[kept_warm], kind="stable")]
    return np.sort(by_id[np.random.default_rng([seed, 1]).permutation(len(by_id))[:k]])


def _cold_users(kept_idx: np.ndarray, users: dict, first_ts: np.ndarray, cfg) -> np.ndarray:
    """Positions (into ``kept_idx``) of the cold users: the latest arrivals, or a seeded draw."""
    if cfg.cold_users == "time":
        return _latest_fraction(cfg.cold_user_frac, first_ts[kept_idx], users["id"][kept_idx])
    k = int(round(cfg.cold_user_frac * len(kept_idx)))
    by_id = np.argsort(users["id"][kept_idx], kind="stable")
    cold = np.zeros(len(kept_idx), bool)
    cold[by_id[np.random.default_rng([cfg.seed, 2]).permutation(len(by_id))[:k]]] = True
    return cold


def sample_negatives(task_pool: np.ndarray, need: np.ndarray, pools: np.ndarray, rated: np.ndarray,
                     n_items: int, rng) -> tuple:
    """Uniform draws without replacement, per task, of items its user never rated.

    ``task_pool[t]`` is the pool (a row of ``pools``: ``[lo, hi)`` of item ids) task t draws from,
    ``need[t]`` how many it needs, ``rated[t]`` its user's position; the user's rated items are the
    sorted keys ``user * n_items + item`` in ``rated_keys``. Rounds of vectorized rejection sampling
    over all short tasks at once; a task whose pool runs out gets what there is. Returns
    ``(task of each draw, item of each draw)`` grouped by task in draw order.
    """
    rated_keys, user_of_task = rated
    lo, hi = pools[task_pool, 0], pools[task_pool, 1]
    free = (hi - lo) - _count_in_ranges(rated_keys, user_of_task * n_items + lo, user_of_task * n_items + hi)
    need = np.minimum(need, np.maximum(free, 0))
    # draws per round: enough that a task whose pool is mostly rated still fills in a few rounds
    oversample = (hi - lo) / np.maximum(free, 1)
    chosen_task, chosen_item = np.zeros(0, np.int64), np.zeros(0, np.int64)
    short = np.flatnonzero(need > 0)
    while short.size:
        have = np.bincount(chosen_task, minlength=len(need))
        want = need[short] - have[short]
        draws = np.minimum(np.ceil((2 * want + 8) * oversample[short]), 4 * (hi - lo)[short] + 8).astype(np.int64)
        task = np.repeat(short, draws)
        item = lo[task] + (rng.random(task.size) * (hi[task] - lo[task])).astype(np.int64)
        key = user_of_task[task] * n_items + item
        slot = np.minimum(np.searchsorted(rated_keys, key), max(len(rated_keys) - 1, 0))
        fresh = rated_keys[slot] != key if len(rated_keys) else np.ones(key.size, bool)
        task, item = np.r_[chosen_task, task[fresh]], np.r_[chosen_item, item[fresh]]
        # keep the first draw of each (task, item), then the first ``need`` of each task, in draw order
        _, first = np.unique(task * n_items + item, return_index=True)
        first.sort()
        task, item = task[first], item[first]
        order = np.argsort(task, kind="stable")
        task, item = task[order], item[order]
        rank = group_arange(np.bincount(task, minlength=len(need)))
        keep = rank < need[task]
        chosen_task, chosen_item = task[keep], item[keep]
        short = np.flatnonzero(np.bincount(chosen_task, minlength=len(need)) < need)
    return chosen_task, chosen_item


def _count_in_ranges(sorted_keys: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.searchsorted(sorted_keys, hi) - np.searchsorted(sorted_keys, lo)


def build_tasks(data: dict, cfg: MovieLensConfig, paths: tuple) -> dict:
    """Assign users/items warm or cold, ratings to splits, order every task, and (implicit
    protocol) add its sampled label-0 rows; vectorized throughout."""
    r, users, items = data["ratings"], data["users"], data["items"]
    ratings_path, users_path, items_path = paths
    upos = _index_of(users["id"], r["user"], ratings_path, "user", users_path)
    ipos = _index_of(items["id"], r["item"], ratings_path, "item", items_path)
    n_users, n_items = len(users["id"]), len(items["id"])
    count = np.bincount(upos, minlength=n_users)
    kept = (count >= cfg.min_ratings) & (count <= cfg.max_ratings)
    first_ts = np.full(n_users, np.iinfo(np.int64).max)
    np.minimum.at(first_ts, upos, r["ts"])
    kept_idx = np.flatnonzero(kept)
    cold_user = np.zeros(n_users, bool)
    cold_user[kept_idx] = _cold_users(kept_idx, users, first_ts, cfg)
    val_user = np.zeros(n_users, bool)
    val_user[_val_users(kept_idx[~cold_user[kept_idx]], users["id"], cfg.val_fraction, cfg.seed)] = True
    item_first = np.full(n_items, np.iinfo(np.int64).max)
    np.minimum.at(item_first, ipos, r["ts"])
    cold_item = _latest_fraction(cfg.cold_item_frac, items["release"], item_first, items["id"])
    # ids: warm first, then cold, each in raw-id order
    user_new = np.full(n_users, -1, np.int64)
    user_order = np.lexsort((users["id"][kept_idx], cold_user[kept_idx]))
    user_new[kept_idx[user_order]] = np.arange(len(kept_idx))
    item_order = np.lexsort((items["id"], cold_item))
    item_new = np.empty(n_items, np.int64)
    item_new[item_order] = np.arange(n_items)
    n_warm_items = int(n_items - cold_item.sum())

    val_on_cold = val_user[upos] & cold_item[ipos]       # dropped: item_cold is for trained users
    rows = np.flatnonzero(kept[upos] & ~val_on_cold)
    up, ip = upos[rows], ipos[rows]
    split = cold_user[up].astype(np.int64) + 2 * cold_item[ip]       # index into SPLITS
    split[val_user[up]] = VAL                                        # (val users' rows are warm-item rows)
    order = np.lexsort((r["item"][rows], r["ts"][rows], user_new[up], split))
    rows, up, ip, split = rows[order], up[order], ip[order], split[order]
    key = split * (len(kept_idx) + 1) + user_new[up]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    sizes = np.diff(np.r_[starts, len(key)])
    size_of_row = np.repeat(sizes, sizes)
    keep = size_of_row >= cfg.min_ratings
    position = group_arange(sizes)
    is_query = (size_of_row - 1 - position < cfg.query_size).astype(np.int8)
    rating = r["rating"][rows].astype(np.float32)
    pos = {"split": split[keep], "up": up[keep], "ip": ip[keep], "is_query": is_query[keep],
           "order": position[keep].astype(np.float64), "rating": rating[keep], "click": (rating[keep] >= 4)}
    counts = {}
    if cfg.negatives > 0:
        pos["click"] = np.ones(len(pos["up"]), bool)
        neg = _negative_rows(pos, sizes[sizes >= cfg.min_ratings], cfg, upos[kept[upos]], ipos[kept[upos]],
                             item_new, n_warm_items, n_items)
        counts["negative_rows"] = int(len(neg["up"]))
        counts["tasks_short_of_negatives"] = neg.pop("short")
        pos = {k: np.r_[pos[k], neg[k]] for k in pos}
        order = np.lexsort((pos["order"], pos["is_query"], user_new[pos["up"]], pos["split"]))
        pos = {k: v[order] for k, v in pos.items()}
    zip_vocab, zip_of_user = _user_zips(users, kept_idx, n_users)
    up, ip = pos["up"], pos["ip"]
    columns = {"task_id": user_new[up], "is_query": pos["is_query"], "click": pos["click"].astype(np.float32),
               "user_id": user_new[up], "item_id": item_new[ip], "genres": items["genres"][ip],
               "year": items["year"][ip]}
    if cfg.negatives == 0:
        columns["rating"] = pos["rating"]
    if "age" in users:
        columns.update(age=users["age"][up], gender=users["gender"][up], occupation=users["occupation"][up],
                       zip=zip_of_user[up])
    per_split = {name: {k: v[pos["split"] == i] for k, v in columns.items()} for i, name in enumerate(SPLITS)}
    return {
        "splits": per_split,
        "vocab": {"user_id": len(kept_idx), "item_id": n_items, "zip": max(len(zip_vocab), 1),
                  "occupation": users.get("n_occupations", 0), "genre_max_len": items["genres"].shape[1],
                  "genres": len(items.get("genre_names", GENRES)), "demographics": "age" in users,
                  "implicit": cfg.negatives > 0},
        "counts": {"ratings": len(r["rating"]), "users_kept": int(kept.sum()), "users_dropped": int((~kept).sum()),
                   "cold_users": int(cold_user.sum()), "warm_users": int(kept.sum() - cold_user.sum()),
                   "val_users": int(val_user.sum()),
                   "cold_items": int(cold_item.sum()), "warm_items": n_warm_items,
                   "ratings_of_dropped_users": int((~kept[upos]).sum()),
                   "ratings_of_val_users_on_cold_items": int(val_on_cold.sum()),
                   "ratings_in_short_tasks": int((~keep).sum()), **counts},
    }


def _user_zips(users: dict, kept_idx: np.ndarray, n_users: int) -> tuple:
    """(zip vocabulary of the kept users, zip id of every user); empty without demographics."""
    zip_of_user = np.zeros(n_users, np.int64)
    if "zip_first" not in users:
        return np.zeros(0), zip_of_user
    zip_vocab, zip_ids = _vocab(users["zip_first"][kept_idx])
    zip_of_user[kept_idx] = zip_ids
    return zip_vocab, zip_of_user


def _negative_rows(pos: dict, task_sizes: np.ndarray, cfg, rated_users: np.ndarray, rated_items: np.ndarray,
                   item_new: np.ndarray, n_warm_items: int, n_items: int) -> dict:
    """The implicit protocol's label-0 rows for the kept tasks ``pos`` (grouped by task, in task
    order, ``task_sizes`` rows each): ``--negatives`` per query set, ``--support-negatives`` x the
    support positives per support set, from the task's item pool, never an item the user rated
    (in any split); each support negative is ordered right after one support positive."""
    starts = np.cumsum(task_sizes) - task_sizes
    task_split, task_user = pos["split"][starts], pos["up"][starts]
    n_support = task_sizes - cfg.query_size
    n_sup_neg = np.round(cfg.support_negatives * n_support).astype(np.int64)
    cold_pool = (task_split == SPLITS.index("item_cold")) | (task_split == SPLITS.index("user_item_cold"))
    pools = np.array([[0, n_warm_items], [n_warm_items, n_items]], np.int64)
    rated_keys = np.unique(rated_users * n_items + item_new[rated_items])
    rng = np.random.default_rng([cfg.seed, 3])
    task, item = sample_negatives(cold_pool.astype(np.int64), n_sup_neg + cfg.negatives, pools,
                                  (rated_keys, task_user), n_items, rng)
    got = np.bincount(task, minlength=len(task_sizes))
    rank = group_arange(got)
    support = rank < n_sup_neg[task]
    # support negative j of a task follows support positive floor(j * S / k) (S positives, k negatives)
    k = np.maximum(n_sup_neg[task], 1)
    order = np.where(support, np.floor(rank * n_support[task] / k) + 0.5,
                     task_sizes[task] + rank - n_sup_neg[task])
    item_pos = np.empty(n_items, np.int64)
    item_pos[item_new] = np.arange(n_items)
    n = task.size
    return {"split": task_split[task], "up": task_user[task], "ip": item_pos[item], "is_query": (~support).astype(np.int8),
            "order": order.astype(np.float64), "rating": np.zeros(n, np.float32), "click": np.zeros(n, bool),
            "short": int((got < n_sup_neg + cfg.negatives).sum())}


def build_schema(vocab: dict, splits):
    """The schema of a converted dataset: the demographics' features only where the layout has
    them; labels click and rating (explicit) or click alone (implicit: sampled rows have no rating)."""
    user = [SparseFeature("user_id", "user_id", group="user")]
    tables = [TableSpec("user_id", max(vocab["user_id"], 1))]
    if vocab["demographics"]:
        user += [SparseFeature(name, name, group="user") for name in ("age", "gender", "occupation", "zip")]
        tables += [TableSpec("age", len(AGE_GROUPS)), TableSpec("gender", 2),
                   TableSpec("occupation", vocab["occupation"]), TableSpec("zip", vocab["zip"])]
    return Schema(
        labels=("click",) if vocab["implicit"] else ("click", "rating"),
        sparse=(*user,
                SparseFeature("item_id", "item_id", group="item"),
                SparseFeature("genres", "genre", max_len=vocab["genre_max_len"], group="item"),
                SparseFeature("year", "year", group="item")),
        tables=(*tables, TableSpec("item_id", vocab["item_id"]), TableSpec("genre", vocab["genres"]),
                TableSpec("year", N_YEAR_BUCKETS)),
        item_id_feature="item_id",
        splits=tuple(splits),
        meta={"source": "movielens"},
    ).validate("movielens schema")


def convert(cfg: MovieLensConfig) -> dict:
    """Read, split, write; returns the summary also written to ``DIR/convert.json``."""
    cfg.validate()
    t0 = time.perf_counter()
    layout = detect_layout(cfg.src)
    prepare_out(cfg.out, cfg.overwrite, ("schema.json", "convert.json", *SPLITS), error=ConvertError)
    data = load(cfg.src, layout)
    built = build_tasks(data, cfg, tuple(join(cfg.src, f) if f else join(cfg.src, LAYOUTS[layout][0])
                                         for f in LAYOUTS[layout]))
    nonempty = [s for s in SPLITS if len(built["splits"][s]["task_id"])]
    if "train" not in nonempty:
        raise ConvertError(f"{cfg.src}: no train task has >= --min-ratings ({cfg.min_ratings}) ratings of "
                           f"warm items; is the data too small for these flags?")
    schema = build_schema(built["vocab"], nonempty)
    if "genre_names" in data["items"]:
        built["counts"]["genre_vocabulary"] = list(data["items"]["genre_names"])
    summary = {"source": "movielens", "layout": layout, "settings":
               {k: v for k, v in asdict(cfg).items() if k not in ("src", "out", "overwrite", "quiet")},
               "counts": built["counts"], "splits": {}}
    for name in SPLITS:
        cols = built["splits"][name]
        stats = {"users": int(len(np.unique(cols["task_id"]))), "rows": int(len(cols["task_id"])),
                 "query_rows": int(cols["is_query"].sum()),
                 "ctr": round(float(cols["click"].mean()), 6) if len(cols["click"]) else None,
                 "mean_rating": (round(float(cols["rating"].mean()), 6)
                                 if "rating" in cols and len(cols["rating"]) else None)}
        summary["splits"][name] = stats
        if name in nonempty:
            with TaskWriter(cfg.out, schema, split=name, rows_per_stripe=cfg.rows_per_stripe,
                            compression=cfg.compression) as writer:
                writer.write(arrow_table(schema, cols))
    write_text(join(cfg.out, "convert.json"), json.dumps(summary, indent=2, sort_keys=True, allow_nan=False) + "\n")
    schema.save(cfg.out)    # last: an interrupted run leaves no schema.json
    summary["seconds"] = time.perf_counter() - t0
    return summary


def format_summary(summary: dict) -> str:
    c = summary["counts"]
    protocol = (f"implicit, {c['negative_rows']:,} sampled label-0 rows" if "negative_rows" in c
                else "explicit ratings")
    lines = [f"MovieLens-{summary['layout'].upper()} ({protocol}): {c['ratings']:,} ratings; users kept {c['users_kept']:,} "
             f"(warm {c['warm_users']:,} of which val {c['val_users']:,}, cold {c['cold_users']:,}), dropped "
             f"{c['users_dropped']:,}; items warm "
             f"{c['warm_items']:,}, cold {c['cold_items']:,}",
             f"{'split':<15} {'users':>7} {'rows':>9} {'query':>8} {'click':>6} {'rating':>6}"]
    for name, s in summary["splits"].items():
        click = f"{s['ctr']:.3f}" if s["ctr"] is not None else "-"
        rating = f"{s['mean_rating']:.2f}" if s["mean_rating"] is not None else "-"
        lines.append(f"{name:<15} {s['users']:>7,} {s['rows']:>9,} {s['query_rows']:>8,} {click:>6} {rating:>6}"
                     + ("" if s["users"] else "  (empty: not written)"))
    lines.append(f"done in {summary.get('seconds', float('nan')):.1f} s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    d = MovieLensConfig(src="", out="")
    a = parser.add_argument
    a("--src", required=True, help="directory with the raw MovieLens-100K, -1M or latest files")
    a("--out", required=True, help="dataset directory to write")
    a("--min-ratings", type=int, default=d.min_ratings,
      help="fewest ratings of a kept user and of a task (default: %(default)s)")
    a("--max-ratings", type=int, default=d.max_ratings, help="most ratings of a kept user (default: %(default)s)")
    a("--query-size", type=int, default=d.query_size,
      help="most recent ratings per task that form the query (default: %(default)s)")
    a("--cold-user-frac", type=float, default=d.cold_user_frac,
      help="share of users (latest first rating) that are cold (default: %(default)s)")
    a("--cold-item-frac", type=float, default=d.cold_item_frac,
      help="share of items (latest released) that are cold (default: %(default)s)")
    a("--val-fraction", type=float, default=d.val_fraction,
      help="share of the warm users held out of train as the val split (their warm-item ratings; a seeded "
           "uniform draw); 0 writes no val split (default: %(default)s)")
    a("--cold-users", default=d.cold_users, choices=COLD_USER_RULES,
      help="which kept users are cold: time (the latest to arrive) or random (a seeded draw) "
           "(default: %(default)s)")
    a("--negatives", type=int, default=d.negatives,
      help="implicit protocol: every rated item is a positive and each query set gets this many label-0 "
           "rows of items the user never rated (seeded); 0 keeps explicit ratings (default: %(default)s)")
    a("--support-negatives", type=float, default=d.support_negatives,
      help="implicit protocol: label-0 rows per support positive (default: %(default)s)")
    a("--seed", type=int, default=d.seed,
      help="seed of the val draw, a random cold-user draw and the negatives (default: %(default)s)")
    add_output_arguments(parser, d, quiet_help="print nothing on success")


def main(args) -> int:
    return run_command("convert movielens", MovieLensConfig, args, convert, ConvertError, format_summary,
                       "convert.json")
