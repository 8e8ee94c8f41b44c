"""Meta-Embedding (Pan et al., "Warm Up Cold-start Advertisements: Improving CTR Predictions via
Learning to Learn ID Embeddings", SIGIR 2019) on a MAML-trained DNN CTR base model.

A new item's ID embedding is untrained noise. MetaEmb learns a *generator* that maps the item's
side features (their embeddings, plus dense item features) to an initial ID embedding. Training
has two phases:

1. ``base``: the DNN CTR model (all embeddings -> MLP), meta-trained with MAML over its MLP head,
   exactly like ``maml_dnn``;
2. ``generator``: base model frozen; for each meta-batch, every row's item-id embedding is
   replaced by the generated one. Cold-start loss ``L_a`` on the support rows (batch a); then one
   gradient step of each item's generated embedding on ``L_a`` (a task's rows of the same item
   share it) and the warm-up loss ``L_b`` on the query rows (batch b) with the stepped
   embeddings. The generator minimises ``alpha * L_a + (1 - alpha) * L_b``, summed over tasks.

At evaluation an item that never appeared in the training split uses its generated embedding;
seen items keep their trained one. A warm start (``--init-from``) whose item vocabulary grew
starts the new items' rows from their generated embeddings (``row_generator``). Defaults: embeddings 16, MLP 64-64, generator one hidden layer
of 32, alpha 0.1, warm-up step size 0.1 (``--extra alpha=..,warmup_lr=..``).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gmeta.models import layers
from gmeta.models.base import RowGenerator, TrainingPhase, resolve_target
from gmeta.models.mlp_head import MLPHeadModel


class MetaEmb(MLPHeadModel):
    name = "metaemb"
    paper = "Pan et al., SIGIR 2019, arXiv:1904.11547"
    phases = ("base", "generator")
    extra_keys = ("adapt_layers", "gen_hidden", "alpha", "warmup_lr")

    def __init__(self, schema, config):
        if resolve_target(schema, config.target) != "click":
            raise ValueError("metaemb is a CTR model: it needs a 'click' label (--target click)")
        if not schema.item_id_feature:
            raise ValueError("metaemb needs schema.item_id_feature (the item id whose embedding it generates)")
        super().__init__(schema, config)
        self.item_feature = schema.item_id_feature
        self.item_table = schema.table(schema.feature(self.item_feature).table)
        self.side_features = tuple(f for f in self.sparse_features
                                   if f != self.item_feature and schema.feature(f).group == "item")
        self.side_dense = tuple(d.name for d in schema.dense if d.group == "item")
        if not self.side_features and not self.side_dense:
            raise ValueError("metaemb needs item side features (schema group 'item') to generate from")
        gen_in = config.emb_dim * len(self.side_features) + len(self.side_dense)
        hidden = int(config.extra.get("gen_hidden", 32))
        self.gen_params = layers.init_mlp("gen", [gen_in, hidden, config.emb_dim], config.seed + 7)
        self.alpha = float(config.extra.get("alpha", 0.1))
        self.warmup_lr = float(config.extra.get("warmup_lr", 0.1))
        # 1.0 for item rows seen in the training split; filled by ``set_seen_items``
        self.seen = tf.Variable(tf.zeros([self.item_table.num_rows]), trainable=False, name="seen_items")
        self.generate_for = "none"  # none | cold | all  (a Python switch, fixed per traced function)

    # ---- state ----
    def state_variables(self) -> dict:
        state = super().state_variables()
        state.update({f"gen/{n}": v for n, v in self.gen_params.items()})
        state["seen"] = self.seen
        return state

    def plain_state(self) -> dict:
        return {"generate_for": self.generate_for}

    def load_plain_state(self, state: dict) -> None:
        super().load_plain_state(state)
        mode = state.get("generate_for", self.generate_for)
        if mode not in ("none", "cold", "all"):
            raise ValueError(f"metaemb: generate_for must be none, cold or all, got {mode!r}")
        self.generate_for = mode

    def training_phases(self) -> tuple:
        """Phase 2: the generator, trained with the base model frozen (module docstring)."""
        return (TrainingPhase(name="generator", variables=tuple(self.gen_params.values()),
                              loss_sum=self.generator_loss_sum, finish=self._finish_generator,
                              needs_values=(self.item_feature,)),)

    def row_generator(self) -> RowGenerator:
        """A warm start gives new items generated embeddings (the paper's warm-up) rather than noise."""
        return RowGenerator(table=self.item_table.name, key=self.item_feature, sparse=self.side_features,
                            dense=self.side_dense, generate=self.generate)

    def _finish_generator(self, trained: bool, values: dict) -> None:
        """Unseen items use generated embeddings only when a generator was really trained."""
        if trained:
            self.set_seen_items(values[self.item_feature])
        self.generate_for = "cold" if trained else "none"

    # ---- the generator ----
    def generate(self, vectors: dict, part: dict):
        """Generated item-id embedding per row: [T, N, D]."""
        frozen = {f: tf.stop_gradient(vectors[f]) for f in self.side_features}  # base model frozen
        x = self.concat_features(frozen, part, self.side_features, self.side_dense)
        scale = float(np.sqrt(3.0 / self.config.emb_dim))  # output range of a trained embedding
        return scale * tf.tanh(layers.mlp(self.gen_params, "gen", x, 2))

    def item_rows_of(self, ids):
        return self.item_table.rows_of(tf.maximum(ids, 0))

    def build_inputs(self, vectors, part):
        if self.generate_for == "none":
            return super().build_inputs(vectors, part)
        vectors = dict(vectors)
        generated = self.generate(vectors, part)
        if self.generate_for == "all":
            vectors[self.item_feature] = generated
        else:
            cold = tf.gather(self.seen, self.item_rows_of(part[self.item_feature])) < 0.5
            vectors[self.item_feature] = tf.where(cold[..., None], generated, vectors[self.item_feature])
        return super().build_inputs(vectors, part)

    def set_seen_items(self, item_ids: np.ndarray) -> None:
        mask = np.zeros([self.item_table.num_rows], np.float32)
        ids = np.asarray(item_ids, np.int64)
        mask[self.item_table.rows_of(ids[ids >= 0])] = 1.0
        self.seen.assign(mask)

    # ---- phase 2 objective ----
    def generator_loss_sum(self, vectors: dict, params: dict, batch):
        """Sum over real tasks with query rows of alpha * cold-start loss on support +
        (1 - alpha) * warm-up loss on query, and their count (the trainer's scaling rule)."""
        support, query = batch["support"], batch["query"]
        task_mask = batch["task_mask"]
        counted = task_mask * tf.cast(tf.reduce_sum(query["mask"], axis=1) > 0, tf.float32)
        s_len = support["mask"].shape[1]
        both = {k: tf.concat([support[k], query[k]], axis=1) for k in support if k in query}
        generated = self.generate(vectors, both)                         # [T, S+Q, D]
        item_ids = both[self.item_feature]

        def task_losses(item_vectors, part, lo, hi):
            vec = {f: v[:, lo:hi] for f, v in vectors.items()}
            vec[self.item_feature] = item_vectors
            x = super(MetaEmb, self).build_inputs(vec, part)
            return self.task_loss(self.forward(params, x), part)         # [T]

        gen_s = generated[:, :s_len]
        with tf.GradientTape() as tape:
            tape.watch(gen_s)
            loss_a = task_losses(gen_s, support, 0, s_len)
            total_a = tf.reduce_sum(loss_a)
        grad_rows = tape.gradient(total_a, gen_s)                        # [T, S, D], per task
        # one warm-up step per (task, item): a task's rows of the same item share one embedding
        # and one gradient; tasks stay independent, so the loss is a sum over tasks
        task_index = tf.range(tf.shape(item_ids, out_type=tf.int64)[0])[:, None]
        keys = task_index * self.item_table.num_rows + self.item_rows_of(item_ids)
        uniq, pos = tf.unique(tf.reshape(keys, [-1]))
        pos = tf.reshape(pos, tf.shape(item_ids))                      # [T, S+Q]
        d = self.config.emb_dim
        per_item = tf.math.unsorted_segment_sum(tf.reshape(grad_rows, [-1, d]),
                                                tf.reshape(pos[:, :s_len], [-1]), tf.size(uniq))
        step = tf.reshape(tf.gather(per_item, pos), tf.shape(generated))
        warmed = generated - self.warmup_lr * step
        loss_b = task_losses(warmed[:, s_len:], query, s_len, None)
        per_task = self.alpha * loss_a + (1.0 - self.alpha) * loss_b
        return tf.reduce_sum(per_task * counted), tf.reduce_sum(counted)
