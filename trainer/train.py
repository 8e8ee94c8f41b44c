"""``gmeta train``: meta-train a zoo model on a Meta-IO dataset, evaluate, log to MLflow.

Run on one process, or on many with ``horovodrun -np N -H host:N --gloo gmeta train ...``.
The last line printed (rank 0) is one JSON object: per evaluation split, the adapted and
unadapted query AUC (and the generator's oracle AUC when the dataset carries it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field

from gmeta.trainer.parallel.launch import collective_aborted, run_guarded


AUTO = "auto"
AUTO_SIZE_PERCENTILE = 95  # --support-size/--query-size auto: this percentile of the real sizes
AUTO_MIN_STEPS = 320       # --epochs auto: enough epochs for this many optimizer steps ...
AUTO_MIN_EPOCHS = 3        # ... and at least this many


@dataclass(frozen=True)
class TrainConfig:
    model: str
    data: str
    epochs: object = AUTO              # int, or "auto": resolved from the steps per epoch (auto_epochs)
    tasks_per_batch: int = 32
    support_size: object = AUTO        # int, or "auto": resolved from the dataset's index
    query_size: object = AUTO
    meta: str = "maml"
    inner_steps: int = 1
    eval_inner_steps: int = -1         # -1: same as inner_steps
    inner_lr: float = 1.0
    outer_lr: float = 1e-2
    first_order: bool = False
    meta_sgd: bool = False
    task_loop: bool = False
    clip_norm: float = 0.0             # outer loop: global norm of the dense meta-gradient; 0 = off
    inner_clip: float = 0.0            # inner loop: per-task gradient norm; 0 = off
    inner_solver: str = "ridge"        # gradient | ridge (closed form for pref and bias)
    ridge_lambda: float = 1.0          # ridge: initial penalty (learned)
    plain_loss_weight: float = 1.0     # outer loss += this x the unadapted loss on all rows
    early_stopping: int = 10           # patience in epochs on the validation GAUC; the best epoch is kept; 0: off
    loss_rise_tolerance: float = 0.5   # stop when an epoch's mean loss rises by more; inf = never
    plain_baseline: str = "alongside"  # alongside | off | an export dir, models:/ URI or run id
    parallel: str = "hybrid"           # hybrid | naive | sok | auto
    input_sharding: str = "units"      # units | replicated (see TrainInput)
    tiering: str = "off"               # off | auto | BUDGET bytes per worker of replicated hot rows
    hot_sync: str = "auto"             # auto | sparse | dense (gmeta.trainer.embedding.tiered)
    profile_dir: str = ""              # "": DATA/_profile (gmeta profile)
    emb_dim: int = 16
    hidden: tuple = (64, 64)
    adapt: tuple = ("auto",)           # what the inner loop adapts (gmeta.models.base.ADAPT_PARTS)
    item_prior: bool = True            # the item's smoothed training mean added to the output
    target: str = "auto"
    emb_optimizer: str = "adagrad"
    emb_lr: float = 0.2
    generator_epochs: int = 2          # metaemb phase 2
    seed: int = 0
    eval_splits: tuple = ()
    validation_split: str = AUTO       # evaluated after every epoch; auto: "val" when the data has it
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "gmeta"
    run_name: str = ""
    output_dir: str = "runs"
    log_every: int = 20
    comm: str = "auto"
    checkpoint_dir: str = ""           # "": <output_dir>/<run>/checkpoints; "none": no checkpoints
    checkpoint_every_steps: int = 0    # also every N global steps (0: only at epoch ends)
    checkpoint_every_secs: float = 0.0 # also when S seconds passed since the last one (0: off)
    keep_checkpoints: int = 3          # newest committed checkpoints kept (0: all)
    resume: bool = False               # continue from the newest checkpoint (gmeta.trainer.checkpoint.store)
    init_from: str = ""                # a new run starting from trained weights (export, models:/, run id, checkpoint)
    register_as: str = ""              # NAME[@ALIAS]: register the logged model at the end (gmeta register)
    saved_model: bool = True           # export the serving SavedModel (and log the MLflow model)
    results_json: str = ""             # also write the final report to this file
    support_curve: str = "0,1,2,5,10,20,all"  # support rows per task for the GAUC curve; "none": off
    stop_grace_secs: float = 4.0       # SIGTERM/SIGINT: a rank blocked this long exits anyway
    extra: dict = field(default_factory=dict, hash=False)

    def validate(self) -> "TrainConfig":
        from gmeta.models.registry import MODELS

        checks = [
            (self.model in MODELS, f"--model {self.model!r} is not in the zoo; choose one of {sorted(MODELS)}"),
            (self.epochs == AUTO or self.epochs >= 0, "--epochs must be auto or >= 0"),
            (self.tasks_per_batch >= 1, "--tasks-per-batch must be >= 1"),
            (self.support_size == AUTO or self.support_size >= 1, "--support-size must be auto or >= 1"),
            (self.query_size == AUTO or self.query_size >= 1, "--query-size must be auto or >= 1"),
            (self.parallel in ("hybrid", "naive", "sok", "auto"), "--parallel must be hybrid, naive, sok or auto"),
            (self.input_sharding in ("units", "replicated"), "--input-sharding must be units or replicated"),
            (self.emb_dim >= 1, "--emb-dim must be >= 1"),
            (all(h >= 1 for h in self.hidden), "--hidden sizes must be >= 1"),
            (self.emb_lr > 0, "--emb-lr must be > 0"),
            (self.generator_epochs >= 0, "--generator-epochs must be >= 0"),
            (self.clip_norm >= 0 and self.inner_clip >= 0, "--clip-norm and --inner-clip must be >= 0"),
            (self.loss_rise_tolerance >= 0, "--loss-rise-tolerance must be >= 0 (inf: never stop)"),
            (self.early_stopping >= 0, "--early-stopping must be >= 0 (0: off)"),
            (self.checkpoint_every_steps >= 0 and self.checkpoint_every_secs >= 0 and self.keep_checkpoints >= 0,
             "--checkpoint-every-steps, --checkpoint-every-secs and --keep-checkpoints must be >= 0"),
            (not (self.resume and self.init_from), "--resume continues a run, --init-from starts a new one: give one"),
            (not (self.register_as and not self.saved_model), "--register-as needs the MLflow model: drop --no-saved-model"),
            (not self.register_as or bool(self.tracking_uri and self.register_as.partition("@")[0]),
             "--register-as NAME[@ALIAS] needs a name and MLflow tracking (not --tracking-uri none)"),
            (self.meta == "maml" or self.plain_baseline in ("alongside", "off"),
             "--plain-baseline: a --meta none run is itself the plain network; use off or alongside"),
            (self.stop_grace_secs > 0, "--stop-grace-secs must be > 0"),
            (self.hot_sync in ("auto", "sparse", "dense"), "--hot-sync must be auto, sparse or dense"),
            (self.tiering == "off" or self.parallel in ("hybrid", "auto"),
             f"--tiering replicates hot rows on top of --parallel hybrid; it does not combine with "
             f"--parallel {self.parallel}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.model_config()  # validates --adapt
        self.support_points  # noqa: B018 - parsing validates --support-curve
        self.tiering_budget  # noqa: B018 - parsing validates --tiering
        return self

    @property
    def tiering_budget(self):
        """None (off), -1 (auto) or bytes per worker."""
        from gmeta.trainer.embedding.tiering import parse_budget

        return parse_budget(self.tiering)

    @property
    def support_points(self) -> tuple:
        from gmeta.trainer.evaluation.support_curve import parse_points

        return parse_points(self.support_curve)

    def meta_config(self, meta: str | None = None):
        from gmeta.trainer.meta.learner import MetaConfig

        return MetaConfig(meta=meta or self.meta, inner_steps=self.inner_steps, inner_lr=self.inner_lr,
                          first_order=self.first_order, meta_sgd=self.meta_sgd and (meta or self.meta) == "maml",
                          task_loop=self.task_loop, outer_lr=self.outer_lr, clip_norm=self.clip_norm,
                          inner_clip=self.inner_clip, plain_weight=self.plain_loss_weight,
                          inner_solver=self.inner_solver, ridge_lambda=self.ridge_lambda).validate()

    def model_config(self):
        from gmeta.models.base import ModelConfig

        return ModelConfig(emb_dim=self.emb_dim, hidden=self.hidden, target=self.target,
                           seed=self.seed, adapt=tuple(self.adapt), item_prior=self.item_prior,
                           extra=dict(self.extra))

    def reader_kwargs(self) -> dict:
        if AUTO in (self.support_size, self.query_size):
            raise RuntimeError("support/query sizes are still 'auto'; call resolve_sizes first")
        return {"tasks_per_batch": self.tasks_per_batch, "support_size": self.support_size,
                "query_size": self.query_size}

    @property
    def eval_steps(self) -> int:
        return self.inner_steps if self.eval_inner_steps < 0 else self.eval_inner_steps


def resolve_sizes(cfg: TrainConfig, log) -> TrainConfig:
    """Turn ``auto`` support/query caps into the AUTO_SIZE_PERCENTILE-th percentile of the training
    split's real sizes (from the dataset's index, identical on every rank) and say what it caps."""
    if AUTO not in (cfg.support_size, cfg.query_size):
        return cfg
    import numpy as np

    from gmeta.io.plan import task_sizes

    support, query = task_sizes(cfg.data, "train")
    sizes = {}
    for flag, name, real, value in (("--support-size", "support_size", support, cfg.support_size),
                                    ("--query-size", "query_size", query, cfg.query_size)):
        if value == AUTO:
            value = max(1, int(np.ceil(np.percentile(real, AUTO_SIZE_PERCENTILE)))) if real.size else 1
            capped = int((real > value).sum())
            log(f"{flag} auto = {value} (p{AUTO_SIZE_PERCENTILE} of {real.size:,} training tasks, max "
                f"{int(real.max()) if real.size else 0}); {capped:,} tasks have more rows and are capped")
        sizes[name] = value
    return dataclasses.replace(cfg, **sizes)


def auto_epochs(steps_per_epoch: int) -> int:
    """``--epochs auto``: at least AUTO_MIN_EPOCHS epochs and AUTO_MIN_STEPS optimizer steps, so a
    small dataset (a few hundred users, a few steps per epoch) trains as long as a large one."""
    return max(AUTO_MIN_EPOCHS, -(-AUTO_MIN_STEPS // max(int(steps_per_epoch), 1)))


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


def _size(text: str):
    if text == AUTO:
        return AUTO
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer, got {text!r}") from None


def add_arguments(p) -> None:
    from gmeta.models.registry import MODELS
    from gmeta.trainer.tracking.mlflow_run import add_tracking_arguments

    d = TrainConfig(model="", data="")
    p.add_argument("--model", required=True, choices=sorted(MODELS), help="zoo model")
    p.add_argument("--data", required=True, help="dataset directory (local or hdfs://) with schema.json")
    p.add_argument("--epochs", type=_size, default=d.epochs,
                   help=f"passes over the training tasks; auto: enough for {AUTO_MIN_STEPS} optimizer steps, "
                        f"at least {AUTO_MIN_EPOCHS}")
    p.add_argument("--tasks-per-batch", type=int, default=d.tasks_per_batch, help="tasks per worker per step (T)")
    p.add_argument("--support-size", type=_size, default=d.support_size,
                   help=f"support rows per task (S), padded/capped; auto: the p{AUTO_SIZE_PERCENTILE} of the "
                        "training tasks' support sizes")
    p.add_argument("--query-size", type=_size, default=d.query_size,
                   help="query rows per task (Q), padded/capped; auto as for --support-size")
    p.add_argument("--meta", choices=("maml", "none"), default=d.meta,
                   help="maml, or none: the same network trained plainly (the non-meta baseline)")
    p.add_argument("--inner-steps", type=int, default=d.inner_steps)
    p.add_argument("--eval-inner-steps", type=int, default=d.eval_inner_steps, help="-1: same as --inner-steps")
    p.add_argument("--inner-lr", type=float, default=d.inner_lr)
    p.add_argument("--outer-lr", type=float, default=d.outer_lr, help="Adam learning rate of dense meta-parameters")
    p.add_argument("--first-order", action="store_true", help="first-order MAML (no second derivatives)")
    p.add_argument("--meta-sgd", action="store_true", help="learn the inner learning rate per parameter")
    p.add_argument("--task-loop", action="store_true", help="adapt tasks one by one (DMAML-style baseline)")
    p.add_argument("--clip-norm", type=float, default=d.clip_norm,
                   help="clip the dense meta-gradient to this global norm (0: off)")
    p.add_argument("--inner-clip", type=float, default=d.inner_clip,
                   help="clip each task's inner-loop gradient to this norm (0: off)")
    p.add_argument("--inner-solver", default=d.inner_solver, choices=("gradient", "ridge"),
                   help="how the inner loop adapts the terms the output is linear in (pref, bias): gradient "
                        "steps at --inner-lr, or ridge: a Newton step of the support loss plus a learned ridge "
                        "penalty, solved in closed form (exact in one step for ratings); other adapted parts "
                        "always take gradient steps")
    p.add_argument("--ridge-lambda", type=float, default=d.ridge_lambda,
                   help="--inner-solver ridge: the initial penalty towards the shared values (learned "
                        "per coefficient in the outer loop)")
    p.add_argument("--plain-loss-weight", type=float, default=d.plain_loss_weight,
                   help="add this weight x the unadapted model's loss on support and query rows to the "
                        "meta-objective, so the shared parameters learn from every label as a plain model does")
    p.add_argument("--early-stopping", type=int, default=d.early_stopping, metavar="PATIENCE",
                   help="with a validation split: keep the weights of the epoch with the best validation GAUC "
                        "(adapted for the model, unadapted for the plain network alongside) as the run's model, "
                        "and stop once none improved for this many epochs; 0: off (the last epoch is the model)")
    p.add_argument("--loss-rise-tolerance", type=float, default=d.loss_rise_tolerance,
                   help="stop with an error when an epoch's mean training loss exceeds the previous "
                        "epoch's by more than this fraction (inf: never); a NaN loss always stops")
    p.add_argument("--plain-baseline", default=d.plain_baseline, metavar="alongside|off|MODEL",
                   help="the plain network (--meta none) reported next to the model, unadapted and "
                        "fine-tuned with the same inner loop: alongside trains it in the same run on the same "
                        "batches; or an export directory, models:/ URI or run id of an existing --meta none run")
    p.add_argument("--parallel", default=d.parallel, choices=("hybrid", "naive", "sok", "auto"),
                   help="embeddings: hybrid (row-sharded, AlltoAll), naive (replicated, dense allreduce), sok (GPU)")
    p.add_argument("--input-sharding", default=d.input_sharding, choices=("units", "replicated"),
                   help="units: each worker reads its own range of the tasks (scales I/O); replicated: every "
                        "worker reads all data and takes its slice of each global batch, so results do not "
                        "depend on the number of workers (costs N x decoding)")
    p.add_argument("--tiering", default=d.tiering, metavar="off|auto|BUDGET",
                   help="replicate the most looked-up embedding rows on every worker (the rest stay sharded): "
                        "auto (up to 1%% of each table) or a byte budget per worker such as 64M; needs a "
                        "profile (gmeta profile) or profiles the data at start. See README, Tiered embeddings")
    p.add_argument("--hot-sync", default=d.hot_sync, choices=("auto", "sparse", "dense"),
                   help="how hot replicas stay equal: sparse (one allgather of touched rows), dense (in the "
                        "step's fused allreduce); auto picks the one with fewer expected bytes")
    p.add_argument("--profile-dir", default=d.profile_dir,
                   help="where gmeta profile wrote the id profile (default DATA/_profile)")
    p.add_argument("--emb-dim", type=int, default=d.emb_dim)
    p.add_argument("--hidden", default=",".join(map(str, d.hidden)), help="MLP sizes, comma separated")
    p.add_argument("--adapt", default=",".join(d.adapt),
                   help="what the inner loop adapts per task, comma separated: head (every MLP layer), last "
                        "(the output layer), user (the task's user embedding rows as local copies), pref (a "
                        "per-task preference over the item representation), bias (per-task logit scale and bias); "
                        "auto: user,pref,bias (pref,bias when the model has no user input)")
    p.add_argument("--item-prior", action=argparse.BooleanOptionalAction, default=d.item_prior,
                   help="add each item's smoothed mean training label (popularity for clicks, mean rating "
                        "for ratings; items never seen in training: 0) to the model's output, so the network "
                        "learns what popularity does not know")
    p.add_argument("--target", default=d.target, choices=("auto", "click", "rating"),
                   help="label to fit for single-head models (auto: click when present)")
    p.add_argument("--emb-optimizer", default=d.emb_optimizer, choices=("sgd", "adagrad", "adam"))
    p.add_argument("--emb-lr", type=float, default=d.emb_lr)
    p.add_argument("--generator-epochs", type=int, default=d.generator_epochs, help="metaemb phase 2 epochs")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-splits", default="", help="comma separated; default: every split but train")
    p.add_argument("--validation-split", default=d.validation_split,
                   help="split evaluated after every epoch (GAUC adapted logged as val_gauc_adapted; the "
                        "objective of gmeta tune); auto: 'val' when the dataset has it; none: off")
    add_tracking_arguments(p, d.experiment)
    p.add_argument("--run-name", default=d.run_name)
    p.add_argument("--output-dir", default=d.output_dir, help="where the model export is written")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between progress lines and per-step MLflow metrics (0: no lines, one metric point per epoch)")
    p.add_argument("--comm", default=d.comm, choices=("auto", "horovod", "local"))
    p.add_argument("--checkpoint-dir", default=d.checkpoint_dir,
                   help="where checkpoints go (local or hdfs://, shared by all workers; default "
                        "<output-dir>/<run id>/checkpoints; none: no checkpoints). One is written at every "
                        "epoch end, and more with the next two flags")
    p.add_argument("--checkpoint-every-steps", type=int, default=d.checkpoint_every_steps,
                   help="also checkpoint every N global steps (0: off)")
    p.add_argument("--checkpoint-every-secs", type=float, default=d.checkpoint_every_secs,
                   help="also checkpoint when S seconds passed since the last one (0: off)")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints,
                   help="newest committed checkpoints to keep (0: all)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest committed checkpoint in --checkpoint-dir (or a ckpt-... "
                        "directory given there; without it, the most recent unfinished run under --output-dir): "
                        "same MLflow run, same data order, any worker count")
    p.add_argument("--init-from", default=d.init_from, metavar="MODEL",
                   help="start a NEW run from trained weights: an export directory, models:/ URI, MLflow run id "
                        "or checkpoint directory; variables and tables are copied by name, the rest keep their "
                        "initial values (logged)")
    p.add_argument("--register-as", default=d.register_as, metavar="NAME[@ALIAS]",
                   help="register the run's model in the MLflow registry at the end of a successful run, "
                        "and point ALIAS at the new version (as gmeta register)")
    p.add_argument("--no-saved-model", dest="saved_model", action="store_false",
                   help="skip the serving SavedModel and the MLflow model (quick experiments, tuning trials)")
    p.add_argument("--results-json", default=d.results_json, metavar="PATH",
                   help="also write the final report (the last stdout line) to this file, without "
                        "horovodrun's rank prefix")
    p.add_argument("--support-curve", default=d.support_curve, metavar="K,K,...",
                   help="support rows per task at which the final report measures GAUC (adapted, unadapted, "
                        "fine-tuned plain network; plotted as support_curve.png); 'all': the whole support set; "
                        "none: off")
    p.add_argument("--stop-grace-secs", type=float, default=d.stop_grace_secs,
                   help="on SIGTERM/SIGINT every rank stops after the current step, checkpoints and marks the "
                        "MLflow run KILLED; a rank still blocked after this many seconds exits anyway "
                        "(horovodrun kills its workers 5 s after its own SIGTERM)")
    p.add_argument("--extra", action="append", metavar="KEY=VALUE", help="model-specific hyper-parameter")


def config_from_args(args) -> TrainConfig:
    """The one place flags become the run's frozen config."""
    try:
        hidden = tuple(int(h) for h in args.hidden.split(",") if h.strip())
    except ValueError:
        raise ValueError(f"--hidden expects comma separated integers, got {args.hidden!r}") from None
    special = {"hidden": hidden, "adapt": tuple(a.strip() for a in args.adapt.split(",") if a.strip()),
               "eval_splits": tuple(s for s in args.eval_splits.split(",") if s),
               "tracking_uri": None if args.tracking_uri.lower() == "none" else args.tracking_uri,
               "extra": _parse_extra(args.extra)}
    values = {f.name: special.get(f.name, getattr(args, f.name)) for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**values).validate()


