"""Where one meta-step's time goes, from a TensorFlow profiler trace (not guesses).

Runs the ``gmeta bench step --full`` problem (hybrid tables, 2 workers under horovodrun), traces
``--steps`` steps on rank 0 with the TensorFlow profiler (op-level host tracing) and adds up the
op time by the stage name scopes of ``MetaLearner.train_step``: lookup (+ AlltoAll), inner loop,
query loss, outer backward (every ``gradient_tape/`` op), allreduce, optimizer; Horovod's
collective ops are also summed on their own. Op time is summed over TensorFlow's threads; the
wall time per step and the Python-side time (the step's wall time minus the time inside the
traced function) come from the same trace. The table goes to stderr; the last stdout line is one
JSON object (``stages`` as fractions of op time).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from gmeta.tools.bench.step import BenchStepConfig, full_batch, full_learner
from gmeta.trainer.meta.learner import batch_spec
from gmeta.trainer.parallel.comm import init_communicator
from gmeta.trainer.parallel.launch import horovodrun_command, horovodrun_env

STAGES = ("lookup", "inner_loop", "query_loss", "allreduce", "optimizer")


def add_arguments(p) -> None:
    p.add_argument("--rows", type=int, default=1_000_000, help="embedding table rows")
    p.add_argument("--steps", type=int, default=5, help="traced steps")
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")


def stage_of(op_name: str) -> str:
    """The stage of a traced op ``scope/.../name:Type`` (``other`` outside the step's scopes)."""
    path = op_name.split(":", 1)[0]
    outer_tape = path.startswith("gradient_tape/") or (
        "/gradient_tape/" in path and path.split("/", 1)[0] not in STAGES)  # (the inner loop has its own tape)
    if outer_tape:
        return "outer_backward"
    parts = path.split("/")
    for part in parts[:4]:  # the step's own scopes sit under the function's outer scopes
        if part in STAGES:
            return part
    return "other"


def summarize_trace(xplane_path: str, steps: int) -> dict:
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    space.ParseFromString(Path(xplane_path).read_bytes())
    stage_ps = dict.fromkeys((*STAGES, "outer_backward", "other"), 0)
    horovod_ps = function_ps = 0
    for plane in space.planes:
        meta = plane.event_metadata
        for line in plane.lines:
            for e in line.events:
                name = meta[e.metadata_id].name
                if line.name == "python" or not line.name.startswith("tf_"):
                    if name.startswith("EagerLocalExecute: __inference_train_step"):
                        function_ps += e.duration_ps
                    continue
                if ":" not in name or name.startswith(("ExecutorState", "Threadpool", "Executor")):
                    continue
                stage_ps[stage_of(name)] += e.duration_ps
                if "Horovod" in name:
                    horovod_ps += e.duration_ps
    total = sum(stage_ps.values()) or 1
    return {"op_ms_per_step": round(total / 1e9 / steps, 2),
            "function_ms_per_step": round(function_ps / 1e9 / steps, 2),
            "stages": {k: round(v / total, 4) for k, v in stage_ps.items()},
            "horovod_ops_fraction": round(horovod_ps / total, 4)}


def main(args) -> int:
    cfg = BenchStepConfig(np=2, rows=args.rows, dim=32, batch_ids=32 * 74 * 4, steps=args.steps, warmup=2,
                          optimizer="adagrad", zipf=1.2, seed=0, timeout=args.timeout, json_only=True,
                          full=True).validate()
    out_dir = tempfile.mkdtemp(prefix="gmeta_bench_breakdown_")
    cmd = horovodrun_command(2, [sys.executable, "-m", "gmeta.tools.bench.breakdown", "--worker", out_dir,
                                 "--config", json.dumps(asdict(cfg))])
    env = horovodrun_env()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"gmeta bench breakdown: horovodrun failed ({proc.returncode})")
        result = json.loads(Path(out_dir, "rank0.json").read_text())
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    result.update({"bench": "breakdown", "rows": args.rows, "steps": args.steps})
    python_ms = max(0.0, result["wall_ms_per_step"] - result["function_ms_per_step"])
    result["python_fraction_of_wall"] = round(python_ms / result["wall_ms_per_step"], 4)
    err = sys.stderr
    print(f"one meta-step, rank 0 of 2, table {args.rows:,} x 32, {args.steps} traced steps: wall "
          f"{result['wall_ms_per_step']} ms, inside the traced step {result['function_ms_per_step']} ms, "
          f"op time (all threads) {result['op_ms_per_step']} ms", file=err)
    for stage, fraction in sorted(result["stages"].items(), key=lambda kv: -kv[1]):
        print(f"  {stage:<16}{100 * fraction:6.1f}% of op time", file=err)
    print(f"  Horovod ops {100 * result['horovod_ops_fraction']:.1f}% of op time; Python outside the step "
          f"{100 * result['python_fraction_of_wall']:.1f}% of wall time", file=err)
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


def _worker(out_dir: str, config: dict) -> int:
    import tensorflow as tf

    cfg = BenchStepConfig(**config)
    comm = init_communicator("horovod")
    batches = [tf.nest.map_structure(tf.constant, full_batch(cfg, comm.rank, s)) for s in range(cfg.warmup + cfg.steps)]
    learner = full_learner(cfg, comm, "hybrid")
    step = learner.compiled_train_step(batch_spec(batches[0]))
    for b in batches[:cfg.warmup]:
        float(step(b)["loss"])
    trace_dir = os.path.join(out_dir, f"trace{comm.rank}")
    if comm.rank == 0:
        tf.profiler.experimental.start(trace_dir, options=tf.profiler.experimental.ProfilerOptions(
            host_tracer_level=3, python_tracer_level=0))
    comm.barrier()
    t0 = time.perf_counter()
    for b in batches[cfg.warmup:]:
        float(step(b)["loss"])
    wall = (time.perf_counter() - t0) / cfg.steps
    comm.barrier()
    if comm.rank == 0:
        tf.profiler.experimental.stop()
        (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        result = summarize_trace(path, cfg.steps)
        result["wall_ms_per_step"] = round(wall * 1e3, 2)
        Path(out_dir, "rank0.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    from gmeta.tools.common import worker_main

    worker_main("gmeta.tools.bench.breakdown", _worker)
