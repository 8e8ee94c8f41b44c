"""``gmeta train``: meta-train a zoo model on a Meta-IO dataset, evaluate, log to MLflow.

Run on one process, or on many with ``horovodrun -np N -H host:N --gloo gmeta train ...``.
The last line printed (rank 0) is one JSON object: per evaluation split, the adapted and
unadapted query AUC (and the generator's oracle AUC when the dataset carries it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field

from gmeta.trainer.launch import run_guarded


@dataclass(frozen=True)
class TrainConfig:
    model: str
    data: str
    epochs: int = 3
    tasks_per_batch: int = 32
    support_size: int = 40
    query_size: int = 10
    meta: str = "maml"
    inner_steps: int = 1
    eval_inner_steps: int = -1         # -1: same as inner_steps
    inner_lr: float = 0.5
    outer_lr: float = 1e-2
    first_order: bool = False
    meta_sgd: bool = False
    task_loop: bool = False
    parallel: str = "hybrid"           # hybrid | naive | sok | auto
    input_sharding: str = "units"      # units | replicated (see make_train_input)
    emb_dim: int = 16
    hidden: tuple = (64, 64)
    target: str = "auto"
    emb_optimizer: str = "adagrad"
    emb_lr: float = 0.2
    generator_epochs: int = 2          # metaemb phase 2
    seed: int = 0
    eval_splits: tuple = ()
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "gmeta"
    run_name: str = ""
    output_dir: str = "runs"
    log_every: int = 20
    comm: str = "auto"
    extra: dict = field(default_factory=dict, hash=False)

    def validate(self) -> "TrainConfig":
        from gmeta.models.registry import MODELS

        checks = [
            (self.model in MODELS, f"--model {self.model!r} is not in the zoo; choose one of {sorted(MODELS)}"),
            (self.epochs >= 0, "--epochs must be >= 0"),
            (self.tasks_per_batch >= 1, "--tasks-per-batch must be >= 1"),
            (self.support_size >= 1, "--support-size must be >= 1"),
            (self.query_size >= 1, "--query-size must be >= 1"),
            (self.parallel in ("hybrid", "naive", "sok", "auto"), "--parallel must be hybrid, naive, sok or auto"),
            (self.input_sharding in ("units", "replicated"), "--input-sharding must be units or replicated"),
            (self.emb_dim >= 1, "--emb-dim must be >= 1"),
            (all(h >= 1 for h in self.hidden), "--hidden sizes must be >= 1"),
            (self.emb_lr > 0, "--emb-lr must be > 0"),
            (self.generator_epochs >= 0, "--generator-epochs must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    def meta_config(self):
        from gmeta.trainer.meta_learner import MetaConfig

        return MetaConfig(meta=self.meta, inner_steps=self.inner_steps, inner_lr=self.inner_lr,
                          first_order=self.first_order, meta_sgd=self.meta_sgd,
                          task_loop=self.task_loop, outer_lr=self.outer_lr).validate()

    def model_config(self):
        from gmeta.models.base import ModelConfig

        return ModelConfig(emb_dim=self.emb_dim, hidden=self.hidden, target=self.target,
                           seed=self.seed, extra=dict(self.extra))

    def reader_kwargs(self) -> dict:
        return {"tasks_per_batch": self.tasks_per_batch, "support_size": self.support_size,
                "query_size": self.query_size}


def _parse_extra(items) -> dict:
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--extra expects key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def add_arguments(p) -> None:
    d = TrainConfig(model="", data="")
    p.add_argument("--model", required=True, help="zoo model: melu, maml_dnn, maml_esmm, metaemb")
    p.add_argument("--data", required=True, help="dataset directory (local or hdfs://) with schema.json")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--tasks-per-batch", type=int, default=d.tasks_per_batch, help="tasks per worker per step (T)")
    p.add_argument("--support-size", type=int, default=d.support_size, help="support rows per task (S), padded/capped")
    p.add_argument("--query-size", type=int, default=d.query_size, help="query rows per task (Q), padded/capped")
    p.add_argument("--meta", choices=("maml", "none"), default=d.meta,
                   help="maml, or none: the same network trained plainly (the non-meta baseline)")
    p.add_argument("--inner-steps", type=int, default=d.inner_steps)
    p.add_argument("--eval-inner-steps", type=int, default=d.eval_inner_steps)
    p.add_argument("--inner-lr", type=float, default=d.inner_lr)
    p.add_argument("--outer-lr", type=float, default=d.outer_lr, help="Adam learning rate of dense meta-parameters")
    p.add_argument("--first-order", action="store_true", help="first-order MAML (no second derivatives)")
    p.add_argument("--meta-sgd", action="store_true", help="learn the inner learning rate per parameter")
    p.add_argument("--task-loop", action="store_true", help="adapt tasks one by one (DMAML-style baseline)")
    p.add_argument("--parallel", default=d.parallel, choices=("hybrid", "naive", "sok", "auto"),
                   help="embeddings: hybrid (row-sharded, AlltoAll), naive (replicated, dense allreduce), sok (GPU)")
    p.add_argument("--input-sharding", default=d.input_sharding, choices=("units", "replicated"),
                   help="units: each worker reads its own stripes (default, scales I/O); replicated: every "
                        "worker reads all data and takes its slice of each global batch, so results do not "
                        "depend on the number of workers (costs N x decoding)")
    p.add_argument("--emb-dim", type=int, default=d.emb_dim)
    p.add_argument("--hidden", default=",".join(map(str, d.hidden)), help="MLP sizes, comma separated")
    p.add_argument("--target", default=d.target, help="label to fit for single-head models: auto, click, rating")
    p.add_argument("--emb-optimizer", default=d.emb_optimizer, choices=("sgd", "adagrad", "adam"))
    p.add_argument("--emb-lr", type=float, default=d.emb_lr)
    p.add_argument("--generator-epochs", type=int, default=d.generator_epochs, help="metaemb phase 2 epochs")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-splits", default="", help="comma separated; default: every split but train")
    p.add_argument("--tracking-uri", default=d.tracking_uri, help="MLflow tracking URI; 'none' disables tracking")
    p.add_argument("--experiment", default=d.experiment)
    p.add_argument("--run-name", default=d.run_name)
    p.add_argument("--output-dir", default=d.output_dir, help="where the model export is written")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--comm", default=d.comm, choices=("auto", "horovod", "local"))
    p.add_argument("--extra", action="append", metavar="KEY=VALUE", help="model-specific hyper-parameter")


def config_from_args(args) -> TrainConfig:
    try:
        hidden = tuple(int(h) for h in args.hidden.split(",") if h.strip())
    except ValueError:
        raise ValueError(f"--hidden expects comma separated integers, got {args.hidden!r}") from None
    return TrainConfig(
        model=args.model, data=args.data, epochs=args.epochs, tasks_per_batch=args.tasks_per_batch,
        support_size=args.support_size, query_size=args.query_size, meta=args.meta,
        inner_steps=args.inner_steps, eval_inner_steps=args.eval_inner_steps, inner_lr=args.inner_lr,
        outer_lr=args.outer_lr, first_order=args.first_order, meta_sgd=args.meta_sgd,
        task_loop=args.task_loop, parallel=args.parallel, input_sharding=args.input_sharding, emb_dim=args.emb_dim, hidden=hidden,
        target=args.target, emb_optimizer=args.emb_optimizer, emb_lr=args.emb_lr,
        generator_epochs=args.generator_epochs, seed=args.seed,
        eval_splits=tuple(s for s in args.eval_splits.split(",") if s),
        tracking_uri=None if args.tracking_uri.lower() == "none" else args.tracking_uri,
        experiment=args.experiment, run_name=args.run_name, output_dir=args.output_dir,
        log_every=args.log_every, comm=args.comm, extra=_parse_extra(args.extra),
    ).validate()


def main(args) -> int:
    return run_guarded(lambda: train(config_from_args(args)) and 0)


class _Log:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[gmeta] {message}", file=sys.stderr, flush=True)


def train(cfg: TrainConfig) -> dict:
    import tensorflow as tf

    from gmeta.io.schema import Schema
    from gmeta.models.registry import build_model
    from gmeta.trainer.comm import init_communicator
    from gmeta.trainer.evaluation import evaluate_splits, evaluation_splits
    from gmeta.trainer.export import export_model
    from gmeta.trainer.meta_learner import MetaLearner
    from gmeta.trainer.setup import build_embedding
    from gmeta.trainer.tracking import Tracker

    tf.random.set_seed(cfg.seed)
    comm = init_communicator(cfg.comm)
    is_chief = comm.rank == 0
    log = _Log(is_chief)
    schema = Schema.load(cfg.data)
    splits = evaluation_splits(schema, cfg.eval_splits)
    model = build_model(cfg.model, schema, cfg.model_config())
    embedding = build_embedding(model, comm, mode=cfg.parallel, optimizer=cfg.emb_optimizer,
                                learning_rate=cfg.emb_lr, seed=cfg.seed)
    learner = MetaLearner(model, embedding, comm, cfg.meta_config())
    comm.broadcast_variables(learner.dense_variables)
    reader = TrainInput(cfg, comm)
    steps = reader.steps_per_epoch
    log(f"model {cfg.model} ({cfg.meta}), {comm.size} worker(s), parallel={cfg.parallel}, "
        f"{steps} steps/epoch x {cfg.epochs} epochs, T={cfg.tasks_per_batch} S={cfg.support_size} "
        f"Q={cfg.query_size}")

    tracker = Tracker(cfg.tracking_uri, cfg.experiment, cfg.run_name or None, enabled=is_chief)
    try:
        tracker.log_params({**_config_dict(cfg), "workers": comm.size, "steps_per_epoch": steps})
        history = _fit(learner, reader, cfg, comm, log, tracker)
        if getattr(model, "phases", ()) and cfg.meta == "maml" and cfg.generator_epochs > 0:
            history["generator"] = _fit_generator(learner, reader, cfg, comm, log, tracker)
        if hasattr(model, "generate_for"):
            model.generate_for = "cold" if history.get("generator") else "none"
        eval_steps = cfg.inner_steps if cfg.eval_inner_steps < 0 else cfg.eval_inner_steps
        results = evaluate_splits(learner, cfg.data, splits, comm, cfg.reader_kwargs(), eval_steps, log)
        tracker.log_metrics({s: {k: v for k, v in r.items() if v is not None} for s, r in results.items()})
        comm_stats = history.pop("comm_per_step")
        tracker.log_metrics({"comm_per_step": comm_stats})
        run_dir = os.path.join(cfg.output_dir, tracker.run_id or time.strftime("local-%Y%m%d-%H%M%S"))
        export_dir = export_model(learner, _config_dict(cfg), os.path.join(run_dir, "model"), is_chief)
        if is_chief:
            tracker.log_dict(results, "eval_results.json")
            model_uri = tracker.log_model(export_dir)
            _print_summary(results, comm_stats, history, tracker.run_id, model_uri, export_dir)
            print(json.dumps(results, sort_keys=True), flush=True)
        tracker.finish()
    except BaseException:
        tracker.finish("FAILED")
        raise
    comm.barrier()
    return results


def _config_dict(cfg: TrainConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["hidden"] = list(cfg.hidden)
    d["eval_splits"] = list(cfg.eval_splits)
    return d


def _fit(learner, reader, cfg, comm, log, tracker) -> dict:
    """The training loop: epochs of meta-steps, progress on rank 0, input-wait accounting."""
    comm.counters.reset()
    step_fn = None
    global_step, wait_s, busy_s = 0, 0.0, 0.0
    history = {"loss": []}
    batches = iter(_all_epochs(reader, cfg.epochs))
    for epoch in range(cfg.epochs):
        epoch_loss, n, t_epoch = 0.0, 0, time.time()
        for _ in range(reader.steps_per_epoch):
            t0 = time.perf_counter()
            batch = next(batches)
            t1 = time.perf_counter()
            if step_fn is None:
                step_fn = learner.compiled_train_step(reader_spec(batch))
            loss = float(step_fn(batch))
            t2 = time.perf_counter()
            if global_step > 0:  # the first step includes tracing
                wait_s += t1 - t0
                busy_s += t2 - t1
            global_step += 1
            epoch_loss += loss
            n += 1
            if cfg.log_every and global_step % cfg.log_every == 0:
                tasks_s = cfg.tasks_per_batch * comm.size * n / max(time.time() - t_epoch, 1e-9)
                log(f"epoch {epoch} step {n}/{reader.steps_per_epoch} loss {loss:.4f} "
                    f"({tasks_s:,.0f} tasks/s over {comm.size} worker(s))")
        mean = epoch_loss / max(n, 1)
        history["loss"].append(mean)
        if epoch == 0:
            _log_input_stats(reader.stats, cfg, log)
        tracker.log_metrics({"train_loss": mean, "epoch_seconds": time.time() - t_epoch}, step=epoch)
        log(f"epoch {epoch} done: mean loss {mean:.4f}, {time.time() - t_epoch:.1f} s")
    snap = comm.counters.snapshot()
    history["comm_per_step"] = {k: {"bytes": v["bytes"] / max(global_step, 1),
                                    "calls": v["calls"] / max(global_step, 1)} for k, v in snap.items()}
    history["input_wait_fraction"] = wait_s / max(wait_s + busy_s, 1e-9)
    history["steps"] = global_step
    tracker.log_metrics({"input_wait_fraction": history["input_wait_fraction"]})
    return history


def _all_epochs(reader, epochs: int):
    """Every epoch's batches as one prefetched stream, so the next epoch's reading (shuffle
    buffer fill, first stripes) overlaps the last steps of the current one."""
    import tensorflow as tf

    if epochs == 0:
        return []
    ds = reader.dataset(epoch=0)
    for epoch in range(1, epochs):
        ds = ds.concatenate(reader.dataset(epoch=epoch))
    return ds.prefetch(tf.data.AUTOTUNE)


def _log_input_stats(stats: dict, cfg, log) -> None:
    """Say what padding and capping did to the data (rank 0's share), once."""
    dropped_s, dropped_q = stats.get("support_rows_dropped", 0), stats.get("query_rows_dropped", 0)
    log(f"input (this worker, epoch 0): {stats.get('tasks_read', 0):,} tasks, {stats.get('rows_read', 0):,} rows; "
        f"capped {stats.get('truncated_tasks', 0):,} tasks (dropped {dropped_s:,} support rows beyond "
        f"S={cfg.support_size} and {dropped_q:,} query rows beyond Q={cfg.query_size}); "
        f"{stats.get('tasks_without_query', 0):,} tasks had no query rows")


def _fit_generator(learner, reader, cfg, comm, log, tracker) -> list:
    """MetaEmb phase 2: train the ID-embedding generator with the base model frozen."""
    import numpy as np

    from gmeta.models.metaemb import GeneratorTrainer

    model = learner.model
    trainer = GeneratorTrainer(model, learner, learning_rate=cfg.outer_lr)
    seen = set()
    losses = []
    for epoch in range(cfg.generator_epochs):
        total, n = 0.0, 0
        for batch in reader.dataset(epoch=cfg.epochs + epoch):
            if epoch == 0:
                for part in ("support", "query"):
                    ids = batch[part][model.item_feature].numpy()[batch[part]["mask"].numpy() > 0]
                    seen.update(np.unique(ids).tolist())
            total += float(trainer.compiled(reader_spec(batch))(batch))
            n += 1
        losses.append(total / max(n, 1))
        tracker.log_metrics({"generator_loss": losses[-1]}, step=epoch)
        log(f"metaemb generator epoch {epoch}: loss {losses[-1]:.4f}")
    all_seen = sorted(set().union(*comm.allgather_object(sorted(seen))))
    model.set_seen_items(np.array(all_seen, np.int64))
    log(f"metaemb: {len(all_seen)} items seen in training; unseen items get generated embeddings")
    return losses


class TrainInput:
    """The training batches of this rank.

    ``units``: the reader shards (file, stripe) units over ranks; the global batch of a step is
    whatever the ranks' shuffles put together, so results vary with the number of workers the
    way any data order does. ``replicated``: every rank reads the whole split as one reader with
    ``T x N`` tasks per batch and keeps rows ``[rank*T, (rank+1)*T)``; the global batch sequence
    is then identical for any N, which makes N-worker training reproduce 1-worker training.
    """

    def __init__(self, cfg, comm):
        from gmeta.io.reader import MetaReader

        kwargs = cfg.reader_kwargs()
        self.slice = None
        if cfg.input_sharding == "replicated" and comm.size > 1:
            kwargs["tasks_per_batch"] *= comm.size
            self.reader = MetaReader(cfg.data, split="train", rank=0, world_size=1, shuffle=True,
                                     seed=cfg.seed, **kwargs)
            self.slice = (comm.rank * cfg.tasks_per_batch, (comm.rank + 1) * cfg.tasks_per_batch)
        else:
            self.reader = MetaReader(cfg.data, split="train", rank=comm.rank, world_size=comm.size,
                                     shuffle=True, seed=cfg.seed, **kwargs)
        self.steps_per_epoch = self.reader.steps_per_epoch
        self.stats = self.reader.stats

    def dataset(self, epoch: int):
        ds = self.reader.dataset(epoch=epoch)
        if self.slice is None:
            return ds
        import tensorflow as tf

        lo, hi = self.slice
        return ds.map(lambda b: tf.nest.map_structure(lambda t: t[lo:hi], b))


def reader_spec(batch):
    import tensorflow as tf

    return tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), batch)


def _print_summary(results, comm_stats, history, run_id, model_uri, export_dir) -> None:
    out = sys.stderr
    print("\nsplit            metric        adapted  unadapted  oracle", file=out)
    for split, r in results.items():
        for key in sorted(k[:-len("_adapted")] for k in r if k.endswith("_adapted")):
            fmt = lambda v: "   -   " if v is None else f"{v:.4f}"  # noqa: E731
            print(f"{split:<16} {key:<12} {fmt(r.get(key + '_adapted')):>8} "
                  f"{fmt(r.get(key + '_unadapted')):>9} {fmt(r.get(key + '_oracle')):>7}", file=out)
    per_step = ", ".join(f"{k} {v['bytes'] / 1e6:.3f} MB/{v['calls']:.0f} calls"
                         for k, v in comm_stats.items() if v["calls"])
    print(f"communication per step: {per_step or 'none'}", file=out)
    print(f"input wait: {100 * history['input_wait_fraction']:.1f}% of step time", file=out)
    if run_id:
        print(f"mlflow run: {run_id}  model: {model_uri}", file=out)
    print(f"export: {export_dir}", file=out, flush=True)
