"""One typed configuration for every step.

The model's defaults are the full MS-COCO 2014 run (the ``coco2014`` preset);
a preset file holds only what differs from them (``presets/demo.yaml``).

The same model backs the YAML files, ``--set section.key=value`` overrides,
the in-process runner, the KFP components and the pipeline parameters, so a
setting means the same thing everywhere.
"""

from __future__ import annotations

import re
import reprlib
import stat
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from captioning.errors import ConfigError

PRESETS = ("demo", "coco2014")
COCO_BASE_URL = "http://images.cocodataset.org"
DEMO_SOURCE = "demo"
# Karpathy & Fei-Fei's split of COCO 2014 (dataset_coco.json inside): the test split papers report on.
KARPATHY_SPLIT_URL = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"


# Seeds every library takes (NumPy's legacy seed and TensorFlow's are below 2**32; Python's int range is wider).
MAX_SEED = 2**31 - 1


def Seed(description: str):  # noqa: N802 - a Field factory, read like a type
    return Field(0, ge=0, le=MAX_SEED, description=description)


NAME_MAX, PATH_MAX = 255, 4096  # Linux's limits, in bytes, for one path component and a whole path


def fits_file_system(value: str | None) -> str | None:
    """A folder setting the file system can hold, said when the settings are read (exit 2), not as "File name
    too long" after hours of work; a gs:// URI's object names have the same 1,024-byte bound on the whole."""
    if not value:
        return value
    encoded = value.encode("utf-8", errors="surrogateescape")
    longest = max(value.split("/"), key=lambda part: len(part.encode("utf-8", errors="surrogateescape")))
    if len(longest.encode("utf-8", errors="surrogateescape")) > NAME_MAX:
        raise ValueError(f"a path component of {len(longest.encode('utf-8', errors='surrogateescape'))} bytes "
                         f"({longest[:40]}...); a file system takes at most {NAME_MAX}")
    if len(encoded) > PATH_MAX:
        raise ValueError(f"a path of {len(encoded)} bytes; at most {PATH_MAX}")
    return value


