"""Model registry: ``--model NAME`` -> zoo class."""

from __future__ import annotations

from gmeta.models.base import ModelConfig
from gmeta.models.maml_dnn import MAMLDNN
from gmeta.models.maml_esmm import MAMLESMM
from gmeta.models.melu import MeLU
from gmeta.models.metaemb import MetaEmb

MODELS = {cls.name: cls for cls in (MeLU, MAMLDNN, MAMLESMM, MetaEmb)}


def build_model(name: str, schema, config: ModelConfig):
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f"--model {name!r} is not in the zoo; choose one of {sorted(MODELS)}") from None
    return cls(schema, config)
