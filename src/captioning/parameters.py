"""Pipeline parameters: one flat, typed name per setting a user tunes in the KFP UI or with ``submit --set``.

``PARAMETERS`` is the only list. Each parameter's type and default come from
the configuration model and the preset; the steps it reaches come from what
each step reads (``captioning.workflow``). So exposing a setting is one line
here, and the components, the pipeline signature and ``captioning submit``
follow. KFP parameters cannot be null: an optional count is 0 and an optional
text is "" when not set.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from captioning.config import Config, load_config
from captioning.errors import ConfigError

# pipeline parameter -> configuration key
PARAMETERS: dict[str, str] = {
    "base_url": "data.base_url",
    "verify_sha256": "data.verify_sha256",
    "max_images": "data.max_images",
    "val_images": "data.val_images",
    "test_images": "data.test_images",
    "data_split": "data.split",
    "data_seed": "data.seed",
    "weights": "features.weights",
    "feature_batch_size": "features.batch_size",
    "min_count": "text.min_count",
    "max_vocab": "text.max_vocab",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "embedding_dim": "train.embedding_dim",
    "units": "train.units",
    "context_dim": "train.context_dim",
    "learning_rate": "train.learning_rate",
    "dropout": "train.dropout",
    "scst_epochs": "train.scst_epochs",
    "train_seed": "train.seed",
    "checkpoint_dir": "train.checkpoint_dir",
    "decoder": "evaluate.decoder",
    "beam_width": "evaluate.beam_width",
    "length_penalty": "evaluate.length_penalty",
    "select_metric": "train.select_metric",
    "select_images": "train.select_images",
    "attention_samples": "evaluate.attention_samples",
    "promote_metric": "promote.metric",
    "promote_margin": "promote.margin",
    "promote_alias": "promote.alias",
    "registry": "promote.registry",
    "min_score": "promote.min_metric",
    "deploy": "promote.deploy",
    "deploy_name": "promote.deploy_name",
    "deploy_namespace": "promote.deploy_namespace",
    "deploy_project": "promote.deploy_project",
    "deploy_region": "promote.deploy_region",
    "deploy_gpu": "promote.deploy_gpu",
    "wandb_project": "wandb.project",
    "wandb_entity": "wandb.entity",
    "wandb_mode": "wandb.mode",
    "wandb_secret": "wandb.api_key_secret",
}
BY_KEY = {key: name for name, key in PARAMETERS.items()}
# Every component also takes the preset its pods start from (settings that are no parameter keep its values).
PRESET_PARAMETER = "preset"
PIPELINE_PRESET = "coco2014"


def _field(key: str):
    section, name = key.split(".")
    sections = Config.model_fields
    if section not in sections or name not in sections[section].annotation.model_fields:
        raise ConfigError(f"captioning/parameters.py: {key!r} is not a configuration key (captioning/config.py)")
    return sections[section].annotation.model_fields[name]


def parameter_type(name: str) -> type:
    """The KFP type of a parameter: the config field's type, without None (KFP has no null)."""
    annotation = _field(PARAMETERS[name]).annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return type(args[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = args[0] if len(args) == 1 else annotation
    if annotation not in (str, int, float, bool):
        raise ConfigError(f"captioning/parameters.py: {name} ({PARAMETERS[name]}) has type {annotation!r}; "
                          "a pipeline parameter must be a str, int, float or bool setting")
    return annotation


def is_nullable(name: str) -> bool:
    annotation = _field(PARAMETERS[name]).annotation
    return type(None) in typing.get_args(annotation)


def unset_value(name: str) -> Any:
    """What stands for null in KFP: 0 for a count, "" for a text."""
    return parameter_type(name)()


def to_overrides(values: dict[str, Any]) -> list[str]:
    """``section.key=value`` overrides for the given parameters; None means "as the preset says"."""
    overrides = []
    for name, value in values.items():
        if name not in PARAMETERS:
            raise ConfigError(f"{name}: not a pipeline parameter")
        if value is None:
            continue
        if is_nullable(name) and value == unset_value(name):
            value = "null"
        overrides.append(f"{PARAMETERS[name]}={value}")
    return overrides


def config_from_parameters(preset: str = PIPELINE_PRESET, **values: Any) -> Config:
    """The configuration a pod runs with: the preset, then each parameter it was given."""
    return load_config(preset=preset, overrides=to_overrides(values))


def parameters_from_config(cfg: Config) -> dict[str, Any]:
    """The pipeline parameters that reproduce ``cfg`` (compile defaults, submit, the Docker runner)."""
    out = {}
    for name, key in PARAMETERS.items():
        section, field = key.split(".")
        value = getattr(getattr(cfg, section), field)
        out[name] = unset_value(name) if value is None else parameter_type(name)(value)
    return out


def runtime_parameters(preset: str, overrides: list[str]) -> dict[str, Any]:
    """Every pipeline parameter for ``preset`` + ``overrides`` (``section.key=value``), validated.

    A setting the pipeline does not expose as a parameter is refused: the pods
    would never see it.
    """
    return _validated(preset, overrides, BY_KEY, "a pipeline parameter, so the pods", parameters_from_config)


def _validated(preset: str, overrides: list[str], keys, what: str, from_config) -> dict[str, Any]:
    cfg = load_config(None, overrides, preset)
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key not in keys:
            raise ConfigError(f"--set {text}: {key} is not {what} would not see it; "
                              f"settable here: {', '.join(sorted(keys))}")
    return {PRESET_PARAMETER: preset, **from_config(cfg)}


# The batch captioning pipeline's parameters (``pipeline.py --pipeline caption``) -> configuration key.
CAPTION_PARAMETERS: dict[str, str] = {
    "source": "batch.source",
    "model": "batch.model",
    "registry": "promote.registry",
    "collection": "promote.collection",
    "shard_images": "batch.shard_images",
    "caption_batch_size": "batch.batch_size",
    "sample": "batch.sample",
    "wandb_project": "wandb.project",
    "wandb_entity": "wandb.entity",
    "wandb_mode": "wandb.mode",
    "wandb_secret": "wandb.api_key_secret",
}


def caption_config(preset: str = PIPELINE_PRESET, **values: Any) -> Config:
    """The configuration a batch-captioning pod runs with: the preset, then the parameters it was given."""
    overrides = []
    for name, value in values.items():
        key = CAPTION_PARAMETERS[name]
        if value is None:
            continue
        if value == "" and key == "wandb.entity":
            value = "null"
        overrides.append(f"{key}={value}")
    return load_config(preset=preset, overrides=overrides)


def caption_parameters_from_config(cfg: Config) -> dict[str, Any]:
    out = {}
    for name, key in CAPTION_PARAMETERS.items():
        section, field = key.split(".")
        value = getattr(getattr(cfg, section), field)
        out[name] = "" if value is None else value
    return out


def caption_runtime_parameters(preset: str, overrides: list[str]) -> dict[str, Any]:
    """Every batch captioning parameter for ``preset`` + ``overrides``, validated; as ``runtime_parameters``."""
    return _validated(preset, overrides, set(CAPTION_PARAMETERS.values()),
                      "a parameter of the caption pipeline, so its pods", caption_parameters_from_config)
