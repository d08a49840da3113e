"""The captioning DAG: log_raw_data → process_data → train → evaluate → promote.

    python pipeline.py --output captioning.yaml [--target kubeflow|vertex] [--image IMAGE]
                       [--accelerator-type nvidia.com/gpu] [--accelerator-count 1] [--preset coco2014]
                       [--raw-cache-pvc coco-raw-cache] [--gpu-node-selector KEY=VALUE]

(also ``captioning compile``). Data moves between pods as KFP artifacts; W&B
references travel beside them as strings. process_data, train and evaluate ask
for an accelerator. On Kubeflow the W&B key reaches the pods from a Kubernetes
Secret (kfp-kubernetes), GPU steps tolerate the GPU taint, and log_raw_data
keeps the COCO archives on a PVC across runs (names match ``manifests/``); on
Vertex AI the pods read the key from Secret Manager (the ``wandb_secret``
parameter names it). Never is a key a literal in the YAML.
"""

# No `from __future__ import annotations`: KFP reads the pipeline signature's types at runtime.

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ACCELERATORS = {"kubeflow": "nvidia.com/gpu", "vertex": "NVIDIA_L4"}
GPU_STEPS = ("process_data", "train", "evaluate")
WANDB_SECRET = "wandb"  # kubectl create secret generic wandb --from-literal=api-key=...
WANDB_SECRET_KEY = "api-key"
# These names and settings are also in manifests/ (tests check that they agree).
RAW_CACHE_PVC = "coco-raw-cache"
RAW_CACHE_MOUNT = "/var/cache/captioning"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
DESCRIPTION = "Show, Attend and Tell on MS-COCO, tracked in W&B"


def compiled_for(target: str) -> str:
    """The marker in the pipeline description that ``captioning submit`` reads back."""
    return f"[compiled for {target}]"


@dataclass(frozen=True)
class BuildOptions:
    target: str = "kubeflow"
    image: str = "captioning:0.1.0"
    accelerator_type: str = ""  # default per target
    accelerator_count: int = 1
    preset: str = "coco2014"
    cpu: str = "4"
    memory: str = "16G"
    gpu_cpu: str = "8"
    gpu_memory: str = "32G"
    retries: int = 3
    raw_cache_pvc: str = RAW_CACHE_PVC  # kubeflow only; "" keeps the archives in the step's artifact only
    gpu_node_selector: str = ""  # kubeflow only; "KEY=VALUE", e.g. cloud.google.com/gke-accelerator=nvidia-l4

    @property
    def accelerator(self) -> str:
        return self.accelerator_type or ACCELERATORS[self.target]

    def __post_init__(self):
        if self.target not in ACCELERATORS:
            raise ValueError(f"target {self.target!r}: choose kubeflow or vertex")
        if self.target == "vertex" and not re.fullmatch(r"(NVIDIA|TPU)_[A-Z0-9_]+", self.accelerator):
            raise ValueError(f"accelerator {self.accelerator!r}: Vertex AI names accelerators like NVIDIA_L4, "
                             "NVIDIA_TESLA_T4, NVIDIA_H100_80GB")
        if self.target == "kubeflow" and "/" not in self.accelerator:
            raise ValueError(f"accelerator {self.accelerator!r}: Kubernetes names accelerators as extended "
                             "resources, like nvidia.com/gpu or amd.com/gpu")
        if self.gpu_node_selector and "=" not in self.gpu_node_selector:
            raise ValueError(f"gpu_node_selector {self.gpu_node_selector!r}: expected KEY=VALUE")


