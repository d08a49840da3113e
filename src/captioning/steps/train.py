"""train: teacher-forced training of the captioner on process_data's features.

Resumable: ``BackupAndRestore`` keeps the latest model and optimizer state in
``checkpoints/backup``; a restarted step (a pre-empted GPU node) continues from
the last finished epoch. Every epoch's weights are kept as well, and the
per-epoch history is appended to ``history.csv``, so the best epoch is chosen
across restarts. A finished model whose training settings and data are
unchanged is reused, not retrained.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from pathlib import Path

from captioning.bundle import MODEL_FILE, save_bundle
from captioning.config import Config
from captioning.dataset import ProcessedDataset
from captioning.errors import ConfigError
from captioning.io import read_json, write_json_atomic
from captioning.steps.result import StepResult

log = logging.getLogger(__name__)

SIZE_KEYS = ("embedding_dim", "units")


def _signature(cfg: Config, data: ProcessedDataset) -> str:
    # Where checkpoints live does not change the model.
    payload = {"train": cfg.train.model_dump(exclude={"checkpoint_dir"}), "dataset": data.manifest}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _check_checkpoint_sizes(ckpt_dir: Path, cfg: Config, vocab_size: int) -> None:
    """Refuse to resume a checkpoint of another shape, before Keras fails obscurely."""
    recorded = ckpt_dir / "model_sizes.json"
    current = {**{k: getattr(cfg.train, k) for k in SIZE_KEYS}, "vocab_size": vocab_size}
    if recorded.exists():
        old = json.loads(recorded.read_text())
        diff = [f"{k}={current[k]} (checkpoint: {old.get(k)})" for k in current if old.get(k) != current[k]]
        if diff:
            raise ConfigError(
                f"{ckpt_dir}: the checkpoint was written with other model sizes: {', '.join(diff)}; "
                "restore those settings or use a fresh output folder"
            )
    else:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(recorded, current)


def _use_mixed_precision(setting: str) -> bool:
    if setting == "off":
        return False
    import tensorflow as tf

    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    if setting == "on" and not has_gpu:
        log.warning("train.mixed_precision=on but no GPU is visible; training in float32")
    return has_gpu


def _read_history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items() if v != ""} for row in rows]


def build_model(cfg: Config, vocab_size: int, stats: dict | None = None):
    from captioning.model import Captioner

    model = Captioner(vocab_size, cfg.train.embedding_dim, cfg.train.units, cfg.train.dropout, cfg.train.attention_reg)
    model.build()
    if stats is not None:
        model.set_feature_stats(stats["mean"], stats["std"])
    return model


def train(cfg: Config, dataset_dir: str | Path, out_dir: str | Path, callbacks: list | None = None,
          model_dir: str | Path | None = None) -> StepResult:
    """Checkpoints and history go to ``out_dir``; the model folder to ``model_dir`` (default ``out_dir/model``)."""
    import keras
    import tensorflow as tf

    out_dir = Path(out_dir)
    data = ProcessedDataset.open(dataset_dir)
    signature = _signature(cfg, data)
    model_dir = Path(model_dir) if model_dir else out_dir / "model"
    done_file = out_dir / "train_done.json"
    if done_file.exists() and (model_dir / MODEL_FILE).exists():
        done = read_json(done_file)
        if done.get("signature") == signature:
            log.info("train: %s already holds a model of these settings and data; reusing it", model_dir)
            return StepResult(metrics={**done["metrics"], "reused": True}, outputs={"model": str(model_dir)})

    ckpt_dir = out_dir / "checkpoints"
    _check_checkpoint_sizes(ckpt_dir, cfg, len(data.vocab))
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
    if resumed_from and (ckpt_dir / "backup").exists():
        log.info("train: resuming after epoch %d from %s", resumed_from[-1]["epoch"] + 1, ckpt_dir / "backup")
    fit_callbacks = [
        backup,
        keras.callbacks.ModelCheckpoint(str(epoch_weights), save_weights_only=True),
        keras.callbacks.CSVLogger(str(history_csv), append=True),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.train.patience),
        *(callbacks or []),
    ]
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
    return StepResult(metrics=metrics, outputs={"model": str(model_dir), "checkpoints": str(ckpt_dir)})
