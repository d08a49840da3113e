"""Compiled pipeline packages: which target they were compiled for, and their parameters."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from captioning.errors import SubmitError

PIPELINE_NAME = "captioning"
# Pipeline name in the package -> ``--pipeline`` that compiles it.
PIPELINE_NAMES = {PIPELINE_NAME: "train", "captioning-batch": "caption"}
_MARKER = re.compile(r"\[compiled for (\w+)\]")


@dataclass(frozen=True)
class Package:
    path: Path
    target: str
    parameters: dict[str, dict]  # name -> {"parameterType": ..., "defaultValue": ...}
    pipeline: str = "train"  # or caption (the batch captioning pipeline)


def read_package(path: str | Path) -> Package:
    """Read a package written by ``captioning compile`` / ``pipeline.py``; a clear error otherwise."""
    path = Path(path)
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except FileNotFoundError:
        raise SubmitError(f"{path}: pipeline package not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SubmitError(f"{path}: not a compiled pipeline (YAML): {exc}") from None
    spec = docs[0] if docs and isinstance(docs[0], dict) else {}
    info = spec.get("pipelineInfo") or {}
    if "root" not in spec or "deploymentSpec" not in spec:
        raise SubmitError(f"{path}: not a compiled KFP pipeline (no root/deploymentSpec)")
    if info.get("name") not in PIPELINE_NAMES:
        raise SubmitError(f"{path}: compiled from pipeline {info.get('name')!r}, not "
                          f"{' or '.join(map(repr, PIPELINE_NAMES))}")
    found = _MARKER.search(info.get("description", ""))
    if not found:
        raise SubmitError(f"{path}: its description names no target ('[compiled for ...]'); "
                          "recompile it with `captioning compile --target ...`")
    parameters = ((spec["root"].get("inputDefinitions") or {}).get("parameters")) or {}
    return Package(path, found.group(1), parameters, PIPELINE_NAMES[info["name"]])


def check_package(package: Package, target: str, parameters: dict, pipeline: str = "train") -> None:
    """The package must be compiled for ``target`` and ``pipeline`` and accept every parameter we send."""
    if package.pipeline != pipeline:
        raise SubmitError(f"{package.path}: the {package.pipeline} pipeline, not the {pipeline} pipeline; pass "
                          f"--pipeline {package.pipeline} or another --package")
    if package.target != target:
        raise SubmitError(
            f"{package.path}: compiled for {package.target}, not {target}; recompile with "
            f"`captioning compile --target {target}` or submit without --package")
    unknown = sorted(set(parameters) - set(package.parameters))
    if unknown:
        raise SubmitError(f"{package.path}: the pipeline has no parameter {', '.join(unknown)}; "
                          "it was compiled by another version: recompile it")