def build_pipeline(options: BuildOptions = BuildOptions()):
    """The pipeline function for these build options (image, target, accelerators)."""
    os.environ["CAPTIONING_IMAGE"] = options.image
    for name in [m for m in sys.modules if m == "components" or m.startswith("components.")]:
        del sys.modules[name]  # the decorators read the image when the modules load
    from kfp import dsl

    from captioning.config import load_config
    from captioning.params import parameters_from_config
    from components.evaluate import evaluate
    from components.log_raw_data import log_raw_data
    from components.process_data import process_data
    from components.promote import promote
    from components.train import train

    defaults = parameters_from_config(load_config(preset=options.preset))

    def gpu(task):
        if options.target == "kubeflow":
            from kfp import kubernetes

            kubernetes.add_toleration(task, **GPU_TOLERATION)
            if options.gpu_node_selector:
                key, value = options.gpu_node_selector.split("=", 1)
                kubernetes.add_node_selector(task, label_key=key, label_value=value)
        task.set_accelerator_type(options.accelerator).set_accelerator_limit(options.accelerator_count)
        task.set_cpu_request(options.gpu_cpu).set_cpu_limit(options.gpu_cpu)
        return task.set_memory_request(options.gpu_memory).set_memory_limit(options.gpu_memory)

    def cpu(task):
        task.set_cpu_request(options.cpu).set_cpu_limit(options.cpu)
        return task.set_memory_request(options.memory).set_memory_limit(options.memory)

    def with_wandb_key(task):
        if options.target == "kubeflow":
            from kfp import kubernetes

            kubernetes.use_secret_as_env(task, secret_name=WANDB_SECRET,
                                         secret_key_to_env={WANDB_SECRET_KEY: "WANDB_API_KEY"}, optional=True)
        return task

    def step(task, resources, cached: bool = True):
        """W&B key and resources for every task; cached steps also retry (pre-empted GPU nodes)."""
        resources(with_wandb_key(task)).set_caching_options(cached)
        return task.set_retry(options.retries, "60s") if cached else task

    def raw_cache(task):
        if options.target == "kubeflow" and options.raw_cache_pvc:
            from kfp import kubernetes

            from captioning.kfp_steps import DOWNLOAD_CACHE_ENV

            kubernetes.mount_pvc(task, pvc_name=options.raw_cache_pvc, mount_path=RAW_CACHE_MOUNT)
            task.set_env_variable(DOWNLOAD_CACHE_ENV, f"{RAW_CACHE_MOUNT}/coco2014")
        return task

    d = defaults

    @dsl.pipeline(name="captioning", description=f"{DESCRIPTION} {compiled_for(options.target)}")
    def captioning_pipeline(
        preset: str = options.preset,
        base_url: str = d["base_url"],
        max_images: int = d["max_images"],
        val_images: int = d["val_images"],
        test_images: int = d["test_images"],
        data_seed: int = d["data_seed"],
        weights: str = d["weights"],
        feature_batch_size: int = d["feature_batch_size"],
        min_count: int = d["min_count"],
        max_vocab: int = d["max_vocab"],
        epochs: int = d["epochs"],
        batch_size: int = d["batch_size"],
        embedding_dim: int = d["embedding_dim"],
        units: int = d["units"],
        learning_rate: float = d["learning_rate"],
        dropout: float = d["dropout"],
        train_seed: int = d["train_seed"],
        decoder: str = d["decoder"],
        beam_width: int = d["beam_width"],
        attention_samples: int = d["attention_samples"],
        promote_metric: str = d["promote_metric"],
        promote_margin: float = d["promote_margin"],
        promote_alias: str = d["promote_alias"],
        min_score: float = d["min_score"],
        registry: str = "",
        checkpoint_dir: str = "",
        wandb_project: str = d["wandb_project"],
        wandb_entity: str = d["wandb_entity"],
        wandb_mode: str = d["wandb_mode"],
        wandb_secret: str = d["wandb_secret"],
    ):
        group = dsl.PIPELINE_JOB_NAME_PLACEHOLDER
        wb = {"wandb_project": wandb_project, "wandb_entity": wandb_entity, "wandb_mode": wandb_mode,
              "wandb_secret": wandb_secret}
        raw = log_raw_data(base_url=base_url, preset=preset, run_group=group, **wb)
        step(raw_cache(raw), cpu)
        raw.set_display_name("log_raw_data")

        data = process_data(
            raw_data=raw.outputs["raw_data"], upstream_ref=raw.outputs["wandb_ref"], preset=preset,
            run_group=group, max_images=max_images, val_images=val_images, test_images=test_images,
            data_seed=data_seed, weights=weights, feature_batch_size=feature_batch_size, min_count=min_count,
            max_vocab=max_vocab, **wb)
        step(data, gpu)

        model = train(
            processed=data.outputs["processed"], upstream_ref=data.outputs["wandb_ref"], preset=preset,
            run_group=group, checkpoint_dir=checkpoint_dir, epochs=epochs, batch_size=batch_size,
            embedding_dim=embedding_dim, units=units, learning_rate=learning_rate, dropout=dropout,
            train_seed=train_seed, **wb)
        step(model, gpu)

        scored = evaluate(
            model=model.outputs["model"], processed=data.outputs["processed"], raw_data=raw.outputs["raw_data"],
            upstream_ref=model.outputs["wandb_ref"], preset=preset, run_group=group, decoder=decoder,
            beam_width=beam_width, attention_samples=attention_samples, promote_metric=promote_metric, **wb)
        step(scored, gpu)

        with dsl.If(scored.outputs["Output"] > min_score, name="score-above-floor"):
            decision = promote(
                model=model.outputs["model"], metrics=scored.outputs["metrics"],
                upstream_ref=scored.outputs["wandb_ref"], preset=preset, run_group=group, registry=registry,
                promote_metric=promote_metric, promote_margin=promote_margin, promote_alias=promote_alias, **wb)
            # The registry changes between runs: never answer promote from the cache.
            step(decision, cpu, cached=False)

    return captioning_pipeline


def compile_pipeline(output: str | Path, options: BuildOptions = BuildOptions()) -> Path:
    from kfp import compiler

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(options), str(output))
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", "-o", default="captioning_pipeline.yaml")
    parser.add_argument("--target", choices=sorted(ACCELERATORS), default="kubeflow")
    parser.add_argument("--image", default=os.environ.get("CAPTIONING_IMAGE", "captioning:0.1.0"))
    parser.add_argument("--accelerator-type", default="", help="Default: nvidia.com/gpu (kubeflow), NVIDIA_L4 (vertex)")
    parser.add_argument("--accelerator-count", type=int, default=1)
    parser.add_argument("--preset", default="coco2014", help="Defaults of the pipeline parameters")
    parser.add_argument("--raw-cache-pvc", default=RAW_CACHE_PVC, help="Kubeflow: PVC keeping the COCO archives")
    parser.add_argument("--gpu-node-selector", default="", help="Kubeflow: KEY=VALUE node label of GPU nodes")
    args = parser.parse_args(argv)
    options = BuildOptions(target=args.target, image=args.image, accelerator_type=args.accelerator_type,
                           accelerator_count=args.accelerator_count, preset=args.preset,
                           raw_cache_pvc=args.raw_cache_pvc, gpu_node_selector=args.gpu_node_selector)
    print(compile_pipeline(args.output, options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
