"""Pipeline parameters: one flat, typed name per setting a user tunes in the KFP UI.

The table maps each pipeline parameter to its configuration key, so the KFP
components, ``pipeline.py`` and ``captioning submit`` build the same validated
``Config`` as ``captioning run --set``. Integers use 0 for "not set" where the
setting is optional (KFP parameters cannot be null).
"""

from __future__ import annotations

from typing import Any

from captioning.config import Config, load_config

# parameter -> (config key, type, default for the pipeline)
PARAMETERS: dict[str, tuple[str, type, Any]] = {
    "base_url": ("data.base_url", str, "http://images.cocodataset.org"),
    "max_images": ("data.max_images", int, 0),
    "val_images": ("data.val_images", int, 5000),
    "test_images": ("data.test_images", int, 5000),
    "data_seed": ("data.seed", int, 0),
    "weights": ("features.weights", str, "imagenet"),
    "feature_batch_size": ("features.batch_size", int, 64),
    "min_count": ("text.min_count", int, 5),
    "max_vocab": ("text.max_vocab", int, 10000),
    "epochs": ("train.epochs", int, 20),
    "batch_size": ("train.batch_size", int, 64),
    "embedding_dim": ("train.embedding_dim", int, 256),
    "units": ("train.units", int, 512),
    "learning_rate": ("train.learning_rate", float, 1e-3),
    "dropout": ("train.dropout", float, 0.3),
    "train_seed": ("train.seed", int, 0),
    "decoder": ("evaluate.decoder", str, "beam"),
    "beam_width": ("evaluate.beam_width", int, 3),
    "attention_samples": ("evaluate.attention_samples", int, 4),
    "promote_metric": ("promote.metric", str, "CIDEr"),
    "promote_margin": ("promote.margin", float, 0.0),
    "promote_alias": ("promote.alias", str, "production"),
    "min_score": ("promote.min_metric", float, 0.0),
    "wandb_project": ("wandb.project", str, "captioning"),
    "wandb_entity": ("wandb.entity", str, ""),
    "wandb_mode": ("wandb.mode", str, "online"),
    "wandb_secret": ("wandb.api_key_secret", str, ""),
}
BY_KEY = {key: name for name, (key, _, _) in PARAMETERS.items()}
OPTIONAL_ZERO = {"max_images", "val_images", "test_images"}  # 0 -> null (all / Karpathy-proportional)
OPTIONAL_EMPTY = {"wandb_entity"}


def to_overrides(values: dict[str, Any]) -> list[str]:
    overrides = []
    for name, value in values.items():
        if name not in PARAMETERS:
            raise KeyError(name)
        key = PARAMETERS[name][0]
        if (name in OPTIONAL_ZERO and value == 0) or (name in OPTIONAL_EMPTY and value == ""):
            value = "null"
        overrides.append(f"{key}={value}")
    return overrides


def config_from_parameters(preset: str = "coco2014", **values: Any) -> Config:
    return load_config(preset=preset, overrides=to_overrides(values))


def parameters_from_config(cfg: Config) -> dict[str, Any]:
    """The pipeline parameters that reproduce ``cfg`` (for compile defaults and submit)."""
    out = {}
    for name, (key, kind, _) in PARAMETERS.items():
        section, field = key.split(".")
        value = getattr(getattr(cfg, section), field)
        if value is None:
            value = 0 if name in OPTIONAL_ZERO else ""
        out[name] = kind(value)
    return out
