"""Runtime parameters of a submission, from the same validated configuration as local runs."""

from __future__ import annotations

from typing import Any

from captioning.config import load_config
from captioning.errors import ConfigError
from captioning.params import BY_KEY, parameters_from_config


def runtime_parameters(preset: str, overrides: list[str]) -> dict[str, Any]:
    """Every pipeline parameter for ``preset`` + ``overrides`` (``section.key=value``), validated.

    A setting the pipeline does not expose as a parameter is refused: the pods
    would never see it.
    """
    cfg = load_config(None, overrides, preset)
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key not in BY_KEY:
            raise ConfigError(
                f"--set {text}: {key} is not a pipeline parameter, so the pods would not see it; "
                f"settable here: {', '.join(sorted(BY_KEY))}")
    return {"preset": preset, **parameters_from_config(cfg)}
