"""MovieLens-100K / -1M / latest -> Meta-IO cold-start tasks (MeLU protocol), as a spec over
``gmeta convert table``.

This module only reads the three layouts into one shape (checking what is particular to them:
star ranges, genders, genre names, release dates, ids present in the user and item files) and
writes it as Parquet files in a temporary directory; ``spec_of`` then says what MovieLens
means in the generic converter's terms, and ``gmeta convert table`` does the rest. The latest
layout also converts straight from its CSV files with ``tools/specs/ml-latest-small.json``,
which gives the same dataset (a test checks it).

Layouts (detected from the files present in ``--src``; 100K and 1M text is latin-1, latest UTF-8):
  100K  ``u.data`` (user \\t item \\t rating \\t ts), ``u.user`` (id|age|gender|occupation|zip),
        ``u.item`` (id|title|release date|video date|url|19 genre flags)
  1M    ``ratings.dat`` (UserID::MovieID::Rating::Timestamp), ``users.dat``
        (UserID::Gender::Age::Occupation::Zip), ``movies.dat`` (MovieID::Title (Year)::G1|G2)
  latest  ``ratings.csv`` (userId,movieId,rating,timestamp; half stars 0.5..5), ``movies.csv``
        (movieId,title,genres; quoted CSV); no user file: a user is an id and a history

Features (vocabularies, row 0 out of vocabulary): ``user_id``, ``age`` (the 1M age groups, named
by the age a group starts at; 100K ages are grouped the same way), ``gender``, ``occupation``
(100K names, 1M codes), ``zip`` (first character of the zip code), ``item_id``, ``genres``
(list), ``year`` (release decade: 1 before 1950, 2 the 1950s, ..., 7 the 2000s, 8 2010 and
later; unknown is out of vocabulary). The latest layout has no demographics. Labels: ``rating``
and ``click`` = rating >= 4; with ``--negatives`` (implicit feedback) every rating is a click
and each task gets sampled label-0 rows (``gmeta.tools.table.negatives``).

Protocol (``gmeta.tools.table.protocol``): users with ``--min-ratings``..``--max-ratings``
ratings are kept; cold users are the ``--cold-user-frac`` whose first rating is latest (or a
seeded draw), cold items the ``--cold-item-frac`` released latest (ties: first rated later);
val users a seeded ``--val-fraction`` of the warm ones. Splits: train (warm x warm), user_cold,
item_cold (train users x cold items), user_item_cold, val (val users x warm items). A task's
last ``--query-size`` ratings (ties by item id) are its query set.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from gmeta.io import fs
from gmeta.io.errors import DataError
from gmeta.tools.common import OutputConfig, add_output_arguments, check_flags, run_command
from gmeta.tools.table.command import convert as convert_table
from gmeta.tools.table.command import format_summary as format_table_summary
from gmeta.tools.table.config import build_config
from gmeta.tools.table.spec import SpecError

GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
          "Romance", "Sci-Fi", "Thriller", "War", "Western")
AGE_GROUPS = (1, 18, 25, 35, 45, 50, 56)      # the 1M codes; a group starts at this age
N_OCCUPATIONS_1M = 21
DECADES = (1950, 1960, 1970, 1980, 1990, 2000, 2010)   # year bucket boundaries
RATING_FIELDS = ("user", "item", "rating", "ts")
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
#: the normalised files spec_of reads, in a temporary directory
EVENTS, ITEMS, USERS = "ratings.parquet", "movies.parquet", "users.parquet"


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
    """Ratings, items and (100K, 1M) users of any layout as Arrow tables of one shape: ratings
    (userId, movieId, rating, timestamp), movies (movieId, year, release, genres: list of names),
    users (userId, age, gender, occupation, zip). Every rated id must be in its file."""
    ratings_file, users_file, items_file = LAYOUTS[layout]
    ratings_path, items_path = fs.join(src, ratings_file), fs.join(src, items_file)
    r = _load_ratings(ratings_path, layout)
    ratings = pa.table({"userId": r["user"], "movieId": r["item"], "rating": r["rating"].astype(np.float64),
                        "timestamp": r["ts"]})
    load_items = {"100k": _load_items_100k, "1m": _load_items_1m, "latest": _load_items_latest}[layout]
    items = load_items(items_path)
    _check_listed(items.column("movieId"), ratings.column("movieId"), ratings_path, "item", items_path)
    out = {"ratings": ratings, "items": items}
    if users_file is not None:
        users_path = fs.join(src, users_file)
        out["users"] = _load_users(users_path, layout, DELIMITERS[layout][1])
        _check_listed(out["users"].column("userId"), ratings.column("userId"), ratings_path, "user", users_path)
    return out


def _check_listed(ids, wanted, path: str, what: str, ids_path: str) -> None:
    """An id listed twice in its file, or a rated id missing from it, is an error naming the file."""
    counts = pc.value_counts(ids)
    dup = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(dup):
        raise ConvertError(f"{ids_path}: {what} id {dup[0].as_py()} is listed twice")
    missing = np.flatnonzero(~_np(pc.is_in(wanted, value_set=ids)))
    if missing.size:
        raise ConvertError(f"{path}: line {missing[0] + 1}: {what} id {wanted[int(missing[0])].as_py()} is not in "
                           f"the {what} file")


def _load_users(path: str, layout: str, sep: str) -> pa.Table:
    """Users: raw id, age group (the age it starts at), gender, occupation (100K: its name; 1M:
    its code, checked for range), first character of the zip code."""
    i64, s = pa.int64(), pa.string()
    by_name = layout == "100k"
    u = read_delimited(path, USER_FIELDS[layout], {"id": i64, "age": i64, "gender": s, "zip": s,
                                                   "occupation": s if by_name else i64}, sep)
    _check_gender(_np(u["gender"]), path)
    if not by_name:
        _check_range(_np(u["occupation"]), 0, N_OCCUPATIONS_1M - 1, path, "occupation")
    group = np.searchsorted(np.array(AGE_GROUPS), _np(u["age"]), side="right") - 1
    return pa.table({"userId": u["id"], "age": np.array(AGE_GROUPS)[np.maximum(group, 0)],
                     "gender": u["gender"], "occupation": u["occupation"],
                     "zip": pc.utf8_slice_codeunits(pc.utf8_upper(u["zip"]), 0, 1)})


def _items(ids, year: np.ndarray, release, genres) -> pa.Table:
    """The item table: unknown years (0) are null, so they fall out of the year vocabulary."""
    known = year > 0
    return pa.table({"movieId": ids, "year": pa.array(year, mask=~known), "release": release, "genres": genres})


def _load_items_100k(path: str) -> pa.Table:
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
    item, genre = np.nonzero(flags)
    genres = pa.ListArray.from_arrays(pa.array(np.r_[0, np.cumsum(flags.sum(axis=1))].astype(np.int32)),
                                      pa.array(np.array(GENRES, object)[genre], pa.string()))
    return _items(t["id"], _np(pc.fill_null(pc.year(stamp), 0)), pc.cast(stamp, pa.int64()), genres)


def _load_items_1m(path: str) -> pa.Table:
    s = pa.string()
    t = read_delimited(path, ("id", "title", "genres"), {"id": pa.int64(), "title": s, "genres": s}, "::")
    year = _title_year(t["title"])
    _genre_flags(t["genres"], GENRES, path)
    return _items(t["id"], year, pa.array(year, mask=year <= 0), pc.split_pattern(t["genres"], "|"))


def _load_items_latest(path: str) -> pa.Table:
    """movies.csv of the latest layout; genres are the file's own names ("(no genres listed)" is none)."""
    t = read_csv_with_header(path, {"movieId": pa.int64(), "title": pa.string(), "genres": pa.string()})
    year = _title_year(t["title"])
    parts = pc.split_pattern(t["genres"].combine_chunks(), "|")
    flat = pc.list_flatten(parts)
    keep = pc.invert(pc.is_in(flat, value_set=pa.array([NO_GENRES, ""])))
    lengths = np.bincount(_np(pc.list_parent_indices(parts))[_np(keep)], minlength=len(parts))
    genres = pa.ListArray.from_arrays(pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32)), flat.filter(keep))
    return _items(t["movieId"], year, pa.array(year, mask=year <= 0), genres)


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


