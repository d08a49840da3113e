"""The trained model as a folder: everything needed to caption a new image.

```
model/
  captioner.keras        Keras 3 archive (config + weights; loaded with safe_mode=True)
  backbone.weights.h5    the exact InceptionV3 the features came from
  vocab.json             the vocabulary
  meta.json              max_length, backbone settings, the training config, metrics
  history.json           per-epoch training history
```
"""

from __future__ import annotations

import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from captioning.errors import CaptioningError
from captioning.io import read_json, removed_on_failure, require_free_space, weights_bytes, write_json_atomic
from captioning.text import Vocabulary

MODEL_FILE = "captioner.keras"
BACKBONE_FILE = "backbone.weights.h5"


class ModelError(CaptioningError):
    pass


@dataclass
class Bundle:
    root: Path
    model: object  # captioning.model.Captioner
    vocab: Vocabulary
    meta: dict

    @property
    def max_length(self) -> int:
        return int(self.meta["max_length"])


def save_bundle(root: Path, model, vocab: Vocabulary, meta: dict, backbone_weights: Path, history: list[dict]) -> Path:
    """Write to a staging folder, then swap it in: a reader never sees half a model."""
    root = Path(root)
    staging = root.with_name(f".{root.name}.staging")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    needed = weights_bytes(model) + Path(backbone_weights).stat().st_size
    require_free_space(staging, needed, f"saving the model {root}")
    with removed_on_failure(staging):
        model.save(staging / MODEL_FILE)
        shutil.copyfile(backbone_weights, staging / BACKBONE_FILE)
        vocab.save(staging / "vocab.json")
        write_json_atomic(staging / "meta.json", meta)
        write_json_atomic(staging / "history.json", history)
    if root.exists():
        shutil.rmtree(root)
    staging.rename(root)
    return root


def load_bundle(path: str | Path) -> Bundle:
    """Load with Keras' safe mode; every failure names the file and the problem."""
    import keras

    import captioning.model  # noqa: F401  registers Captioner for deserialisation

    path = Path(path)
    root = path.parent if path.is_file() and path.name == MODEL_FILE else path
    if not root.exists():
        raise ModelError(f"{path}: no such model folder")
    model_file = root / MODEL_FILE
    if not model_file.is_file():
        raise ModelError(f"{path}: not a captioning model (no {MODEL_FILE}); pass the train step's 'model' output")
    if not zipfile.is_zipfile(model_file):
        raise ModelError(f"{model_file}: not a Keras model archive")
    for name in ("vocab.json", "meta.json", BACKBONE_FILE):
        if not (root / name).is_file():
            raise ModelError(f"{root}: incomplete model folder, {name} is missing")
    try:
        model = keras.saving.load_model(model_file, safe_mode=True, compile=False)
    except Exception as exc:
        raise ModelError(f"{model_file}: cannot load the model: {exc}") from None
    _float32_without_gpu(model)
    meta = read_json(root / "meta.json", "model metadata")
    return Bundle(root, model, Vocabulary.load(root / "vocab.json"), meta)


def _float32_without_gpu(model) -> None:
    """A model trained with mixed precision keeps its float16 policy when saved; without a GPU, float16 is
    slower and less precise, so decode in float32 there (the weights are float32 either way)."""
    import keras
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return
    for layer in (model, *model.layers):
        if layer.dtype_policy.compute_dtype != "float32":
            layer.dtype_policy = keras.DTypePolicy("float32")