def main(args) -> int:
    return run_guarded(lambda: train(config_from_args(args)) and 0)


class _Log:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[gmeta] {message}", file=sys.stderr, flush=True)


def train(cfg: TrainConfig, on_epoch=None) -> dict:
    """Meta-train, run the model's extra phases, evaluate against the baselines, export, log.

    ``on_epoch(epoch, report)`` is called on every rank after each epoch with the validation
    split's report (``gmeta.trainer.evaluation.splits``; None without a validation split); it may raise
    to stop the run (e.g. a pruned tuning trial).
    """
    import tensorflow as tf

    from gmeta.io.schema import Schema
    from gmeta.trainer.checkpoint.store import RunCheckpoints
    from gmeta.trainer.parallel.comm import init_communicator
    from gmeta.trainer.evaluation.splits import evaluation_splits
    from gmeta.trainer.tracking.run_info import run_tags
    from gmeta.trainer.run.signals import Stopped, StopSignals
    from gmeta.trainer.tracking.mlflow_run import Tracker, mark_if_running

    tf.random.set_seed(cfg.seed)
    comm = init_communicator(cfg.comm)
    is_chief = comm.rank == 0
    log = _Log(is_chief)
    check_writable(cfg, comm.rank)
    schema = Schema.load(cfg.data)
    splits = evaluation_splits(schema, cfg.eval_splits)
    cfg = resolve_sizes(cfg, log)
    tiering = plan_run_tiering(cfg, schema, comm, log)
    learner = build_learner(cfg, schema, comm, cfg.meta, tiering)
    plain = build_learner(cfg, schema, comm.with_own_counters(), "none", tiering) \
        if cfg.meta == "maml" and cfg.plain_baseline == "alongside" else None
    reader = TrainInput(cfg, comm)
    steps = reader.steps_per_epoch
    if cfg.epochs == AUTO:
        cfg = dataclasses.replace(cfg, epochs=auto_epochs(steps))
        log(f"--epochs auto = {cfg.epochs} ({steps} steps per epoch; at least {AUTO_MIN_STEPS} steps and "
            f"{AUTO_MIN_EPOCHS} epochs)")
    log(f"model {cfg.model} ({cfg.meta}), {comm.size} worker(s), parallel={cfg.parallel}, "
        f"{steps} steps/epoch x {cfg.epochs} epochs, T={cfg.tasks_per_batch} S={cfg.support_size} "
        f"Q={cfg.query_size}" + ("; the plain network trains alongside" if plain else ""))

    checkpoints = RunCheckpoints.open(cfg, comm, log, schema)  # --resume: found and checked here
    tracker = Tracker(cfg.tracking_uri, cfg.experiment, cfg.run_name or None, enabled=is_chief,
                      run_id=checkpoints.mlflow_run_id, fallback_dir=cfg.output_dir,
                      tags=run_tags(comm.size, cfg.model, cfg.meta) if is_chief and cfg.tracking_uri else None)
    # every rank knows the run, so any survivor can end it when the chief cannot (killed, blocked)
    run_uri, run_id = comm.allgather_object((tracker.uri, tracker.run_id))[0] if cfg.tracking_uri else (None, None)

    def on_deadline(_signum):
        if is_chief:
            tracker.mark("KILLED")
        else:
            mark_if_running(run_uri, run_id, "KILLED")

    signals = StopSignals(comm.stop, grace_s=cfg.stop_grace_secs, rank_label=f"rank {comm.rank}",
                          on_deadline=on_deadline)
    with signals:  # (still installed while a failure is recorded: a SIGTERM then changes nothing)
        try:
            results = _run(cfg, comm, log, schema, splits, learner, plain, reader, checkpoints, tracker,
                           signals, on_epoch, steps)
        except Stopped as exc:
            signals.stopping = True
            tracker.finish("KILLED")
            if tracker.run_id:
                exc.args = (f"{exc}; MLflow run {tracker.run_id} marked KILLED",)
            raise
        except BaseException as exc:
            signals.stopping = True
            tracker.finish("FAILED")
            if not is_chief and collective_aborted(exc):
                mark_if_running(run_uri, run_id, "FAILED")
            raise
    comm.barrier()
    return results


