"""How the meta-step's cost grows: step time and memory per worker against T, S, the embedding
dimension, the table's rows and the number of workers, one factor at a time from a base point.

Each point is one ``gmeta bench step --full`` run (the fixed meta-step of ``gmeta bench meta``
with a sharded table, hybrid and naive, under ``horovodrun``); this reports the hybrid figures:
ms per step, samples/s over all workers, bytes each worker hands to collectives per step, and the
table's memory per worker with its row-optimizer slots (Adagrad: one slot). So a user can size a
job: the rows a worker can hold, and what T, S and the dimension cost. More workers than the
machine has cores are not measured; ``gmeta bench projection`` models them. The table goes to
stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BASE = {"np": 2, "rows": 1_000_000, "dim": 32, "tasks": 32, "support": 64}
#: the factors varied (the base value is measured once, in the base row)
SWEEP = {"tasks": (16, 64), "support": (32, 128), "dim": (16, 64), "rows": (100_000, 10_000_000), "np": (1, 3)}


def add_arguments(p) -> None:
    p.add_argument("--steps", type=int, default=15, help="timed steps per point")
    p.add_argument("--timeout", type=int, default=900, help="seconds per point")
    p.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")


def points() -> list:
    """(label, settings) of the base point and each factor's other values."""
    out = [("base", dict(BASE))]
    for key, values in SWEEP.items():
        out += [(f"{key}={v:,}", {**BASE, key: v}) for v in values]
    return out


def measure(settings: dict, steps: int, timeout: int) -> dict:
    gmeta = Path(sys.executable).parent / "gmeta"
    cmd = [str(gmeta), "bench", "step", "--full", "--json", "--steps", str(steps), "--warmup", "2",
           *[a for k, v in settings.items() for a in (f"--{k}", str(v))]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"gmeta bench scaling: {' '.join(cmd[1:])} failed ({proc.returncode})")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"ms_per_step": r["hybrid_ms"], "samples_per_s": r["hybrid_samples_per_s"],
            "bytes_per_step": r["hybrid_bytes_per_step"], "table_mb_per_worker": r["hybrid_memory_bytes"] / 2**20,
            "naive_ms_per_step": r["naive_ms"]}


def format_table(rows: list) -> str:
    lines = [f"{'point':<16}{'workers':>8}{'T':>5}{'S':>5}{'dim':>5}{'rows':>12}{'ms/step':>9}{'samples/s':>11}"
             f"{'KB/step':>9}{'table MB/worker':>17}"]
    for label, s, r in rows:
        lines.append(f"{label:<16}{s['np']:>8}{s['tasks']:>5}{s['support']:>5}{s['dim']:>5}{s['rows']:>12,}"
                     f"{r['ms_per_step']:>9.1f}{r['samples_per_s']:>11,.0f}{r['bytes_per_step'] / 1e3:>9.0f}"
                     f"{r['table_mb_per_worker']:>17,.0f}")
    return "\n".join(lines)


def main(args) -> int:
    rows = []
    for label, settings in points():
        result = measure(settings, args.steps, args.timeout)
        rows.append((label, settings, result))
        print(f"  {label}: {result['ms_per_step']:.1f} ms/step", file=sys.stderr, flush=True)
    print(format_table(rows), file=sys.stderr, flush=True)
    print(json.dumps({"bench": "scaling", "base": BASE,
                      "points": [{"point": label, **s, **r} for label, s, r in rows]}, sort_keys=True), flush=True)
    return 0
