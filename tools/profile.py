"""``gmeta profile``: how skewed a dataset's id access is, and the profile tiering reads.

Counts looked-up rows per table over a sample of a split (evenly spaced stripes), writes
``DIR/_profile/summary.json`` (the skew report), ``DIR/_profile/<table>.npz`` (rows by count) and
``DIR/_profile/skew.png`` (share of lookups against share of rows), and prints the report.
``gmeta train --tiering`` reads the profile from there (``--profile-dir`` elsewhere), so every
worker picks the same hot rows.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from gmeta.io.errors import DataError
from gmeta.trainer.embedding.tiering import PROFILE_DIR, profile_split, save_profile


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="dataset directory (schema.json + split folders)")
    parser.add_argument("--split", default="train", help="split to profile (default train)")
    parser.add_argument("--sample-rows", type=int, default=2_000_000,
                        help="rows to read, from evenly spaced stripes (0 = every row)")
    parser.add_argument("--out", default=None, help="where to write the profile (default DATA/_profile)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def plot_skew(profiles: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, p in sorted(profiles.items()):
        if not p.rows.size:
            continue
        share_rows = np.arange(1, p.rows.size + 1) / p.num_rows
        ax.plot(share_rows, np.cumsum(p.counts) / p.lookups, label=f"{name} ({p.num_rows:,} rows)")
    ax.set_xscale("log")
    ax.set_xlabel("share of the table's rows (most looked up first)")
    ax.set_ylabel("share of lookups")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_report(summary: dict) -> str:
    lines = [f"{'table':<16}{'rows':>12}{'lookups':>12}{'seen':>10}{'top 0.1%':>10}{'top 1%':>9}{'top 10%':>9}"]
    for name, t in summary["tables"].items():
        c = t["coverage"]
        lines.append(f"{name:<16}{t['num_rows']:>12,}{t['lookups']:>12,}{t['distinct_rows']:>10,}"
                     f"{c['0.1%']:>10.1%}{c['1.0%']:>9.1%}{c['10.0%']:>9.1%}")
    return "\n".join(lines)


def main(args) -> int:
    out = args.out or os.path.join(args.data, PROFILE_DIR)
    start = time.time()

    def progress(done, total):
        if done == total or done % 50 == 0:
            print(f"[gmeta profile] {done}/{total} stripes", file=sys.stderr, flush=True)

    try:
        profiles = profile_split(args.data, args.split, args.sample_rows, progress)
        meta = {"dataset": os.path.abspath(args.data), "split": args.split, "sample_rows": args.sample_rows}
        save_profile(profiles, out, meta)
    except DataError as exc:
        print(f"gmeta profile: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"gmeta profile: error: cannot write the profile to {out}: {exc}", file=sys.stderr)
        return 2
    plot_skew(profiles, os.path.join(out, "skew.png"))
    with open(os.path.join(out, "summary.json")) as fh:
        summary = json.load(fh)
    print(json.dumps(summary) if args.json else format_report(summary))
    print(f"wrote {out} in {time.time() - start:.1f} s", file=sys.stderr)
    return 0