def _run(cfg, comm, log, schema, splits, learner, plain, reader, checkpoints, tracker, signals, on_epoch,
         steps) -> dict:
    """The body of ``train`` once the run's MLflow record and signal handling are in place."""
    from gmeta.io.plan import distinct_values
    from gmeta.trainer.run.early_stopping import EarlyStopping
    from gmeta.trainer.evaluation.splits import evaluate_splits, item_baselines
    from gmeta.trainer.serving.export import export_model
    from gmeta.trainer.meta.phases import run_phases
    from gmeta.trainer.evaluation.report import curve_metrics, print_report, save_per_task
    from gmeta.trainer.tracking.run_info import mlflow_dataset
    from gmeta.trainer.run.loop import fit

    is_chief = comm.rank == 0
    if not checkpoints.mlflow_run_id:
        tracker.log_params({**config_dict(cfg), "workers": comm.size, "steps_per_epoch": steps})
        if is_chief and tracker.enabled:
            tracker.log_input(mlflow_dataset(cfg.data, schema), context="training")
    checkpoints.start(tracker.run_id, learner, plain, reader)
    val_split = validation_split(cfg, schema)
    validation = []
    stopper = EarlyStopping(learner, plain, cfg.early_stopping, log) if val_split and cfg.early_stopping else None

    def validate() -> dict:
        report, _ = evaluate_splits(learner, cfg.data, [val_split], comm, cfg.reader_kwargs(),
                                    cfg.eval_steps, lambda m: None, plain=plain, n_boot=0)
        return report[val_split]

    if stopper is not None and checkpoints.resume_point is not None:
        log("WARNING: --early-stopping restarts at the resumed epoch: the best weights of the epochs before "
            "the interruption are not in checkpoints (pass --early-stopping 0 to keep the last epoch instead)")

    def after_epoch(epoch: int) -> bool:
        report, stop = None, False
        if val_split:
            report = validate()
            tracker.log_metrics({f"val_{k}": report[k] for k in ("gauc_adapted", "gauc_unadapted",
                                                                "auc_adapted")}, step=epoch)
            validation.append({"epoch": epoch, "split": val_split,
                               **{k: report[k] for k in ("gauc_adapted", "gauc_unadapted")}})
            log(f"epoch {epoch} validation ({val_split}): GAUC adapted {report['gauc_adapted']}, "
                f"unadapted {report['gauc_unadapted']}")
            stop = stopper.offer(epoch, report) if stopper is not None else False
        if on_epoch is not None:
            on_epoch(epoch, report)
        return stop

    history = fit(learner, reader, cfg, comm, log, tracker, plain=plain, after_epoch=after_epoch,
                  checkpoints=checkpoints, signals=signals)
    if stopper is not None:
        history["best_epoch"] = stopper.restore()
        tracker.log_metrics({f"best_epoch_{k.split()[0]}": v for k, v in history["best_epoch"].items()})
    history.update(run_phases(learner, reader, epochs=cfg.generator_epochs, first_epoch=cfg.epochs,
                              learning_rate=cfg.outer_lr, log=log, tracker=tracker,
                              distinct_values=lambda column: distinct_values(cfg.data, "train", column)))
    if plain is None and cfg.plain_baseline not in ("alongside", "off"):
        plain = load_plain_baseline(cfg.plain_baseline, cfg.tracking_uri)
    baselines = item_baselines(cfg.data, learner.model)
    rows = {}
    results, per_task = evaluate_splits(learner, cfg.data, splits, comm, cfg.reader_kwargs(), cfg.eval_steps,
                                        log, plain=plain, baselines=baselines, rows_out=rows)
    curve = {}
    if cfg.support_points and splits:
        from gmeta.trainer.evaluation.support_curve import support_curve

        curve = support_curve(learner, plain, cfg.data, splits, comm, cfg.reader_kwargs(), cfg.eval_steps,
                              cfg.support_points, log)
        for split, c in curve.items():
            results[split]["support_curve"] = c
    tracker.log_metrics(results)
    for name, value, k in curve_metrics(results, cfg.support_size):
        tracker.log_metrics({name: value}, step=k)
    comm_stats = history.pop("comm_per_step")
    tracker.log_metrics({"comm_per_step": comm_stats})
    run_dir = checkpoints.run_dir
    export_dir = export_model(learner, config_dict(cfg), os.path.join(run_dir, "model"), is_chief,
                              saved_model=cfg.saved_model)
    if is_chief:
        tracker.log_dict(results, "eval_results.json")
        with open(os.path.join(run_dir, "eval_results.json"), "w") as f:  # for gmeta compare
            json.dump(results, f, sort_keys=True)
        tracker.log_artifacts(save_per_task(per_task, os.path.join(run_dir, "per_task")), "per_task")
        tracker.log_artifacts(_plots(history, validation, curve, rows, learner.model,
                                     os.path.join(run_dir, "plots"), log), "plots")
        model_uri = tracker.log_model(export_dir)
        if cfg.register_as:
            _register(cfg, tracker, log)
        print_report(results, sys.stderr)
        _print_run_facts(comm_stats, history, tracker, model_uri, export_dir)
        if cfg.results_json:
            with open(cfg.results_json, "w") as f:
                json.dump(results, f, sort_keys=True)
        print(json.dumps(results, sort_keys=True), flush=True)
    checkpoints.finish()
    tracker.finish()
    return results