class Section(BaseModel):
    # Finite numbers only: an inf learning rate or a NaN margin validates nowhere.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(Section):
    base_url: str = Field(
        COCO_BASE_URL,
        description="Mirror of the COCO 2014 layout (the files of data.files under it): http(s)://, "
        "gs://bucket/prefix, file:// or a path; 'demo' writes the synthetic demo mirror into the work dir and reads "
        "it from there.",
    )
    files: list[str] = Field(
        default_factory=lambda: [
            "annotations/annotations_trainval2014.zip",
            "zips/train2014.zip",
            "zips/val2014.zip",
        ],
        description="Archives to fetch: .zip paths relative to data.base_url (no leading /, no ..: they name "
        "files under the step's folder too); a COCO mirror serves these three.",
    )
    sha256: dict[str, str] = Field(
        default_factory=dict, description="Expected checksums by archive path; verified when given."
    )
    verify_sha256: bool = Field(True, description="Check the archives against data.sha256; false for a "
                                "mirror serving other archives than the preset's (its checksums are still recorded).")
    max_images: int | None = Field(None, gt=0, le=10_000_000, description="Seeded subset size; null keeps all images.")
    seed: int = Seed("Seed of the subset and of the split.")
    split: Literal["random", "karpathy"] = Field("random", description=(
        "random: validation and test are a seeded draw from val2014 (data.val_images, data.test_images); "
        "karpathy: exactly the train/val/test images of Karpathy's split file (data.split_url), so test figures "
        "compare with the papers' (restval trains)."))
    split_url: str = Field(KARPATHY_SPLIT_URL, description=(
        "The zip holding Karpathy's dataset_coco.json (data.split=karpathy): a URL, or a path relative to "
        "data.base_url."))
    split_sha256: str | None = Field(None, description=(
        "Expected SHA-256 of the split zip; verified when given (its checksum is recorded in the manifest always)."))
    val_images: int | None = Field(
        None, ge=1, le=1_000_000, description=(
            "Validation images drawn from val2014 (data.split=random); null: Karpathy-proportional (5000 of 40504). "
            "The rest of val2014 trains.")
    )
    test_images: int | None = Field(
        None, ge=1, le=1_000_000, description=(
            "Test images drawn from val2014 (data.split=random); null: Karpathy-proportional (5000 of 40504).")
    )
    retries: int = Field(5, ge=0, le=100, description="Retries of a failed transfer (each resumes).")
    retry_backoff_s: float = Field(1.0, ge=0, le=600, description="First back-off; doubles each retry.")
    timeout_s: float = Field(60.0, gt=0, le=3600, description="Socket timeout of one request.")
    transfer_timeout_s: float = Field(6 * 3600.0, gt=0, le=7 * 24 * 3600, description=(
        "Time limit of one archive's whole transfer, retries and their waits included (a server trickling bytes "
        "never hits the socket timeout; a stalled read may overrun it by up to data.timeout_s); the partial copy "
        "is kept."))
    max_expanded_bytes: int = Field(64 << 30, ge=1 << 20, le=1 << 50, description=(
        "An archive whose entries expand to more is refused (COCO's zips: about 19 GB)."))
    max_expansion_ratio: float = Field(200.0, ge=1, le=100_000, description=(
        "An archive with an entry (over 1 MiB) expanding more than this many times its compressed size is refused."))
    download_cache: str | None = Field(
        None, description="Folder that keeps the verified archives across runs (on Kubeflow a PVC), or a bucket "
        "gs://BUCKET/PREFIX (on Vertex AI, read through its Cloud Storage mount); the raw-data artifact then only "
        "references them, and process_data reads them there. null: the archives are the artifact.")

    @field_validator("download_cache")
    @classmethod
    def _bucket_names_a_bucket(cls, value: str | None) -> str | None:
        if value and "://" in value and (
                not re.fullmatch(r"gs://[a-z0-9][-_.a-z0-9]{1,221}[a-z0-9](/[^\s]*)?", value)
                or any(part in ("", ".", "..") for part in value.rstrip("/")[len("gs://"):].split("/")[1:])):
            raise ValueError(f"{value!r}: a folder, or a bucket as gs://BUCKET/PREFIX (no empty, . or .. parts)")
        return fits_file_system(value.rstrip("/") if value and value.startswith("gs://") else value)

    @field_validator("files")
    @classmethod
    def _relative_zip_paths(cls, value: list[str]) -> list[str]:
        """Each names a file under base_url and, the same way, under the step's output folder: nothing may
        lead out of it (an absolute path or ``..`` would write wherever it points)."""
        if not value:
            raise ValueError("lists no archive")
        if len(value) > 100:
            raise ValueError(f"lists {len(value)} archives; at most 100")
        for rel in value:
            parts = rel.split("/")
            if (not rel.endswith(".zip") or "\\" in rel or rel.startswith("/") or any(ord(c) < 32 for c in rel)
                    or any(p in ("", ".", "..") for p in parts)):
                raise ValueError(f"{rel!r} is not a relative path to a .zip under base_url (no leading /, no .., "
                                 "no backslashes)")
        if len(set(value)) != len(value):
            raise ValueError("lists an archive twice")
        for rel in value:
            inside = [other for other in value if other.startswith(rel + "/")]
            if inside:
                raise ValueError(f"{inside[0]!r} would lie inside the archive {rel!r}")
        return value

    @field_validator("sha256")
    @classmethod
    def _hex_digests(cls, value: dict[str, str]) -> dict[str, str]:
        out = {}
        for path, digest in value.items():
            digest = str(digest).strip().lower()
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"{path}: {digest!r} is not a SHA-256 (64 hex digits)")
            out[path] = digest
        return out

    @model_validator(mode="after")
    def _checksums_of_listed_files(self):
        unknown = sorted(set(self.sha256) - set(self.files))
        if unknown:
            raise ValueError(f"sha256 names {', '.join(unknown)}, which data.files does not list")
        if self.split == "karpathy" and (self.val_images is not None or self.test_images is not None):
            raise ValueError("data.val_images and data.test_images draw a random split; with data.split=karpathy "
                             "the split file fixes the held-out images: leave them null")
        return self

    @field_validator("split_sha256")
    @classmethod
    def _split_digest(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-f]{64}", value.strip().lower()):
            raise ValueError(f"{value!r} is not a SHA-256 (64 hex digits)")
        return None if value is None else value.strip().lower()

    @field_validator("base_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must not be empty")
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme not in ("", "http", "https", "gs", "file"):
            raise ValueError(f"unsupported scheme {scheme!r}: use http(s)://, gs://, file:// or a path")
        return value.rstrip("/") if value != "/" else value


