"""Projected throughput and scaling efficiency at 8-64 workers: a MODEL, not a measurement.

Input: one ``gmeta bench step --full`` result (``--from FILE``, or it is run here), i.e. the
measured per-worker bytes handed to each collective per step and the measured step time at the
measured worker count. Model, per step and worker, on a network of B Gb/s per worker:

* compute: the measured hybrid step time (it includes the measured run's loopback collectives,
  so it is an upper bound of the compute);
* hybrid: the AlltoAll volumes (ids, vectors, vector gradients) are per-worker batch sizes,
  independent of N, of which (N-1)/N leaves the worker; the dense allreduce (ring) moves
  2 (N-1)/N of its size;
* naive: the same dense allreduce plus the full table gradient in it: 2 (N-1)/N of the table;
* no overlap of communication and compute, latency ignored (both optimistic/pessimistic in
  ways the table says nothing about).

Efficiency is projected samples/s / (N x the 1-worker compute-only samples/s). The table goes
to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

WORKERS = (8, 16, 32, 64)
NETWORKS_GBPS = (25.0, 200.0)


def add_arguments(p) -> None:
    p.add_argument("--from", dest="source", default="",
                   help="a saved `gmeta bench step --full --json` line (default: run it now)")
    p.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")


def project(measured: dict, workers=WORKERS, networks=NETWORKS_GBPS) -> dict:
    """The model of the module docstring, from a ``bench step --full`` result."""
    kinds = measured["hybrid_bytes_by_kind"]
    alltoall = sum(v for k, v in kinds.items() if k.startswith("alltoall"))
    dense = kinds.get("allreduce", 0)
    naive_extra = max(0.0, measured["naive_bytes_per_step"] - dense)  # the table gradient (and mask)
    compute_s = measured["hybrid_ms"] / 1e3
    samples = measured["tasks"] * (measured["support"] + measured["query"])  # per worker and step
    rows = []
    for gbps in networks:
        bytes_per_s = gbps * 1e9 / 8
        for n in workers:
            off = (n - 1) / n
            hybrid_s = compute_s + (alltoall * off + 2 * off * dense) / bytes_per_s
            naive_s = compute_s + 2 * off * (dense + naive_extra) / bytes_per_s
            rows.append({"workers": n, "network_gbps": gbps,
                         "hybrid_samples_per_s": round(n * samples / hybrid_s),
                         "naive_samples_per_s": round(n * samples / naive_s),
                         "hybrid_efficiency": round(compute_s / hybrid_s, 3),
                         "naive_efficiency": round(compute_s / naive_s, 3)})
    return {"bench": "projection", "model": "projection from measured bytes and step time, not a measurement",
            "measured_on": {k: measured[k] for k in ("np", "rows", "dim", "hybrid_ms", "hybrid_bytes_per_step",
                                                    "naive_bytes_per_step")},
            "rows": rows}


def main(args) -> int:
    if args.source:
        text = Path(args.source).read_text().strip().splitlines()[-1]
    else:
        proc = subprocess.run([sys.executable, "-m", "gmeta.cli", "bench", "step", "--full", "--json"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-3000:])
            raise SystemExit("gmeta bench projection: gmeta bench step --full failed")
        text = proc.stdout.strip().splitlines()[-1]
    measured = json.loads(text)
    if measured.get("mode") != "full meta-step":
        raise SystemExit("gmeta bench projection: --from needs the JSON of `gmeta bench step --full`")
    result = project(measured)
    out = sys.stderr
    print("PROJECTION (a model from measured bytes and step time; see `gmeta bench projection --help`)", file=out)
    print(f"{'Gb/s':>6}{'workers':>9}{'hybrid samples/s':>18}{'eff.':>7}{'naive samples/s':>17}{'eff.':>7}", file=out)
    for r in result["rows"]:
        print(f"{r['network_gbps']:>6.0f}{r['workers']:>9}{r['hybrid_samples_per_s']:>18,}{r['hybrid_efficiency']:>7.2f}"
              f"{r['naive_samples_per_s']:>17,}{r['naive_efficiency']:>7.2f}", file=out)
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0