def _plots(history, validation, curve, rows, model, directory: str, log) -> str:
    """The run's PNG plots (gmeta.trainer.evaluation.plots); a plot that fails is reported, not fatal."""
    from gmeta.trainer.evaluation import plots

    heads = [k[:-len("/label")] for r in rows.values() if r for k in r if k.endswith("/label")]
    jobs = [("learning_curve.png", lambda p: plots.learning_curve(history, validation, p))]
    if curve:
        jobs.append(("support_curve.png", lambda p: plots.support_curve(curve, p)))
    if heads:
        jobs.append(("calibration.png", lambda p: plots.calibration(rows, heads[0], p,
                                                                     probabilities=model.target != "rating")))
    os.makedirs(directory, exist_ok=True)
    for name, draw in jobs:
        try:
            draw(os.path.join(directory, name))
        except Exception as exc:  # noqa: BLE001 - a plot is never worth a failed run
            log(f"WARNING: plot {name} failed ({type(exc).__name__}: {exc})")
    return directory


def _register(cfg, tracker, log) -> None:
    """gmeta register's logic on this run (its message goes to stderr)."""
    import contextlib

    from gmeta.trainer.register import RegisterConfig, register

    if tracker.failure or not tracker.run_id:
        log(f"WARNING: --register-as {cfg.register_as} skipped: the run's MLflow logging failed "
            f"({tracker.failure or 'no run'}); register later with gmeta register")
        return
    name, _, alias = cfg.register_as.partition("@")
    with contextlib.redirect_stdout(sys.stderr):
        register(RegisterConfig(run=tracker.run_id, name=name, alias=alias, tracking_uri=tracker.uri))