# COCO's largest pictures are 640x640; 50 megapixels (8660x5773) decode in about 150 MB.
MAX_IMAGE_PIXELS = 50_000_000


class FeaturesConfig(Section):
    weights: str = Field(
        "imagenet", description="InceptionV3 weights: 'imagenet', 'none' (random init) or a path to a .weights.h5/.h5 file."
    )
    seed: int = Seed("Initialisation seed when weights is 'none', so restarts reproduce the features.")
    batch_size: int = Field(64, ge=1, le=4096, description="Images per InceptionV3 batch when extracting features.")
    shard_images: int = Field(1000, ge=1, le=100_000, description="Images per feature shard (the unit of resume).")
    image_size: Literal[299] = Field(299, description="Input side of InceptionV3 (fixed: its 8x8 grid follows from it).")
    # Pillow refuses, as a bomb, any header over twice its own limit (178,956,970 pixels) before ours is asked.
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, ge=1, le=178_000_000, description=(
        "Images whose header declares more pixels (a GIF: its frames' pixels in all) are skipped, with the "
        "reason, before anything decodes them; at most 178,000,000, where Pillow's own check takes over."))


# COCO's longest caption is far shorter; a 500-word "caption" is noise or an attack.
MAX_CAPTION_WORDS = 100


class TextConfig(Section):
    min_count: int = Field(5, ge=1, le=1_000_000, description="Words seen fewer times become <unk>.")
    max_vocab: int = Field(10000, ge=10, le=200_000, description="Vocabulary cap, special tokens included.")
    max_caption_words: int = Field(MAX_CAPTION_WORDS, ge=5, le=1000, description=(
        "Captions longer than this are cut for training and counted (captions_truncated); evaluation scores the "
        "raw text."))
    max_length_percentile: float = Field(
        99.0, gt=0, le=100, description="Longest caption kept, as a percentile of training caption lengths."
    )


