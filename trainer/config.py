"""The run's configuration: every setting of ``gmeta train`` with its default, flag and help, once.

Each ``TrainConfig`` field declares its default once and carries its flag's help (and choices,
and how the flag parses) in the field's metadata; ``add_arguments`` builds ``gmeta train``'s
flags from the fields, ``config_from_args`` turns parsed flags into the one frozen config, and
``gmeta tune`` reads the same fields. The parts' own configs (``ModelConfig``, ``MetaConfig``,
``RowOptimizerConfig``) have no defaults of their own: they are built only here, from a
``TrainConfig`` (``model_config``, ``meta_config``, ``row_optimizer_config``), so code that builds
a part trains the same model the command line does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field

import numpy as np

from gmeta.io.plan import task_sizes
from gmeta.models.base import ModelConfig
from gmeta.models.registry import MODELS
from gmeta.trainer.embedding.factory import MODES as PARALLEL_MODES
from gmeta.trainer.embedding.row_optim import KINDS as ROW_OPTIMIZERS, RowOptimizerConfig
from gmeta.trainer.embedding.plan import parse_bytes
from gmeta.trainer.embedding.tiering import parse_budget
from gmeta.trainer.evaluation.support_curve import parse_points
from gmeta.trainer.meta.learner import INNER_SOLVERS, MetaConfig
from gmeta.trainer.tracking.mlflow_run import DEFAULT_TRACKING_URI

AUTO = "auto"
AUTO_SIZE_PERCENTILE = 95  # --support-size/--query-size auto: this percentile of the real sizes
AUTO_MIN_STEPS = 320       # --epochs auto: enough epochs for this many optimizer steps ...
AUTO_MIN_EPOCHS = 3        # ... and at least this many
DEFAULT_EXPERIMENT = "gmeta"


def setting(default=dataclasses.MISSING, help: str = "", kind: str = "value", parse=None, choices=None,
            metavar=None, **kw):
    """A config field with its flag: ``kind`` value (``parse`` the text), auto_int (an integer or
    ``auto``), ints / strs (comma separated), switch (a flag that sets True), bool (``--x`` /
    ``--no-x``), no (``--no-x`` sets False), extra (repeated KEY=VALUE), env (the tracking flags:
    their default comes from MLflow's environment variables); ``flag=False``: no flag."""
    meta = {"help": help, "kind": kind, "parse": parse, "choices": choices, "metavar": metavar,
            "flag": kw.pop("flag", True)}
    if default is dataclasses.MISSING and "default_factory" not in kw:
        return field(metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass(frozen=True)
class TrainConfig:
    model: str = setting(help="zoo model", choices=tuple(sorted(MODELS)))
    data: str = setting(help="dataset directory (local or hdfs://) with schema.json")
    epochs: object = setting(AUTO, kind="auto_int",
                             help=f"passes over the training tasks; auto: enough for {AUTO_MIN_STEPS} optimizer "
                                  f"steps, at least {AUTO_MIN_EPOCHS}")
    tasks_per_batch: int = setting(32, parse=int, help="tasks per worker per step (T)")
    support_size: object = setting(AUTO, kind="auto_int",
                                   help=f"support rows per task (S), padded/capped; auto: the "
                                        f"p{AUTO_SIZE_PERCENTILE} of the training tasks' support sizes")
    query_size: object = setting(AUTO, kind="auto_int",
                                 help="query rows per task (Q), padded/capped; auto as for --support-size")
    meta: str = setting("maml", choices=("maml", "none"),
                        help="maml, or none: the same network trained plainly (the non-meta baseline)")
    inner_steps: int = setting(1, parse=int, help="inner-loop steps per task")
    eval_inner_steps: int = setting(-1, parse=int, help="inner steps at evaluation; -1: same as --inner-steps")
    inner_lr: float = setting(1.0, parse=float, help="step size of the inner loop's gradient steps")
    outer_lr: float = setting(1e-2, parse=float, help="Adam learning rate of dense meta-parameters")
    first_order: bool = setting(False, kind="switch", help="first-order MAML (no second derivatives)")
    meta_sgd: bool = setting(False, kind="switch", help="learn the inner learning rate per parameter")
    task_loop: bool = setting(False, kind="switch", help="adapt tasks one by one (DMAML-style baseline)")
    clip_norm: float = setting(0.0, parse=float, help="clip the dense meta-gradient to this global norm (0: off)")
    inner_clip: float = setting(0.0, parse=float, help="clip each task's inner-loop gradient to this norm (0: off)")
    inner_solver: str = setting("ridge", choices=INNER_SOLVERS,
                                help="how the inner loop adapts the terms the output is linear in (pref, bias): "
                                     "gradient steps at --inner-lr, or ridge: a Newton step of the support loss "
                                     "plus a learned ridge penalty, solved in closed form (exact in one step for "
                                     "ratings); other adapted parts always take gradient steps")
    ridge_lambda: float = setting(1.0, parse=float,
                                  help="--inner-solver ridge: the initial penalty towards the shared values "
                                       "(learned per coefficient in the outer loop)")
    plain_loss_weight: float = setting(1.0, parse=float,
                                       help="add this weight x the unadapted model's loss on support and query "
                                            "rows to the meta-objective, so the shared parameters learn from every "
                                            "label as a plain model does")
    early_stopping: int = setting(10, parse=int, metavar="PATIENCE",
                                  help="with a validation split: keep the weights of the epoch with the best "
                                       "validation GAUC (adapted for the model, unadapted for the plain network "
                                       "alongside) as the run's model, and stop once none improved for this many "
                                       "epochs; 0: off (the last epoch is the model)")
    loss_rise_tolerance: float = setting(0.5, parse=float,
                                         help="stop with an error when an epoch's mean training loss exceeds the "
                                              "previous epoch's by more than this fraction (inf: never); a NaN "
                                              "loss always stops")
    plain_baseline: str = setting("alongside", metavar="alongside|off|MODEL",
                                  help="the plain network (--meta none) reported next to the model, unadapted and "
                                       "fine-tuned with the same inner loop: alongside trains it in the same run on "
                                       "the same batches; or an export directory, models:/ URI or run id of an "
                                       "existing --meta none run")
    parallel: str = setting("hybrid", choices=PARALLEL_MODES,
                            help="embeddings: hybrid (row-sharded, AlltoAll), naive (replicated, dense "
                                 "allreduce), sok (GPU)")
    input_sharding: str = setting("units", choices=("units", "replicated"),
                                  help="units: each worker reads its own range of the tasks (scales I/O); "
                                       "replicated: every worker reads all data and takes its slice of each "
                                       "global batch, so results do not depend on the number of workers (costs "
                                       "N x decoding)")
    replicate_tables: str = setting("1M", metavar="BYTES",
                                    help="--parallel hybrid: tables of at most this many bytes (rows x dim x 4) are "
                                         "held whole by every worker instead of row-sharded (a local gather; their "
                                         "gradients ride the step's fused allreduce); 0: shard every table")
    tiering: str = setting("off", metavar="off|auto|BUDGET",
                           help="replicate the most looked-up embedding rows on every worker (the rest stay "
                                "sharded): auto (up to 1%% of each table) or a byte budget per worker such as 64M; "
                                "needs a profile (gmeta profile) or profiles the data at start. See README, "
                                "Tiered embeddings")
    hot_sync: str = setting("auto", choices=("auto", "sparse", "dense"),
                            help="how hot replicas stay equal: sparse (one allgather of touched rows), dense (in "
                                 "the step's fused allreduce); auto picks the one with fewer expected bytes")
    profile_dir: str = setting("", help="where gmeta profile wrote the id profile (default DATA/_profile)")
    emb_dim: int = setting(16, parse=int, help="embedding dimension of every table")
    hidden: tuple = setting((64, 64), kind="ints", help="MLP sizes, comma separated")
    adapt: tuple = setting(("auto",), kind="strs",
                           help="what the inner loop adapts per task, comma separated: head (every MLP layer), "
                                "last (the output layer), user (the task's user embedding rows as local copies), "
                                "pref (a per-task preference over the item representation), bias (per-task "
                                "logit scale and bias); auto: user,pref,bias (pref,bias when the model has no "
                                "user input)")
    item_prior: bool = setting(True, kind="bool",
                               help="add each item's smoothed mean training label (popularity for clicks, mean "
                                    "rating for ratings; items never seen in training: 0) to the model's output, "
                                    "so the network learns what popularity does not know")
    target: str = setting("auto", choices=("auto", "click", "rating"),
                          help="label to fit for single-head models (auto: click when present)")
    emb_optimizer: str = setting("adagrad", choices=ROW_OPTIMIZERS, help="row-wise optimizer of the tables")
    emb_lr: float = setting(0.2, parse=float, help="learning rate of the row-wise optimizer")
    generator_epochs: int = setting(2, parse=int, help="metaemb phase 2 epochs")
    seed: int = setting(0, parse=int, help="seed of the initial weights and the data order")
    eval_splits: tuple = setting((), kind="strs", help="comma separated; default: every split but train and val")
    validation_split: str = setting(AUTO, help="split evaluated after every epoch (GAUC adapted logged as "
                                               "val_gauc_adapted; early stopping and the objective of gmeta tune "
                                               "read it); auto: 'val' when the dataset has it; none: off")
    tracking_uri: object = setting(DEFAULT_TRACKING_URI, kind="env",
                                   help="MLflow tracking URI ($MLFLOW_TRACKING_URI when set); 'none' disables "
                                        "tracking")
    experiment: str = setting(DEFAULT_EXPERIMENT, kind="env", help="MLflow experiment ($MLFLOW_EXPERIMENT_NAME "
                                                                   "when set)")
    run_name: str = setting("", help="MLflow run name")
    output_dir: str = setting("runs", help="where the run directory (report, per-task metrics, export) is written")
    log_every: int = setting(20, parse=int, help="steps between progress lines and per-step MLflow metrics (0: no "
                                                 "lines, one metric point per epoch)")
    comm: str = setting("auto", choices=("auto", "horovod", "local"), help="collectives: horovod under horovodrun, "
                                                                           "local in one process")
    checkpoint_dir: str = setting("", help="where checkpoints go (local or hdfs://, shared by all workers; default "
                                           "<output-dir>/<run id>/checkpoints; none: no checkpoints). One is written "
                                           "at every epoch end, and more with the next two flags")
    checkpoint_every_steps: int = setting(0, parse=int, help="also checkpoint every N global steps (0: off)")
    checkpoint_every_secs: float = setting(0.0, parse=float,
                                           help="also checkpoint when S seconds passed since the last one (0: off)")
    keep_checkpoints: int = setting(3, parse=int, help="newest committed checkpoints to keep (0: all)")
    resume: bool = setting(False, kind="switch",
                           help="continue from the newest committed checkpoint in --checkpoint-dir (or a ckpt-... "
                                "directory given there; without it, the most recent unfinished run under "
                                "--output-dir): same MLflow run, same data order, any worker count")
    init_from: str = setting("", metavar="MODEL",
                             help="start a NEW run from trained weights: an export directory, models:/ URI, MLflow "
                                  "run id or checkpoint directory; variables and tables are copied by name, the rest "
                                  "keep their initial values (logged)")
    register_as: str = setting("", metavar="NAME[@ALIAS]",
                               help="register the run's model in the MLflow registry at the end of a successful "
                                    "run, and point ALIAS at the new version (as gmeta register)")
    saved_model: bool = setting(True, kind="no", help="skip the serving SavedModel and the MLflow model (quick "
                                                      "experiments, tuning trials)")
    results_json: str = setting("", metavar="PATH", help="also write the last stdout line (the headline JSON "
                                                         "object) to this file, without horovodrun's rank prefix")
    support_curve: str = setting("0,1,2,5,10,20,all", metavar="K,K,...",
                                 help="support rows per task at which the final report measures GAUC (adapted, "
                                      "unadapted, fine-tuned plain network; plotted as support_curve.png); 'all': "
                                      "the whole support set; none: off")
    stop_grace_secs: float = setting(4.0, parse=float,
                                     help="on SIGTERM/SIGINT every rank stops after the current step, checkpoints "
                                          "and marks the MLflow run KILLED; a rank still blocked after this many "
                                          "seconds exits anyway (horovodrun kills its workers 5 s after its own "
                                          "SIGTERM)")
    extra: dict = setting(kind="extra", metavar="KEY=VALUE", help="model-specific hyper-parameter",
                          default_factory=dict, hash=False)

    def validate(self) -> "TrainConfig":
        checks = [
            (self.model in MODELS, f"--model {self.model!r} is not in the zoo; choose one of {sorted(MODELS)}"),
            (self.epochs == AUTO or self.epochs >= 0, "--epochs must be auto or >= 0"),
            (self.tasks_per_batch >= 1, "--tasks-per-batch must be >= 1"),
            (self.support_size == AUTO or self.support_size >= 1, "--support-size must be auto or >= 1"),
            (self.query_size == AUTO or self.query_size >= 1, "--query-size must be auto or >= 1"),
            (self.parallel in PARALLEL_MODES, f"--parallel must be one of {', '.join(PARALLEL_MODES)}"),
            (self.input_sharding in ("units", "replicated"), "--input-sharding must be units or replicated"),
            (self.emb_dim >= 1, "--emb-dim must be >= 1"),
            (all(h >= 1 for h in self.hidden), "--hidden sizes must be >= 1"),
            (self.emb_lr > 0, "--emb-lr must be > 0"),
            (self.generator_epochs >= 0, "--generator-epochs must be >= 0"),
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
        meta_config(self)   # validates the meta-learning flags (one validation, the MetaConfig's)
        model_config(self)  # validates --adapt
        self.support_points  # noqa: B018 - parsing validates --support-curve
        self.tiering_budget  # noqa: B018 - parsing validates --tiering
        self.replicate_under  # noqa: B018 - parsing validates --replicate-tables
        return self

    @property
    def replicate_under(self) -> int:
        """Bytes: hybrid tables this small are replicated (``--replicate-tables``)."""
        return parse_bytes(self.replicate_tables, "--replicate-tables")

    @property
    def tiering_budget(self):
        """None (off), -1 (auto) or bytes per worker."""
        return parse_budget(self.tiering)

    @property
    def support_points(self) -> tuple:
        return parse_points(self.support_curve)

    def reader_kwargs(self) -> dict:
        if AUTO in (self.support_size, self.query_size):
            raise RuntimeError("support/query sizes are still 'auto'; call resolve_sizes first")
        return {"tasks_per_batch": self.tasks_per_batch, "support_size": self.support_size,
                "query_size": self.query_size}

    @property
    def eval_steps(self) -> int:
        return self.inner_steps if self.eval_inner_steps < 0 else self.eval_inner_steps


# ------------------------------------------------------------------------------------------------
# the parts' configs, built only from the run's


def meta_config(cfg: TrainConfig, meta: str | None = None) -> MetaConfig:
    """The meta-learner's settings; ``meta`` overrides ``--meta`` (the plain network alongside)."""
    meta = meta or cfg.meta
    return MetaConfig(meta=meta, inner_steps=cfg.inner_steps, inner_lr=cfg.inner_lr, first_order=cfg.first_order,
                      meta_sgd=cfg.meta_sgd and meta == "maml", task_loop=cfg.task_loop, outer_lr=cfg.outer_lr,
                      clip_norm=cfg.clip_norm, plain_weight=cfg.plain_loss_weight, inner_clip=cfg.inner_clip,
                      inner_solver=cfg.inner_solver, ridge_lambda=cfg.ridge_lambda).validate()


def model_config(cfg: TrainConfig) -> ModelConfig:
    return ModelConfig(emb_dim=cfg.emb_dim, hidden=tuple(cfg.hidden), target=cfg.target, seed=cfg.seed,
                       adapt=tuple(cfg.adapt), item_prior=cfg.item_prior, extra=dict(cfg.extra))


def row_optimizer_config(cfg: TrainConfig) -> RowOptimizerConfig:
    return RowOptimizerConfig(kind=cfg.emb_optimizer, learning_rate=cfg.emb_lr)


def defaults(model: str, data: str = "", **overrides) -> TrainConfig:
    """The command line's config for ``model`` with some settings changed (tests, benchmarks)."""
    return TrainConfig(model=model, data=data, **overrides)


def part_configs(cfg: TrainConfig) -> tuple:
    """``(ModelConfig, MetaConfig, RowOptimizerConfig)`` of a run: what its parts receive."""
    return model_config(cfg), meta_config(cfg), row_optimizer_config(cfg)


# ------------------------------------------------------------------------------------------------
# what needs the data


def resolve_sizes(cfg: TrainConfig, log) -> TrainConfig:
    """Turn ``auto`` support/query caps into the AUTO_SIZE_PERCENTILE-th percentile of the training
    split's real sizes (from the dataset's index, identical on every rank) and say what it caps."""
    if AUTO not in (cfg.support_size, cfg.query_size):
        return cfg
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


def config_dict(cfg: TrainConfig) -> dict:
    """JSON-able settings (tuples as lists): what MLflow logs and checkpoints compare."""
    d = dataclasses.asdict(cfg)
    for name in ("hidden", "adapt", "eval_splits"):
        d[name] = list(getattr(cfg, name))
    return d


# ------------------------------------------------------------------------------------------------
# flags


def parse_auto_int(text: str):
    if text == AUTO:
        return AUTO
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer, got {text!r}") from None


def _ints(text: str) -> tuple:
    try:
        return tuple(int(h) for h in text.split(",") if h.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma separated integers, got {text!r}") from None


def _strs(text: str) -> tuple:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _extra(items) -> dict:
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


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(p) -> None:
    """``gmeta train``'s flags, one per field, from the fields' metadata."""
    for f in dataclasses.fields(TrainConfig):
        m = f.metadata
        if not m.get("flag", True):
            continue
        kind, flag = m["kind"], flag_of(f.name)
        common = {"help": m["help"] or None, "dest": f.name}
        if m.get("metavar"):
            common["metavar"] = m["metavar"]
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            p.add_argument(flag, required=True, choices=m["choices"], **common)
        elif kind == "switch":
            p.add_argument(flag, action="store_true", **common)
        elif kind == "no":
            p.add_argument("--no-" + flag[2:], action="store_false", **common)
        elif kind == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, **common)
        elif kind == "extra":
            p.add_argument(flag, action="append", **common)
        elif kind == "env":
            env = {"tracking_uri": "MLFLOW_TRACKING_URI", "experiment": "MLFLOW_EXPERIMENT_NAME"}[f.name]
            p.add_argument(flag, default=os.environ.get(env) or f.default, **common)
        else:
            parse = {"auto_int": parse_auto_int, "ints": _ints, "strs": _strs}.get(kind, m["parse"])
            p.add_argument(flag, default=f.default, type=parse, choices=m["choices"], **common)


def config_from_args(args) -> TrainConfig:
    """The one place flags become the run's frozen config."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    values["extra"] = _extra(values["extra"])
    if isinstance(values["tracking_uri"], str) and values["tracking_uri"].lower() == "none":
        values["tracking_uri"] = None
    return TrainConfig(**values).validate()