def check_writable(cfg: TrainConfig, rank: int) -> None:
    """Every place the run writes, tried before any work (not found unwritable after an epoch)."""
    from gmeta.io import fs

    places = [("--output-dir", cfg.output_dir)]
    if cfg.checkpoint_dir and cfg.checkpoint_dir.lower() != "none" and not cfg.resume:
        places.append(("--checkpoint-dir", cfg.checkpoint_dir))
    if cfg.results_json and rank == 0:
        places.append(("--results-json", os.path.dirname(os.path.abspath(cfg.results_json))))
    for flag, directory in places:
        probe = fs.join(directory, f".gmeta-write-test-{os.getpid()}-{rank}")
        try:
            fs.write_text(probe, "")
            fs.delete_file(probe)
        except OSError as exc:
            raise ValueError(f"{flag} {directory}: not writable ({type(exc).__name__}: {exc})") from None


def validation_split(cfg: TrainConfig, schema) -> str:
    """The split evaluated after each epoch, or "" for none."""
    if cfg.validation_split == AUTO:
        return "val" if "val" in schema.splits else ""
    if cfg.validation_split.lower() == "none":
        return ""
    if cfg.validation_split not in schema.splits:
        raise ValueError(f"--validation-split {cfg.validation_split!r} is not one of the dataset's splits "
                         f"{list(schema.splits)}")
    return cfg.validation_split


