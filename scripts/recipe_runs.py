"""Recipe runs on the demo: one factor at a time from a baseline, compared on validation.

Not part of CI (each run trains a model: minutes). Every run shares one work dir, so the
data steps run once; train keys its checkpoints by the settings, so a variant trains
afresh and a rerun of this script reuses what finished. Prints the table of docs/model-and-metrics.md.

    python scripts/recipe_runs.py --workdir work-recipe [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# name -> settings over the demo preset, after BASELINE: the preset as it was before the recipe was chosen
# (the "Choosing the recipe" table of docs/model-and-metrics.md, row for row).
BASELINE = ["train.attention_reg=1.0", "train.dropout=0.5", "train.learning_rate=0.003", "train.epochs=12",
            "train.patience=3", "train.scst_epochs=0"]
COMBINED = ["train.attention_reg=0", "train.dropout=0.1", "train.learning_rate=0.006"]
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "penalty λ=0.33": ["train.attention_reg=0.33"],
    "penalty λ=1/64 (mean over regions)": ["train.attention_reg=0.015625"],
    "penalty λ=0": ["train.attention_reg=0"],
    "dropout 0.3": ["train.dropout=0.3"],
    "dropout 0.1": ["train.dropout=0.1"],
    "learning rate 1e-3": ["train.learning_rate=0.001"],
    "learning rate 6e-3": ["train.learning_rate=0.006"],
    "epochs 16": ["train.epochs=16"],
    "no early stopping": ["train.patience=1000"],
    "combined": [*COMBINED, "train.epochs=16"],
    "combined, dropout 0": [*COMBINED, "train.epochs=16", "train.dropout=0"],
    "combined, epochs 20": [*COMBINED, "train.epochs=20"],
    "combined, epochs 30": [*COMBINED, "train.epochs=30"],
    "combined, epochs 20, units and context 512": [*COMBINED, "train.epochs=20", "train.units=512",
                                                   "train.context_dim=512"],
    "combined + SCST 4 (lr 5e-4)": [*COMBINED, "train.epochs=16", "train.scst_epochs=4", "train.scst_learning_rate=0.0005"],
    "combined + SCST 4 (lr 1e-4)": [*COMBINED, "train.epochs=16", "train.scst_epochs=4", "train.scst_learning_rate=0.0001"],
    "XE 20 + SCST 8 (lr 1e-4), the demo preset": [*COMBINED, "train.epochs=20", "train.scst_epochs=8",
                                                  "train.scst_learning_rate=0.0001"],
    "XE 20 + SCST 8 (lr 3e-4)": [*COMBINED, "train.epochs=20", "train.scst_epochs=8", "train.scst_learning_rate=0.0003"],
    "XE 24 + SCST 4 (lr 1e-4)": [*COMBINED, "train.epochs=24", "train.scst_epochs=4", "train.scst_learning_rate=0.0001"],
}


def run(name: str, settings: list[str], workdir: Path) -> dict:
    out = workdir / "recipe" / (name.replace(" ", "_").replace("/", "-") + ".json")
    if out.exists():
        return json.loads(out.read_text())
    sets = [arg for s in BASELINE + settings for arg in ("--set", s)]
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "captioning.cli", "run", "--workdir", str(workdir),
                           "--summary-json", str(workdir / "recipe" / "last-summary.json"), *sets],
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{name}: captioning run failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((workdir / "recipe" / "last-summary.json").read_text())
    train, test = summary["steps"]["train"]["metrics"], summary["steps"]["evaluate"]["metrics"]
    row = {"name": name, "settings": settings, "val_CIDEr": train.get("val_CIDEr"),
           "val_two_object": train.get("val_two_object_scenes_correct"), "best_epoch": train["best_epoch"],
           "epochs": train["epochs"], "train_seconds": train.get("train_seconds"),
           "test_CIDEr": test["CIDEr"], "test_two_object": test.get("two_object_scenes_correct"),
           "test_two_object_scenes": test.get("two_object_scenes"), "run_seconds": round(time.monotonic() - started)}
    out.write_text(json.dumps(row))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("work-recipe"))
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--extra", nargs="*", default=[], help="NAME=SETTING[,SETTING...] variants beside the list")
    args = parser.parse_args()
    variants = dict(VARIANTS)
    for item in args.extra:
        name, _, settings = item.partition("=")
        variants[name] = settings.split(",")
    (args.workdir / "recipe").mkdir(parents=True, exist_ok=True)
    rows = []
    for name, settings in variants.items():
        if args.only and name not in args.only:
            continue
        rows.append(run(name, settings, args.workdir))
        print(json.dumps(rows[-1]), flush=True)
    print("| run | settings | val CIDEr | val two-object | best epoch / run | train s | test CIDEr | test two-object |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['name']} | {' '.join(r['settings']) or '(preset)'} | {r['val_CIDEr']:.3f} | "
              f"{r['val_two_object']:.3f} | {r['best_epoch']}/{r['epochs']} | {r['train_seconds']} | "
              f"{r['test_CIDEr']:.3f} | {r['test_two_object']:.3f} ({r['test_two_object_scenes']}) |")


if __name__ == "__main__":
    main()
