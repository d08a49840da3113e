"""train: teacher-forced training of the captioner on process_data's features.

Resumable: ``BackupAndRestore`` keeps the latest model and optimizer state in
``checkpoints/backup``; a restarted step (a pre-empted GPU node) continues from
the last finished epoch. Every epoch's weights are kept as well, and the
per-epoch history is appended to ``history.csv``, so the best epoch is chosen
across restarts. All of it lives in a folder keyed by the training settings and
the processed data (``captioning.checkpoints``): other settings or data never
resume it. A finished model whose key is unchanged is reused, not retrained.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from pathlib import Path

from captioning.bundle import MODEL_FILE, save_bundle
from captioning.checkpoints import CheckpointFolder, save_every_epoch
from captioning.config import Config
from captioning.dataset import ProcessedDataset
from captioning.errors import ConfigError
from captioning.io import file_lock, read_json, write_json_atomic
from captioning.steps.result import StepResult

log = logging.getLogger(__name__)

def _code_fingerprint() -> str:
    """The captioning package's source: a rebuilt image with other training code must not resume old epochs."""
    import captioning

    digest = hashlib.sha256()
    package = Path(captioning.__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _data_fingerprint(data: ProcessedDataset) -> str:
    """The processed data's content where it is small (manifest, vocabulary, captions, feature statistics) and
    its feature shards' names and sizes: other data with the same counts still gets another key."""
    digest = hashlib.sha256(json.dumps(data.manifest, sort_keys=True).encode())
    small = [data.manifest["vocab"], data.manifest["feature_stats"],
             *(info["captions_file"] for _, info in sorted(data.manifest["splits"].items()))]
    for name in small:
        digest.update(name.encode() + b"\0" + (data.root / name).read_bytes())
    for split in ("train", "val"):
        for shard in data.shard_files(split):
            digest.update(f"{Path(shard).name}:{Path(shard).stat().st_size}".encode())
    return digest.hexdigest()


def _signature(cfg: Config, data: ProcessedDataset) -> str:
    """The checkpoint key: training settings (not where checkpoints live), the data and the code."""
    payload = {"train": cfg.train.model_dump(exclude={"checkpoint_dir"}), "data": _data_fingerprint(data),
               "code": _code_fingerprint()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _epochs_without_improvement(history: list[dict], patience: int) -> int:
    """EarlyStopping's count after these epochs (it starts from zero at every fit, so a resumed run replays it)."""
    best, wait = math.inf, 0
    for row in history:
        wait += 1
        if row["val_loss"] < best:
            best, wait = row["val_loss"], 0
    return wait


def _early_stopping(patience: int, history: list[dict]):
    import keras

    class ResumedEarlyStopping(keras.callbacks.EarlyStopping):
        """Early stopping that remembers the epochs trained before a restart."""

        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            if history:
                self.best = min(row["val_loss"] for row in history)
                self.wait = _epochs_without_improvement(history, patience)

    return ResumedEarlyStopping(monitor="val_loss", patience=patience)


def _use_mixed_precision(setting: str) -> bool:
    if setting == "off":
        return False
    import tensorflow as tf

    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    if setting == "on" and not has_gpu:
        log.warning("train.mixed_precision=on but no GPU is visible; training in float32")
    return has_gpu


def _read_history(path: Path) -> list[dict]:
    """One row per epoch; an epoch run again after a restart keeps its last row."""
    if not path.exists():
        return []
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    by_epoch = {}
    for row in rows:
        parsed = {k: (int(v) if k == "epoch" else float(v)) for k, v in row.items() if v != ""}
        by_epoch[parsed["epoch"]] = parsed
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def build_model(cfg: Config, vocab_size: int, stats: dict | None = None):
    from captioning.model import Captioner

    model = Captioner(vocab_size, cfg.train.embedding_dim, cfg.train.units, cfg.train.dropout, cfg.train.attention_reg)
    model.build()
    if stats is not None:
        model.set_feature_stats(stats["mean"], stats["std"])
    return model


def train(cfg: Config, dataset_dir: str | Path, work_dir: str | Path, callbacks: list | None = None,
          model_dir: str | Path | None = None) -> StepResult:
    """Checkpoints and history go to ``train.checkpoint_dir`` (default ``work_dir``), in the folder of this
    run's key; the model folder to ``model_dir`` (default ``work_dir/model``)."""
    work_dir = Path(work_dir)
    data = ProcessedDataset.open(dataset_dir)
    signature = _signature(cfg, data)
    model_dir = Path(model_dir) if model_dir else work_dir / "model"
    store = CheckpointFolder(cfg.train.checkpoint_dir or work_dir, signature, work_dir)
    with file_lock(store.folder / "train"):  # runs of one key on a shared volume take turns: the second reuses the first
        return _train_keyed(cfg, data, signature, store, model_dir, callbacks)


def _train_keyed(cfg: Config, data: ProcessedDataset, signature: str, store: CheckpointFolder, model_dir: Path,
                 callbacks: list | None) -> StepResult:
    import keras
    import tensorflow as tf

    store.restore()
    out_dir = store.folder
    done_file = out_dir / "train_done.json"
    finished = done_file.exists() and read_json(done_file).get("signature") == signature
    if finished and (model_dir / MODEL_FILE).exists():
        log.info("train: %s already holds a model of these settings and data; reusing it", model_dir)
        return StepResult(metrics={**read_json(done_file)["metrics"], "reused": True}, outputs={"model": str(model_dir)})

    ckpt_dir = out_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(cfg.train.seed)
    tf.config.experimental.enable_op_determinism()
    mixed = _use_mixed_precision(cfg.train.mixed_precision)
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    try:
        model = build_model(cfg, len(data.vocab), data.feature_stats())
    finally:
        keras.mixed_precision.set_global_policy("float32")

    train_ds = data.caption_pairs("train", cfg.train.batch_size, shuffle=True, seed=cfg.train.seed)
    val_ds = data.caption_pairs("val", cfg.train.batch_size, shuffle=False)
    steps_per_epoch = math.ceil(data.pair_count("train") / cfg.train.batch_size)
    total_steps = max(steps_per_epoch * cfg.train.epochs, cfg.train.warmup_steps + 1)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=total_steps - cfg.train.warmup_steps, alpha=0.05,
        warmup_target=cfg.train.learning_rate, warmup_steps=cfg.train.warmup_steps,
    )
    model.compile(optimizer=keras.optimizers.Adam(schedule, clipnorm=5.0))

    history_csv = out_dir / "history.csv"
    epoch_weights = ckpt_dir / "epoch-{epoch:03d}.weights.h5"
    backup = keras.callbacks.BackupAndRestore(str(ckpt_dir / "backup"), save_freq="epoch", delete_checkpoint=False)
    resumed_from = _read_history(history_csv)
    if not finished and _epochs_without_improvement(resumed_from, cfg.train.patience) >= cfg.train.patience:
        finished = True  # it had stopped early before the restart: do not train on past that
    if resumed_from and (ckpt_dir / "backup").exists():
        log.info("train: resuming after epoch %d from %s", resumed_from[-1]["epoch"] + 1, store)
    else:
        log.info("train: starting afresh; checkpoints go to %s", store)
    fit_callbacks = [
        backup,
        keras.callbacks.ModelCheckpoint(str(epoch_weights), save_weights_only=True),
        keras.callbacks.CSVLogger(str(history_csv), append=True),
        save_every_epoch(store),  # after the callbacks that write the folder
        _early_stopping(cfg.train.patience, resumed_from),
        *(callbacks or []),
    ]
    if finished:  # trained before (a new pod's empty model folder): rebuild the model from the best epoch
        log.info("train: %s finished training earlier; saving its best epoch", store)
    else:
        model.fit(train_ds, validation_data=val_ds, epochs=cfg.train.epochs, callbacks=fit_callbacks, verbose=2,
                  shuffle=False)  # tf.data shuffles, seeded

    history = _read_history(history_csv)
    if not history:
        raise ConfigError(f"{history_csv}: training recorded no epoch")
    best = min(history, key=lambda row: row["val_loss"])
    model.load_weights(str(epoch_weights).format(epoch=best["epoch"] + 1))
    meta = {
        "max_length": data.max_length,
        "backbone": data.manifest["backbone"],
        "config": cfg.model_dump(mode="json"),
        "best_epoch": best["epoch"] + 1,
        "val_loss": best["val_loss"],
        "dataset_signature": signature,
    }
    save_bundle(model_dir, model, data.vocab, meta, data.root / data.manifest["backbone"]["weights_file"], history)
    metrics = {
        "epochs": len(history), "best_epoch": best["epoch"] + 1,
        "loss": history[-1]["loss"], "val_loss": best["val_loss"],
        "val_perplexity": math.exp(min(best["val_loss"], 50.0)),
        "resumed_epochs": len(resumed_from),
        "parameters": int(model.count_params()),
    }
    write_json_atomic(done_file, {"signature": signature, "metrics": metrics})
    store.save()
    return StepResult(metrics=metrics, outputs={"model": str(model_dir), "checkpoints": str(store)})