def plan_run_tiering(cfg: TrainConfig, schema, comm, log):
    """``(hot rows per table, sync)`` for ``--tiering``, or None when it is off."""
    if cfg.tiering_budget is None:
        return None
    from gmeta.models.registry import build_model
    from gmeta.trainer.embedding.row_optim import slots_per_row
    from gmeta.trainer.embedding.tiering import plan_tiering

    model = build_model(cfg.model, schema, cfg.model_config())
    rows = cfg.tasks_per_batch * (int(cfg.support_size) + int(cfg.query_size))
    return plan_tiering(model, cfg.data, cfg.profile_dir, cfg.tiering_budget, slots_per_row(cfg.emb_optimizer),
                        rows, comm.size, cfg.hot_sync, log)


def build_learner(cfg: TrainConfig, schema, comm, meta: str, tiering=None):
    """A zoo model with its embedding tables and meta-learner, identical on every rank;
    ``tiering``: ``(hot rows per table, sync)`` from ``plan_run_tiering``."""
    from gmeta.models.registry import build_model
    from gmeta.trainer.meta.learner import MetaLearner
    from gmeta.trainer.embedding.build import build_embedding

    model = build_model(cfg.model, schema, cfg.model_config())
    fit_to_training_split(model, cfg.data)
    hot_rows, hot_sync = tiering if tiering is not None else (None, "sparse")
    embedding = build_embedding(model, comm, mode=cfg.parallel, optimizer=cfg.emb_optimizer,
                                learning_rate=cfg.emb_lr, seed=cfg.seed, hot_rows=hot_rows, hot_sync=hot_sync)
    learner = MetaLearner(model, embedding, comm, cfg.meta_config(meta))
    comm.broadcast_variables(learner.dense_variables)
    return learner


