"""docs/configuration.md, generated from the configuration model: every setting, both presets' values, its type
and range, and its description. ``make docs`` writes it; tests/test_docs.py fails when the file differs.

    python -m captioning.settings_reference docs/configuration.md
"""

from __future__ import annotations

import html
import json
import sys
import typing
from pathlib import Path

import annotated_types
from pydantic.fields import FieldInfo

from captioning.config import PRESETS, Config, load_config

HEADER = """\
# Configuration reference

<!-- Generated from src/captioning/config.py by `make docs`; tests/test_docs.py fails when it differs. -->

Every step reads one typed configuration (`captioning.config.Config`, a pydantic model). Its
defaults are the full COCO run, the `coco2014` preset; `src/captioning/presets/demo.yaml` holds only
what the demo changes. Settings come from the preset (`--preset`, default `demo`), then `--config FILE`
(YAML, same sections), then each `--set section.key=value` in order. The same keys are the
pipeline's parameters (`src/captioning/parameters.py` names which) and `captioning submit --set`.

Unknown keys, wrong types and out-of-range values are refused before anything runs, naming the key
(exit 2):

```
$ captioning run --set train.epochz=3
error: preset demo + --set: train.epochz: unknown key
```

Every number must be finite; config files that are folders, binary, not UTF-8, over 1 MiB or nested
absurdly deep are refused too. Values below are JSON (a list or mapping one entry a line).
"""

def _value(value) -> str:
    """The value in full, as JSON in a code span (a list or mapping one entry after another)."""
    if isinstance(value, dict) and value:
        return "<br>".join(f"`{json.dumps(k)}: {json.dumps(v)}`" for k, v in value.items())
    if isinstance(value, list) and value:
        return "<br>".join(f"`{json.dumps(v, ensure_ascii=False)}`" for v in value)
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _type(field: FieldInfo) -> str:
    annotation = field.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    nullable = type(None) in typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        text = " \\| ".join(json.dumps(a) for a in typing.get_args(annotation))
    elif nullable and len(args) == 1:
        text = _type(FieldInfo(annotation=args[0])) + " or null"
    else:
        text = getattr(annotation, "__name__", str(annotation)).replace("typing.", "")
        if typing.get_origin(annotation) in (list, dict):
            text = str(annotation).replace("typing.", "")
            text = text.split("[")[0] if "Annotated" in text else text
    bounds = []
    for rule in field.metadata:
        for name, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if isinstance(rule, getattr(annotated_types, name.capitalize())):
                bounds.append(f"{sign} {getattr(rule, name):,}")
    return text + (f", {' and '.join(bounds)}" if bounds else "")


def render() -> str:
    presets = {name: load_config(preset=name).model_dump(mode="json") for name in PRESETS}
    lines = [HEADER]
    for section, section_field in Config.model_fields.items():
        model = section_field.annotation
        lines += [f"\n## {section}\n"]
        if model.__doc__ and model.__doc__ != Config.__mro__[1].__doc__ and "Section" not in model.__doc__:
            lines += [model.__doc__.strip().splitlines()[0] + "\n"]
        lines += ["| setting | " + " | ".join(PRESETS) + " | type | what it does |",
                  "|---|" + "---|" * len(PRESETS) + "---|---|"]
        for name, field in model.model_fields.items():
            if not field.description:
                raise ValueError(f"src/captioning/config.py: {section}.{name} has no description")
            values = " | ".join(_value(presets[preset][section][name]) for preset in PRESETS)
            description = html.escape(" ".join(field.description.split()), quote=False).replace("|", "\\|")
            lines.append(f"| `{section}.{name}` | {values} | {_type(field)} | {description} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m captioning.settings_reference OUTPUT.md", file=sys.stderr)
        return 2
    Path(argv[0]).write_text(render())
    print(argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
