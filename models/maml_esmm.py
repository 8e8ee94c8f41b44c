"""MAML-ESMM: the Entire Space Multi-task Model (Ma et al., SIGIR 2018) meta-trained with MAML.

Shared embeddings feed two towers: CTR (pCTR) and CVR (pCVR); pCTCVR = pCTR x pCVR. Both losses
are taken over all impressions (no sample-selection bias): BCE(click, pCTR) +
BCE(click AND conversion, pCTCVR). Both towers adapt per task in the inner loop (``--adapt``, see gmeta.models.base). Defaults:
embeddings 16, towers 64-64 each, 1 inner step.
"""

from __future__ import annotations

import tensorflow as tf

from gmeta.models import layers
from gmeta.models.base import ZooModel


class MAMLESMM(ZooModel):
    name = "maml_esmm"
    paper = "Ma et al., SIGIR 2018 (ESMM) + Finn et al., ICML 2017 (MAML)"
    task_output = "ctr_logit"

    def __init__(self, schema, config):
        missing = [lab for lab in ("click", "conversion") if lab not in schema.labels]
        if missing:
            raise ValueError(f"maml_esmm needs labels click and conversion; the dataset lacks {missing}")
        super().__init__(schema, config)
        sizes = [self.input_width, *config.hidden, 1]
        self.n_layers = len(sizes) - 1
        self.params = {**layers.init_mlp("ctr", sizes, config.seed, zero_output=bool(self.prior_feature)),
                       **layers.init_mlp("cvr", sizes, config.seed + 1)}
        parts = set(self.adapt_parts())
        k = self.n_layers if "head" in parts else (1 if "last" in parts else 0)
        towers = tuple(sorted(f"{t}/{p}{i}" for t in ("ctr", "cvr")
                              for i in range(self.n_layers - k, self.n_layers) for p in "wb"))
        # per-task terms act on the shared input (user) and on the CTR logit (pref, bias)
        self.adapted = towers + self._add_task_terms()

    def forward(self, params, x):
        x = self.task_inputs(params, x)
        ctr_logit = self.task_logit(params, x, tf.squeeze(layers.mlp(params, "ctr", x, self.n_layers), -1))
        cvr_logit = tf.squeeze(layers.mlp(params, "cvr", x, self.n_layers), -1)
        pctr = tf.sigmoid(ctr_logit)
        return {"ctr_logit": ctr_logit, "pctr": pctr, "pctcvr": pctr * tf.sigmoid(cvr_logit)}

    def task_loss(self, outputs, part):
        ctcvr_label = part["click"] * part["conversion"]
        per_row = (layers.bce_with_logits(part["click"], outputs["ctr_logit"])
                   + layers.bce_on_probs(ctcvr_label, outputs["pctcvr"]))
        return layers.masked_task_mean(per_row, part["mask"])

    def scores(self, outputs, part):
        return {"auc": (outputs["pctr"], part["click"]),
                "auc_ctcvr": (outputs["pctcvr"], part["click"] * part["conversion"])}
