"""MeLU (Lee et al., "MeLU: Meta-Learned User Preference Estimator for Cold-Start
Recommendation", KDD 2019).

User and item *feature* embeddings feed an MLP whose decision layers adapt locally per user
(the inner loop); the embeddings are global and change only in the outer loop. MeLU does not
embed the raw user id: a cold user's id carries nothing, their side features and support set do.

Defaults: embeddings 16 per field, decision layers 64-64, 1 inner step. Targets: ``rating``
(MSE, the paper's setting on MovieLens) or ``click`` (BCE, the CTR variant); ``auto`` picks click
when the dataset has it.
"""

from gmeta.models.mlp_head import MLPHeadModel


class MeLU(MLPHeadModel):
    name = "melu"
    paper = "Lee et al., KDD 2019, arXiv:1908.00413"
    skip_features = ("user_id",)