def fit_to_training_split(model, data: str) -> None:
    """What a model learns from the training split's columns before the first step (a rating
    target's scale, the item prior), read once, the same on every rank."""
    from gmeta.io.plan import read_columns

    label = "rating" if model.target == "rating" else model.target
    columns = [label] + ([model.prior_feature] if model.prior_feature else [])
    if model.target != "rating" and not model.prior_feature:
        return
    cols = read_columns(data, "train", columns)
    model.fit_target(cols[label])
    if model.prior_feature:
        model.fit_item_prior(cols[model.prior_feature], cols[label])


def load_plain_baseline(source: str, tracking_uri):
    """A trained ``--meta none`` model from an export directory, a models:/ or runs:/ URI or an
    MLflow run id, loaded in this process."""
    from gmeta.trainer.serving.export import load_model
    from gmeta.trainer.tracking.mlflow_run import resolve_export_dir

    learner, meta = load_model(resolve_export_dir(source, tracking_uri))
    if learner.config.meta != "none":
        raise ValueError(f"--plain-baseline {source}: that model was trained with --meta "
                         f"{learner.config.meta}; the plain baseline must be a --meta none run")
    return learner


def config_dict(cfg: TrainConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["hidden"] = list(cfg.hidden)
    d["adapt"] = list(cfg.adapt)
    d["eval_splits"] = list(cfg.eval_splits)
    return d


def _print_run_facts(comm_stats, history, tracker, model_uri, export_dir) -> None:
    out = sys.stderr
    per_step = ", ".join(f"{k} {v['bytes'] / 1e6:.3f} MB/{v['calls']:.0f} calls"
                         for k, v in comm_stats.items() if v["calls"])
    print(f"communication per step: {per_step or 'none'}", file=out)
    print(f"input wait: {100 * history['input_wait_fraction']:.1f}% of step time", file=out)
    if tracker.run_id:
        print(f"mlflow run: {tracker.run_id} in {tracker.uri}  model: {model_uri}", file=out)
    if tracker.failure:
        print(f"MLflow logging stopped during the run ({tracker.failure}); what it missed is in the run "
              f"directory", file=out)
    print(f"export: {export_dir}", file=out, flush=True)


class TrainInput:
    """The training batches of this rank.

    ``units``: each rank reads its own range of the split's tasks; the global batch of a step is
    whatever the ranks' shuffles put together, so results vary with the number of workers the
    way any data order does. ``replicated``: every rank reads the whole split as one reader with
    ``T x N`` tasks per batch and keeps rows ``[rank*T, (rank+1)*T)``; the global batch sequence
    is then identical for any N, which makes N-worker training reproduce 1-worker training.
    """

    def __init__(self, cfg, comm):
        from gmeta.io.reader import MetaReader

        kwargs = resolve_sizes(cfg, lambda message: None).reader_kwargs()
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

    @property
    def error(self):
        """The DataError the reader met, if any (raised in place of tf.data's error)."""
        return self.reader.error

    def epoch_stats(self, epoch: int) -> dict:
        return self.reader.epoch_stats(epoch)

    def dataset(self, epoch: int):
        ds = self.reader.dataset(epoch=epoch)
        if self.slice is None:
            return ds
        import tensorflow as tf

        lo, hi = self.slice
        return ds.map(lambda b: tf.nest.map_structure(lambda t: t[lo:hi], b))