def _check_gender(gender: np.ndarray, path: str) -> None:
    bad = np.flatnonzero((gender != "M") & (gender != "F"))
    if bad.size:
        raise ConvertError(f"{path}: line {bad[0] + 1}: gender {gender[bad[0]]!r} is not M or F")


# ----------------------------------------------------------------------------- the spec
def spec_of(cfg: MovieLensConfig, demographics: bool) -> dict:
    """The MovieLens protocol as a ``gmeta convert table`` spec over the files ``load`` writes."""
    user = [{"name": "user_id", "column": "userId", "group": "user"}]
    if demographics:
        user += [{"name": name, "column": name, "group": "user"} for name in ("age", "gender", "occupation", "zip")]
    spec = {
        "input": EVENTS,
        "task": {"column": "userId", "kind": "user"},
        "order": ["timestamp", "movieId"],
        "query": {"last": cfg.query_size},
        "min_events": cfg.min_ratings,
        "max_events": cfg.max_ratings,
        "labels": {"click": "rating > 0"} if cfg.negatives else {"click": "rating >= 4", "rating": "rating"},
        "join": [{"path": ITEMS, "on": "movieId"}] + ([{"path": USERS, "on": "userId"}] if demographics else []),
        "derive": [{"name": "decade", "column": "year", "buckets": list(DECADES)}],
        "sparse": user + [{"name": "item_id", "column": "movieId", "group": "item"},
                          {"name": "genres", "column": "genres", "group": "item"},
                          {"name": "year", "column": "decade", "group": "item"}],
        "item_id_feature": "item_id",
        "cold": {"users": {"fraction": cfg.cold_user_frac, "random": cfg.cold_users == "random"},
                 "items": {"fraction": cfg.cold_item_frac, "by": "release"} if cfg.cold_item_frac else {}},
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
    }
    if cfg.negatives:
        spec["negatives"] = {"query": cfg.negatives, "support": cfg.support_negatives}
    return spec


