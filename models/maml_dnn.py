"""MAML-DNN: a plain DNN CTR model (all id and side-feature embeddings -> MLP -> click logit)
meta-trained with MAML (Finn et al., ICML 2017) over its MLP head.

The whole MLP adapts per task in the inner loop; embeddings (including user and item ids) are
meta-parameters updated in the outer loop only. Defaults: embeddings 16, MLP 64-64, 1 inner step.
"""

from gmeta.models.base import resolve_target
from gmeta.models.mlp_head import MLPHeadModel


class MAMLDNN(MLPHeadModel):
    name = "maml_dnn"
    paper = "Finn et al., ICML 2017 (MAML) on a DNN CTR model"

    def __init__(self, schema, config):
        if resolve_target(schema, config.target) != "click":
            raise ValueError("maml_dnn is a CTR model: it needs a 'click' label (--target click)")
        super().__init__(schema, config)
