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
import time
from pathlib import Path

from captioning.bundle import MODEL_FILE, save_bundle
from captioning.checkpoints import CheckpointFolder, save_every_epoch
from captioning.config import Config
from captioning.dataset import BATCHING, ProcessedDataset, memory_budget, shuffle_epoch_callback
from captioning.validation import ValidationCaptions, caption_metric_callback, choose_decoding
from captioning.errors import ConfigError, TrainingError
from captioning.redact import redact_tree
from captioning.io import (atomic_path, file_lock, read_json, require_free_space, save_weights_atomic, weights_bytes,
                           write_json_atomic)
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
    # Not where checkpoints live, nor the decodings tried after training (decoding.json records its grid).
    # Nor where the features are read from (memory or disk): the batches are the same.
    # Nor the self-critical stage's settings: changing only those reuses the cross-entropy epochs (``_scst_key``).
    settings = cfg.train.model_dump(exclude={"checkpoint_dir", "decode_beam_widths", "decode_length_penalties",
                                             "feature_memory", *SCST_SETTINGS})
    payload = {"train": settings, "data": _data_fingerprint(data), "batching": BATCHING,
               "code": _code_fingerprint()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


SCST_SETTINGS = ("scst_epochs", "scst_samples", "scst_baseline", "scst_learning_rate")


def _scst_key(cfg: Config, with_epochs: bool = False) -> str:
    """The self-critical stage's folder inside the cross-entropy key's: its settings but the number of epochs
    (a constant rate, so more epochs extend the stage rather than start it again)."""
    settings = {name: getattr(cfg.train, name) for name in SCST_SETTINGS if with_epochs or name != "scst_epochs"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _best_epoch(history: list[dict], monitor: str) -> dict:
    """The epoch with the highest selection metric (the first of equals)."""
    return max(history, key=lambda row: row.get(monitor, -math.inf))


def _epochs_without_improvement(history: list[dict], monitor: str) -> int:
    """EarlyStopping's count after these epochs (it starts from zero at every fit, so a resumed run replays it)."""
    best, wait = -math.inf, 0
    for row in history:
        wait += 1
        if row.get(monitor, -math.inf) > best:
            best, wait = row[monitor], 0
    return wait


def _early_stopping(patience: int, history: list[dict], monitor: str):
    import keras

    class ResumedEarlyStopping(keras.callbacks.EarlyStopping):
        """Early stopping on a caption metric (higher is better) that remembers the epochs before a restart."""

        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            if history:
                self.best = _best_epoch(history, monitor)[monitor]
                self.wait = _epochs_without_improvement(history, monitor)

    return ResumedEarlyStopping(monitor=monitor, mode="max", patience=patience)


def _stop_on_non_finite_loss(out_dir: Path):
    import keras

    class StopOnNonFiniteLoss(keras.callbacks.Callback):
        """Keras' TerminateOnNaN only stops quietly, and the run would then save and promote a broken model."""

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(float(loss)):
                raise TrainingError(
                    f"{out_dir}: the training loss became {float(loss)} at epoch {self.epoch + 1}, batch {batch + 1}; "
                    "lower train.learning_rate or check the features (process_data's feature_stats.json)")

    return StopOnNonFiniteLoss()


def _epoch_weights(pattern: Path):
    """Keras' ModelCheckpoint, but each file complete or absent: the best epoch is loaded from these."""
    import keras

    class EpochWeights(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            save_weights_atomic(self.model, str(pattern).format(epoch=epoch + 1))

    return EpochWeights()


def _backup_and_restore(folder: Path):
    """Keras' BackupAndRestore writes its weights in place, so a full disk or a kill mid-write leaves a file the
    next attempt cannot load: here the weights, then the epoch they belong to, are each renamed into place."""
    import keras

    class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
        """Also keeps the random generators' states (dropout's), which the weights file does not hold, so that a
        resumed epoch draws the masks the uninterrupted run drew (the data order is keyed by seed and epoch)."""

        def _seed_states(self) -> list:
            return [v for v in self.model.variables if v.path.split("/")[-1] == "seed_generator_state"]

        def _save_model(self):
            save_weights_atomic(self.model, self._weights_path)
            # In the model's order: their names carry a per-process counter (seed_generator_3...)
            write_json_atomic(self._training_metadata_path, {
                "epoch": self._current_epoch, "batch": self._last_batch_seen,
                "seed_states": [[int(x) for x in v.numpy().ravel()] for v in self._seed_states()]})

        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            meta = Path(self._training_metadata_path)
            saved = read_json(meta).get("seed_states") if meta.exists() else None
            states = self._seed_states()
            if saved is not None and len(saved) == len(states):
                for variable, state in zip(states, saved):
                    variable.assign(keras.ops.convert_to_tensor(state, dtype=variable.dtype))
            elif meta.exists() and states:
                log.warning("train: the checkpoint holds no random-generator state for this model; the resumed "
                            "epochs draw other dropout masks than an uninterrupted run would")

    return AtomicBackupAndRestore(str(folder), save_freq="epoch", delete_checkpoint=False)


def free_space_guard(needs: list[tuple[Path, int]]):
    """Before an epoch's files are written, check each volume can hold them (``needs``: a folder and how many
    weights files of this model go there): a clean error, not HDF5 failing half way through a file."""
    import keras

    class FreeSpaceGuard(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            size = weights_bytes(self.model)
            by_volume: dict[int, tuple[Path, int]] = {}
            for folder, copies in needs:
                folder.mkdir(parents=True, exist_ok=True)
                device = folder.stat().st_dev
                first, total = by_volume.get(device, (folder, 0))
                by_volume[device] = (first, total + copies * size)
            for folder, total in by_volume.values():
                require_free_space(folder, total, f"epoch {epoch + 1}'s checkpoints")

    return FreeSpaceGuard()


def _history_csv(path: Path):
    import keras

    class AtomicHistory(keras.callbacks.Callback):
        """Keras' CSVLogger appends to the file in place: a run killed mid-write, or two writers, leave a
        file no later run can read. This rewrites the whole history beside it and renames it into place."""

        started: float | None = None

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.monotonic()

        def on_epoch_end(self, epoch, logs=None):
            logs = {} if logs is None else logs
            if self.started is not None:  # training and validation of the epoch
                logs["epoch_seconds"] = time.monotonic() - self.started
            rows = [row for row in _read_history(path) if row["epoch"] != epoch]
            rows.append({"epoch": epoch, **{k: float(v) for k, v in logs.items()}})
            fields = list(dict.fromkeys(key for row in rows for key in row))
            with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fields)
                writer.writeheader()
                writer.writerows(rows)

    return AtomicHistory()


def _use_mixed_precision(setting: str) -> bool:
    if setting == "off":
        return False
    import tensorflow as tf

    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    if setting == "on" and not has_gpu:
        log.warning("train.mixed_precision=on but no GPU is visible; training in float32")
    return has_gpu


def use_determinism(setting: str) -> bool:
    """Deterministic ops, or not; TensorFlow's op determinism rules XLA out (Keras then compiles without it)."""
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config

    on = setting == "on" or (setting == "auto" and not tf.config.list_physical_devices("GPU"))
    if on:
        tf.config.experimental.enable_op_determinism()
    else:
        tf_config.disable_op_determinism()
    return on


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

    t = cfg.train
    model = Captioner(vocab_size, t.embedding_dim, t.units, t.dropout, t.attention_reg, context_dim=t.context_dim)
    model.build()
    if stats is not None:
        model.set_feature_stats(stats["mean"], stats["std"])
    return model


def train(cfg: Config, dataset_dir: str | Path, work_dir: str | Path, callbacks: list | None = None,
          model_dir: str | Path | None = None) -> StepResult:
    """Checkpoints and history go to ``train.checkpoint_dir`` (default ``work_dir``), in the folder of this
    run's key; the model folder to ``model_dir`` (default ``work_dir/model``)."""
    work_dir = Path(work_dir)
    data = ProcessedDataset.open(dataset_dir).staged(work_dir)
    signature = _signature(cfg, data)
    model_dir = Path(model_dir) if model_dir else work_dir / "model"
    store = CheckpointFolder(cfg.train.checkpoint_dir or work_dir, signature, work_dir)
    with file_lock(store.folder / "train"):  # runs of one key on a shared volume take turns: the second reuses the first
        return _train_keyed(cfg, data, signature, store, model_dir, callbacks)


def _result_signature(cfg: Config, signature: str) -> str:
    """What a finished model stands for: the cross-entropy key and, when on, the self-critical stage's."""
    return f"{signature}+scst-{_scst_key(cfg, with_epochs=True)}" if cfg.train.scst_epochs else signature


def _self_critical_stage(cfg: Config, data: ProcessedDataset, model, batches, validation, store: CheckpointFolder,
                         xe_best: dict, xe_weights: Path, callbacks: list | None) -> tuple[list[dict], Path]:
    """Self-critical epochs from the best cross-entropy epoch, numbered on from the cross-entropy ones, in a
    folder of their own settings inside the cross-entropy key's (resumed and early-stopped the same way: it
    stops when ``train.patience`` of its epochs do not beat the best epoch of either stage). Returns its
    history rows and the pattern of its epochs' weights."""
    import keras
    import tensorflow as tf

    from captioning.scst import CiderD, epoch_means, image_references, self_critical

    t, vocab = cfg.train, data.vocab
    folder = store.folder / f"scst-{_scst_key(cfg)}"
    ckpt_dir = folder / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    history_csv, weights = folder / "history.csv", ckpt_dir / "epoch-{epoch:03d}.weights.h5"
    monitor = f"val_{t.select_metric}"
    start = _xe_epochs(store.folder)
    backup_meta = ckpt_dir / "backup" / "training_metadata.json"
    backed_up = read_json(backup_meta).get("epoch", 0) if backup_meta.exists() else 0
    resumed = [row for row in _read_history(history_csv) if row["epoch"] < backed_up]
    finished = backed_up >= start + t.scst_epochs or (
        bool(resumed) and _epochs_without_improvement([xe_best, *resumed], monitor) >= t.patience)
    if not finished:
        model.load_weights(str(xe_weights).format(epoch=xe_best["epoch"] + 1))  # from the best cross-entropy epoch
        cider = CiderD(image_references(batches), len(vocab))
        critic = self_critical(model, cider, t.scst_samples, t.scst_baseline, vocab.start_id, vocab.end_id,
                               data.max_length, vocab.non_words, t.seed)
        critic.compile(optimizer=keras.optimizers.Adam(t.scst_learning_rate, clipnorm=5.0), jit_compile=False)
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        log.info("train: self-critical stage, epochs %d-%d, %d samples an image, %s baseline, %s", start + 1,
                 start + t.scst_epochs, t.scst_samples, t.scst_baseline,
                 f"resuming after epoch {backed_up}" if resumed else "from the best cross-entropy epoch "
                 f"({xe_best['epoch'] + 1})")
        critic.fit(batches.image_dataset(shuffle=True, seed=t.seed, epoch=epoch), initial_epoch=start,
                   epochs=start + t.scst_epochs, verbose=2, callbacks=[
                       epoch_means(),  # first: the callbacks below see the epoch's means
                       _stop_on_non_finite_loss(folder), shuffle_epoch_callback(epoch),
                       caption_metric_callback(validation), free_space_guard([(ckpt_dir, 2)]),
                       _epoch_weights(weights), _history_csv(history_csv), _backup_and_restore(ckpt_dir / "backup"),
                       save_every_epoch(store), _early_stopping(t.patience, [xe_best, *resumed], monitor),
                       *(callbacks or [])])
        store.save()
    # Epochs past this run's count (an earlier run asked for more) are not this model's.
    rows = [{**row, "stage": "scst"} for row in _read_history(history_csv) if row["epoch"] < start + t.scst_epochs]
    return rows, weights


def _xe_epochs(folder: Path) -> int:
    """How many cross-entropy epochs the key's history holds: the self-critical epochs are numbered after them."""
    return len(_read_history(folder / "history.csv"))


def _same_model(cfg: Config, model_dir: Path, result_signature: str) -> bool:
    """The model folder holds this key's result (both stages) with this decoding grid."""
    path = model_dir / "meta.json"
    meta = read_json(path, "model metadata") if path.exists() else {}
    grid = (meta.get("decoding") or {}).get("grid")
    # A folder written before the signature was recorded holds a cross-entropy model of the dataset key.
    recorded = meta.get("train_signature", meta.get("dataset_signature"))
    return recorded == result_signature and grid == {"beam_widths": cfg.train.decode_beam_widths,
                                                      "length_penalties": cfg.train.decode_length_penalties}


def _train_keyed(cfg: Config, data: ProcessedDataset, signature: str, store: CheckpointFolder, model_dir: Path,
                 callbacks: list | None) -> StepResult:
    import keras
    import tensorflow as tf

    store.restore()
    out_dir = store.folder
    done_file = out_dir / "train_done.json"
    finished = done_file.exists() and read_json(done_file).get("signature") == _result_signature(cfg, signature)
    if finished and (model_dir / MODEL_FILE).exists() and _same_model(cfg, model_dir, _result_signature(cfg, signature)):
        log.info("train: %s already holds a model of these settings and data; reusing it", model_dir)
        return StepResult(metrics={**read_json(done_file)["metrics"], "reused": True}, outputs={"model": str(model_dir)})

    ckpt_dir = out_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(cfg.train.seed)
    deterministic = use_determinism(cfg.train.deterministic)
    mixed = _use_mixed_precision(cfg.train.mixed_precision)
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    try:
        model = build_model(cfg, len(data.vocab), data.feature_stats())
    finally:
        keras.mixed_precision.set_global_policy("float32")

    shuffle_epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
    budget = memory_budget(cfg.train.feature_memory)
    train_batches = data.image_batches("train", cfg.train.batch_size, cfg.train.captions_per_image, budget)
    val_batches = data.image_batches("val", cfg.train.batch_size, cfg.train.captions_per_image,
                                     budget - (train_batches.store.bytes if train_batches.in_memory else 0))
    train_ds = train_batches.dataset(shuffle=True, seed=cfg.train.seed, epoch=shuffle_epoch)
    val_ds = val_batches.dataset(shuffle=False)
    shapes = {"train": train_batches.shapes, "val": val_batches.shapes}
    log.info("train: %d images x %d captions a batch; batch shapes (B, K, T): %d for training %s, %d for "
             "validation: at most as many XLA compilations of each step; features %s", train_batches.images_per_batch,
             train_batches.captions_per_image, len(shapes["train"]), [t for _, _, t in shapes["train"]],
             len(shapes["val"]), "in memory" if train_batches.in_memory else "read from disk every epoch")
    steps_per_epoch = int(train_ds.cardinality())
    total_steps = max(steps_per_epoch * cfg.train.epochs, cfg.train.warmup_steps + 1)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=total_steps - cfg.train.warmup_steps, alpha=0.05,
        warmup_target=cfg.train.learning_rate, warmup_steps=cfg.train.warmup_steps,
    )
    # jit_compile: XLA compiles the training step, once per caption-length bucket (deterministic: off).
    model.compile(optimizer=keras.optimizers.Adam(schedule, clipnorm=5.0), jit_compile=not deterministic)

    history_csv = out_dir / "history.csv"
    epoch_weights = ckpt_dir / "epoch-{epoch:03d}.weights.h5"
    backup = _backup_and_restore(ckpt_dir / "backup")
    # Rows of epochs the backup does not hold (a run stopped between the two): Keras runs those again.
    backup_meta = ckpt_dir / "backup" / "training_metadata.json"
    backed_up = read_json(backup_meta).get("epoch", 0) if backup_meta.exists() else 0
    resumed_from = [row for row in _read_history(history_csv) if row["epoch"] < backed_up]
    validation = ValidationCaptions(data, cfg.train.select_images, cfg.train.select_metric)
    monitor = f"val_{cfg.train.select_metric}"
    xe_finished = finished or (done_file.exists() and read_json(done_file).get("signature", "").split("+")[0] == signature)
    finished = xe_finished
    if not finished and _epochs_without_improvement(resumed_from, monitor) >= cfg.train.patience:
        finished = True  # it had stopped early before the restart: do not train on past that
    if resumed_from and (ckpt_dir / "backup").exists():
        log.info("train: resuming after epoch %d from %s", resumed_from[-1]["epoch"] + 1, store)
    else:
        log.info("train: starting afresh; checkpoints go to %s", store)
    fit_callbacks = [
        _stop_on_non_finite_loss(out_dir),  # first: no later callback saves a non-finite epoch
        shuffle_epoch_callback(shuffle_epoch),  # after BackupAndRestore's resume, the epoch's own order
        caption_metric_callback(validation),  # first at epoch end: the callbacks below read its metric
        free_space_guard([(ckpt_dir, 2)]),  # the epoch's weights, and the backup beside the one it replaces
        # The epoch's weights and history row before the backup that marks the epoch done: a run killed
        # between them repeats the epoch (rewriting both) instead of resuming without them.
        _epoch_weights(epoch_weights),
        _history_csv(history_csv),
        backup,
        save_every_epoch(store),  # after the callbacks that write the folder
        _early_stopping(cfg.train.patience, resumed_from, monitor),
        *(callbacks or []),
    ]
    if finished:  # trained before (a new pod's empty model folder): rebuild the model from the best epoch
        log.info("train: %s finished training earlier; saving its best epoch", store)
    else:
        model.fit(train_ds, validation_data=val_ds, epochs=cfg.train.epochs, callbacks=fit_callbacks, verbose=2,
                  shuffle=False)  # tf.data shuffles, seeded
        log.info("train: the loss was built %d time(s) while tracing the training step, %d the validation step; %s",
                 model.step_traces.train, model.step_traces.val,
                 f"XLA compiled them for at most {len(shapes['train'])} and {len(shapes['val'])} batch shapes"
                 if model.jit_compile else "XLA off")

    history = [{**row, "stage": "xe"} for row in _read_history(history_csv)]
    if not history:
        raise ConfigError(f"{history_csv}: training recorded no epoch")
    weights_of = {"xe": epoch_weights}
    if cfg.train.scst_epochs:
        scst_rows, weights_of["scst"] = _self_critical_stage(cfg, data, model, train_batches, validation, store,
                                                             _best_epoch(history, monitor), epoch_weights, callbacks)
        history += scst_rows
    best = _best_epoch(history, monitor)  # across both stages
    chosen_weights = str(weights_of[best["stage"]]).format(epoch=best["epoch"] + 1)
    model.load_weights(chosen_weights)
    decoding_file = out_dir / "decoding.json"
    grid = {"beam_widths": cfg.train.decode_beam_widths, "length_penalties": cfg.train.decode_length_penalties}
    decoding = read_json(decoding_file, "decoding chosen on validation") if decoding_file.exists() else None
    weights_id = str(Path(chosen_weights).relative_to(out_dir))
    if decoding is None or decoding.get("grid") != grid or decoding.get("weights", weights_id) != weights_id:
        decoding = {**choose_decoding(model, validation, grid["beam_widths"], grid["length_penalties"]), "grid": grid,
                    "weights": weights_id}
        write_json_atomic(decoding_file, decoding)
        store.save()
    meta = {
        "max_length": data.max_length,
        "backbone": data.manifest["backbone"],
        "config": redact_tree(cfg.model_dump(mode="json")),  # travels with the model: no password
        "best_epoch": best["epoch"] + 1,
        "best_stage": best["stage"],  # xe: cross-entropy; scst: self-critical
        "val_loss": best.get("val_loss"),  # the self-critical stage computes none
        "selection": {"metric": cfg.train.select_metric, "value": best[monitor], "images": len(validation.ids)},
        "decoding": decoding,
        "dataset_signature": signature,
        "train_signature": _result_signature(cfg, signature),  # the cross-entropy key and the self-critical stage's
    }
    save_bundle(model_dir, model, data.vocab, meta, data.root / data.manifest["backbone"]["weights_file"], history)
    metrics = {
        "epochs": len(history), "best_epoch": best["epoch"] + 1,
        "loss": history[-1]["loss"], monitor: best[monitor],
        "best_stage": best["stage"], "scst_epochs": sum(row["stage"] == "scst" for row in history),
        "beam_width": decoding["beam_width"],  # 1: greedy
        "length_penalty": decoding["length_penalty"],
        "resumed_epochs": len(resumed_from),
        "parameters": int(model.count_params()),
        "deterministic": int(deterministic), "xla": int(bool(model.jit_compile)),
        "images_per_batch": train_batches.images_per_batch, "captions_per_image": train_batches.captions_per_image,
        "train_batch_shapes": len(shapes["train"]), "val_batch_shapes": len(shapes["val"]),
        "train_step_traces": model.step_traces.train, "val_step_traces": model.step_traces.val,
        "features_in_memory": int(train_batches.in_memory),
        "train_seconds": round(sum(row.get("epoch_seconds", 0.0) for row in history), 1),
    }
    if "val_loss" in best:
        metrics["val_loss"] = best["val_loss"]
    if "val_two_object_scenes_correct" in best:  # the demo's scenes: what the recipe is chosen on
        metrics["val_two_object_scenes_correct"] = best["val_two_object_scenes_correct"]
    scst_rows = [row for row in history if row["stage"] == "scst"]
    if scst_rows:
        xe_best = _best_epoch([row for row in history if row["stage"] == "xe"], monitor)
        metrics.update({f"xe_{monitor}": xe_best[monitor], "scst_reward": scst_rows[-1].get("scst_reward", 0.0),
                        "scst_entropy": scst_rows[-1].get("scst_entropy", 0.0)})
    write_json_atomic(done_file, {"signature": _result_signature(cfg, signature), "metrics": metrics})
    store.save()
    return StepResult(metrics=metrics, outputs={"model": str(model_dir), "checkpoints": str(store)})