def convert(cfg: MovieLensConfig) -> dict:
    """Read the layout, write it as Parquet in a temporary directory, convert with the spec;
    returns the generic summary (also in ``DIR/convert.json``) with the layout."""
    cfg.validate()
    layout = detect_layout(cfg.src)
    data = load(cfg.src, layout)
    tmp = tempfile.mkdtemp(prefix="gmeta-movielens-")
    try:
        for name, key in ((EVENTS, "ratings"), (ITEMS, "items"), (USERS, "users")):
            if key in data:
                pq.write_table(data[key], fs.join(tmp, name))
        output = {"out": cfg.out, "rows_per_stripe": cfg.rows_per_stripe, "compression": cfg.compression,
                  "overwrite": cfg.overwrite, "quiet": cfg.quiet, "spec": f"movielens-{layout}"}
        try:
            table_cfg = build_config(spec_of(cfg, "users" in data), {"src": tmp}, output)
            summary = convert_table(table_cfg)
        except (SpecError, DataError) as exc:
            raise ConvertError(f"{cfg.src}: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary["layout"] = layout
    summary["movielens"] = {k: v for k, v in asdict(cfg).items() if k not in ("src", "out", "overwrite", "quiet")}
    fs.write_text(fs.join(cfg.out, "convert.json"), json.dumps(summary, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return summary


def format_summary(summary: dict) -> str:
    rows = summary["rows"]
    protocol = (f"implicit, {rows.get('negative_rows', 0):,} sampled label-0 rows" if summary["movielens"]["negatives"]
                else "explicit ratings")
    return f"MovieLens-{summary['layout'].upper()} ({protocol})\n" + format_table_summary(summary)


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
                       "convert.json (vocabularies in _vocab)")