class TrainConfig(Section):
    epochs: int = Field(20, ge=1, le=10_000, description=(
        "Cross-entropy epochs at most (early stopping on train.select_metric after train.patience without gain)."))
    # 256 captions fill a modern GPU with these sizes; the learning rate is the usual Adam 1e-3 at
    # batch 64, scaled by the square root of the batch ratio (sqrt(256/64) = 2).
    batch_size: int = Field(256, ge=1, le=8192, description=(
        "Captions per training batch: batch_size // captions_per_image images, with captions_per_image "
        "captions each."))
    captions_per_image: int = Field(5, ge=1, le=64, description=(
        "K: captions of each image in a batch (COCO has 5 an image), its features read and encoded once for "
        "all K; more are taken in rotation over the epochs, fewer leave masked rows."))
    feature_memory: str = Field("auto", pattern=r"^(auto|off|[0-9]+(\.[0-9]+)?\s*[KMGT]i?B)$", description=(
        "Hold a split's features in memory when they fit this (e.g. 24GiB); auto: 40 % of the pod's memory "
        "limit (or the machine's); off: read them from disk every epoch."))
    # The paper's sizes (embedding 512; its LSTM had 1,000-1,800 units; a GRU of 1,024 here) and a
    # context at the paper's feature width (512), projected from InceptionV3's 2,048 channels.
    # Upper bounds a single GPU holds (units 8192: a GRU of ~0.3 G parameters).
    embedding_dim: int = Field(512, ge=8, le=4096, description="Width of the word embedding.")
    units: int = Field(1024, ge=8, le=8192, description="Width of the GRU state.")
    context_dim: int = Field(512, ge=8, le=4096, description="Width of the image annotations the attention reads.")
    dropout: float = Field(0.5, ge=0, lt=1, description="On the state and the deep output, as in the paper.")
    # 0: on the demo's validation the penalty (at 1, 0.33 and 1/64) lowered the two-object scenes captioned
    # right; with 64 regions and about 12 words its minimum spreads attention evenly, which carries over to COCO.
    attention_reg: float = Field(0.0, ge=0, le=100, description=(
        "Doubly-stochastic attention weight λ (0 turns it off; the paper's eq. 14 has 1)."))
    learning_rate: float = Field(2e-3, gt=0, le=1.0, description=(
        "Adam's peak rate in the cross-entropy stage, reached after train.warmup_steps, then cosine decay; "
        "COCO's is 1e-3 scaled by the square root of its batch over 64."))
    warmup_steps: int = Field(200, ge=0, le=1_000_000, description="Steps of linear warm-up of the rate.")
    patience: int = Field(3, ge=1, le=10_000, description="Early stopping: epochs without a better selection metric.")
    # Self-critical training after cross-entropy (Rennie et al. 2017): COCO's largest known lever for this
    # family. Its learning rate and length are the reference implementations' (ruotianluo/ImageCaptioning.pytorch:
    # 5e-5), not measured here on COCO.
    scst_epochs: int = Field(10, ge=0, le=10_000, description=(
        "Self-critical epochs after the cross-entropy epochs (0: none); early stopping and the choice of the "
        "best epoch span both stages."))
    scst_samples: int = Field(5, ge=1, le=64, description="Captions sampled per image at each self-critical step.")
    scst_baseline: Literal["mean", "greedy"] = Field("mean", description=(
        "The reward's baseline: mean of the image's other samples, or its greedy caption's reward."))
    scst_learning_rate: float = Field(5e-5, gt=0, le=1.0, description="Adam's (constant) rate in the self-critical stage.")
    select_metric: Literal["CIDEr", "BLEU-4"] = Field(
        "CIDEr", description="Chooses the best epoch, stops early and chooses the decoding: this metric of the "
        "model's captions on the validation subset (the paper selected on BLEU).")
    select_images: int = Field(1000, ge=1, le=100_000, description="Validation images captioned for the selection metric.")
    decode_beam_widths: list[Annotated[int, Field(ge=1, le=20)]] = Field(
        default_factory=lambda: [3, 5], description="Beam widths tried on validation after training (greedy too).")
    decode_length_penalties: list[Annotated[float, Field(ge=0, le=5)]] = Field(
        default_factory=lambda: [0.0, 0.5, 1.0], description="Length penalties tried with each beam width.")
    seed: int = Seed("Initialisation, dropout and shuffling.")
    mixed_precision: Literal["auto", "on", "off"] = Field("auto", description=(
        "float16 compute: auto uses it on GPUs only; on or off to force."))
    deterministic: Literal["auto", "on", "off"] = Field(
        "auto", description="Deterministic ops (same weights run to run) without XLA, or XLA-compiled steps; "
        "auto: deterministic without a GPU, XLA on GPUs.")
    checkpoint_dir: str = Field(
        "", description="Checkpoints and history (the unit of resume), in a folder train-KEY per combination of "
        "training settings and data: a local folder (a mounted volume) or gs://bucket/path (Vertex AI). Empty: "
        "WORKDIR/train in-process; on Kubeflow the captioning-checkpoints PVC; a temporary folder elsewhere.")

    @field_validator("checkpoint_dir")
    @classmethod
    def _checkpoints_fit(cls, value: str) -> str:
        return fits_file_system(value)

    @model_validator(mode="after")
    def _whole_images(self):
        if self.scst_epochs and self.scst_baseline == "mean" and self.scst_samples < 2:
            raise ValueError("train.scst_baseline=mean compares each sample with the image's others: "
                             "train.scst_samples must be at least 2")
        if self.batch_size < self.captions_per_image:
            raise ValueError(f"batch_size {self.batch_size} is less than captions_per_image {self.captions_per_image}: "
                             "a batch holds batch_size // captions_per_image whole images")
        return self

    @field_validator("mixed_precision", "deterministic", "feature_memory", mode="before")
    @classmethod
    def _yaml_on_off(cls, value):
        # YAML 1.1 reads a bare on/off as a boolean.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


# Test images process_data keeps in the test artifact for evaluate's attention figures.
ATTENTION_SAMPLE_LIMIT = 16


class EvaluateConfig(Section):
    decoder: Literal["auto", "greedy", "beam"] = Field(
        "auto", description="auto: the decoding train chose on validation; greedy or beam: as set here.")
    beam_width: int = Field(3, ge=1, le=20, description="With decoder=beam.")
    length_penalty: float = Field(0.7, ge=0, le=5, description="With decoder=beam: scores divided by length**this.")
    batch_size: int = Field(128, ge=1, le=4096, description="Test images per decoding batch.")
    attention_samples: int = Field(4, ge=0, le=ATTENTION_SAMPLE_LIMIT,
                                   description="Test images that get an attention figure.")


class PromoteConfig(Section):
    metric: str = Field("CIDEr", description="The evaluate metric that decides: BLEU-1..4, METEOR, ROUGE-L or CIDEr.")
    margin: float = Field(0.0, ge=0, le=1000, description="Promote only when candidate > production + margin.")
    # Both name files (registry/<collection>/...) and are read back by `serve --model [COLLECTION:]ALIAS`: the
    # pattern serve's alias takes, and a length any file system holds (checked before anything runs).
    alias: str = Field("production", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=128,
                       description="The registry alias promote moves (letters, digits, _ . -; not latest or vN, "
                       "which W&B keeps for itself).")
    collection: str = Field("captioning-model", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=128,
                            description="Registry collection the model is linked into.")
    registry: str = Field("", description="Local registry folder; empty: <workdir>/registry.")

    @field_validator("registry")
    @classmethod
    def _registry_fits(cls, value: str) -> str:
        return fits_file_system(value)

    @field_validator("alias")
    @classmethod
    def _not_a_wandb_alias(cls, value: str) -> str:
        if value == "latest" or re.fullmatch(r"v\d+", value):
            raise ValueError(f"{value!r}: W&B manages latest and vN itself (a version), so the registry alias "
                             "would not move; choose another name")
        return value
    min_metric: float = Field(0.0, description="The pipeline's gate: evaluate's metric must exceed this.")
    deploy: Literal["", "kserve", "vertex"] = Field("", description="After a promote that moves the alias, serve "
                                                   "the new model: kserve (an InferenceService) or vertex (an "
                                                   "Endpoint); empty: never.")
    deploy_name: str = Field("captioner", pattern=r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$",
                             description="The InferenceService / Vertex model and endpoint name.")
    deploy_namespace: str = Field("", description="kserve: the namespace (default: the pod's).")
    deploy_project: str = Field("", description="vertex: the Google Cloud project (default: GOOGLE_CLOUD_PROJECT).")
    deploy_region: str = Field("us-central1", description="vertex: the region.")
    deploy_gpu: bool = Field(False, description="One GPU per serving replica.")

    @field_validator("metric")
    @classmethod
    def _evaluated(cls, value: str) -> str:
        from captioning.metrics import METRIC_KEYS

        if value not in METRIC_KEYS:
            raise ValueError(f"not a metric evaluate computes; choose one of {', '.join(METRIC_KEYS)}")
        return value


class WandbConfig(Section):
    project: str = Field("captioning", description="W&B project of every step's run.")
    entity: str | None = Field(None, description="W&B team or user; null: the key's default entity.")
    mode: Literal["online", "offline", "disabled"] = Field("online", description=(
        "online: runs go to the W&B server (a key is needed); offline: written under the work dir, synced later "
        "with `wandb sync`; disabled: no tracking."))
    api_key_secret: str = Field(
        "", pattern=r"^$|^projects/[^/]+/secrets/[^/]+(/versions/[^/]+)?$",
        description="Secret Manager secret holding the W&B key (Vertex AI): projects/P/secrets/S[/versions/V]; "
        "read in the pod when the mode is online and WANDB_API_KEY is unset.")


class BatchConfig(Section):
    """The batch captioning pipeline (``captioning run --pipeline caption``)."""

    source: str = Field("", description="Images to caption: a folder, a gs:// prefix, or a .jsonl file of URIs "
                        "(paths, file://, http(s)://, gs://), one {\"uri\": ...} or JSON string per line.")
    model: str = Field("production", description="An alias in the registry promote wrote (promote.registry, "
                       "promote.collection), wandb:ALIAS (the W&B Registry), a model folder or gs://.")
    shard_images: int = Field(1000, ge=1, le=1_000_000, description="Images per shard; shards are captioned in "
                              "parallel pods.")
    batch_size: int = Field(32, ge=1, le=4096, description="Images per decoding batch on the device.")
    sample: int = Field(16, ge=0, le=1000, description="Captions with attention figures in the W&B table.")
    max_image_bytes: int = Field(32 << 20, ge=1, description="A larger image is a skipped line.")
    timeout_s: float = Field(60.0, gt=0, le=3600, description="Fetching one image by URI.")


class Config(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)

    @model_validator(mode="after")
    def _reward_vocabulary(self):
        # The self-critical reward keys n-grams of token ids below 2^15 (captioning.scst.CiderD).
        if self.train.scst_epochs and self.text.max_vocab >= 1 << 15:
            raise ValueError(f"text.max_vocab={self.text.max_vocab}: the self-critical stage (train.scst_epochs="
                             f"{self.train.scst_epochs}) scores captions of at most {(1 << 15) - 1} tokens' "
                             "vocabulary; lower text.max_vocab or set train.scst_epochs=0")
        return self


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 120, 120


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            why = "unknown key"
        else:
            why = item["msg"]
            # Never echo what was given for a secret's setting: it may be the secret itself.
            if "input" in item and not isinstance(item["input"], dict) and "secret" not in key:
                # Abbreviated: an alias-bombed list repeats itself millions of times.
                why += f" (got {_SHORT.repr(item['input'])})"
        lines.append(f"{origin}: {key}: {why}")
    if len(lines) > 20:
        lines = [*lines[:20], f"{origin}: ... and {len(lines) - 20} more problems"]
    return "\n".join(lines)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"--set {text!r}: the key must name a section and a key, e.g. train.epochs=5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _deep_set(tree: dict, parts: list[str], value: Any, origin: str) -> None:
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {'.'.join(parts[: depth + 1])}: is not a section")
        node = child
    node[parts[-1]] = value


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def preset_dict(name: str) -> dict:
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r}: unknown preset; choose one of {', '.join(PRESETS)}")
    text = resources.files("captioning.presets").joinpath(f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


# A settings file is a few KB; anything far larger is not one.
MAX_CONFIG_BYTES = 1 << 20


def _read_yaml(path: Path) -> dict:
    path = Path(path)
    try:
        if path.is_dir():
            raise ConfigError(f"{path}: a directory, not a config file")
        mode = path.stat().st_mode
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):  # /dev/zero would never end
            raise ConfigError(f"{path}: a device, not a config file")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size} bytes; a config file holds at most {MAX_CONFIG_BYTES}")
        with open(path, "rb") as fh:  # a pipe (--config <(envsubst < f.yaml)) has no size: read a bounded amount
            raw = fh.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: over {MAX_CONFIG_BYTES} bytes; a config file holds at most {MAX_CONFIG_BYTES}")
        text = raw.decode("utf-8")
        if "\0" in text:
            raise ConfigError(f"{path}: a binary file, not a YAML config file")
        data = yaml.safe_load(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); a config file is UTF-8 YAML") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc)[:500]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), preset: str = "demo"
) -> Config:
    """Preset, then the YAML file, then each ``section.key=value`` override."""
    tree = preset_dict(preset)
    origin = f"preset {preset}"
    if path is not None:
        tree = _deep_merge(tree, _read_yaml(Path(path)))
        origin = str(path)
    for text in overrides:
        parts, value = _parse_override(text)
        _deep_set(tree, parts, value, f"--set {text}")
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        where = origin if not overrides else f"{origin} + --set"
        raise ConfigError(_format_validation_error(err, where)) from None


def config_from_dict(tree: dict, origin: str = "config") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, origin)) from None
