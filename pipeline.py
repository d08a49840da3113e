"""The captioning DAG: log_raw_data → process_data → train → evaluate → promote.

    captioning compile --output captioning.yaml [--target kubeflow|vertex] [--image IMAGE]
                       [--accelerator-type nvidia.com/gpu] [--accelerator-count 1] [--preset coco2014]
                       [--raw-cache-pvc coco-raw-cache] [--checkpoint-pvc captioning-checkpoints]
                       [--gpu-node-selector KEY=VALUE] [--spot] [--gpu-cpu 6 --gpu-memory 22Gi]
    python pipeline.py   # the same with the default options

Data moves between pods as KFP artifacts,
wired as ``captioning.workflow`` declares; W&B references travel beside them as
strings. The pipeline parameters are ``captioning.parameters``' table, with the
preset's values as defaults. process_data, train and evaluate ask for an
accelerator. On Kubeflow the W&B key reaches the pods from a Kubernetes Secret
(kfp-kubernetes), GPU steps tolerate the GPU taint, and log_raw_data keeps the
COCO archives on a PVC across runs and train its checkpoints on another (names
match ``manifests/``), and every pod runs as the image's user under the Pod
Security "restricted" profile; on Vertex AI the pods read the key from Secret
Manager (the ``wandb_secret`` parameter names it). Never is a key a literal in
the YAML.

Nothing run-scoped reaches a cached task's inputs, command or arguments (they
make up KFP's cache key): the pods learn which pipeline run they belong to
from the environment (the ``pipeline/runid`` pod label on Kubeflow, the run's
labels on Vertex AI), which is not part of the key.
"""

# No `from __future__ import annotations`: KFP reads the pipeline signature's types at runtime.

import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path

from captioning import DEFAULT_IMAGE

ACCELERATORS = {"kubeflow": "nvidia.com/gpu", "vertex": "NVIDIA_L4"}
GPU_STEPS = ("process_data", "train", "evaluate")
UNCACHED_STEPS = ("promote",)  # the registry changes between runs: never answer promote from the cache
WANDB_SECRET = "wandb"  # kubectl create secret generic wandb --from-literal=api-key=...
WANDB_SECRET_KEY = "api-key"
# These names and settings are also in manifests/ (tests check that they agree).
RAW_CACHE_PVC = "coco-raw-cache"
RAW_CACHE_MOUNT = "/var/cache/captioning"
CHECKPOINT_PVC = "captioning-checkpoints"
CHECKPOINT_MOUNT = "/var/lib/captioning/checkpoints"
IMAGE_UID = 1000  # docker/Dockerfile: USER 1000:1000
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# GKE taints spot and pre-emptible node pools only when asked to; tolerating the taint is harmless otherwise.
SPOT_TOLERATIONS = ({"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"},
                    {"key": "cloud.google.com/gke-preemptible", "operator": "Equal", "value": "true",
                     "effect": "NoSchedule"})
# Allocatable CPU / GiB of GKE's common single-GPU nodes (GKE's reservation formula applied to the machine
# type), and what GKE's system pods on such a node request; the default requests must fit in between
# (tests check it, docs/kubeflow-and-vertex.md "Resources" shows it).
GPU_NODES = {
    "g2-standard-8 (1x L4)": (7.91, 28.3),
    "n1-standard-8 (+1x T4)": (7.91, 26.5),
    "a2-highgpu-1g (1x A100 40GB)": (11.9, 77.7),
}
SYSTEM_PODS = (0.6, 1.5)  # kube-proxy, logging and metrics agents, GPU device plugin, CSI node driver
# The Kubeflow pod label holding the run's id, read through the downward API (env is not in the cache key).
RUN_ID_LABEL = "metadata.labels['pipeline/runid']"
DESCRIPTION = "Show, Attend and Tell on MS-COCO, tracked in W&B"
GATE = "score-above-floor"  # promote runs only when evaluate's score exceeds min_score


# What each Kubeflow Pipelines backend parses of an executor's Kubernetes config. Its Argo compiler
# unmarshals the config strictly (backend/src/v2/compiler/argocompiler/container.go) and refuses the run
# on a field it does not know; tests parse the IR with each release's published kfp-kubernetes proto.
# store: where its launcher reaches minio:// artifacts (backend/src/v2/objectstore/config.go), which promote.deploy
# hands the server.
KFP_BACKENDS = {
    "2.14": {"optional_secret": False, "security_context": False, "store": "http://minio-service.kubeflow:9000"},
    "2.15": {"optional_secret": True, "security_context": False,  # kubeflow/pipelines#12216
             "store": "http://minio-service.kubeflow:9000"},
    "2.16": {"optional_secret": True, "security_context": True, "store": "http://seaweedfs.kubeflow:9000"},
    "2.17": {"optional_secret": True, "security_context": True, "store": "http://seaweedfs.kubeflow:9000"},
}


def _pinned_backend() -> str:
    """The backend release of the kfp-kubernetes this project pins (its protos are what the SDK emits)."""
    from importlib.metadata import version

    return ".".join(version("kfp-kubernetes").split(".")[:2])


# Peak ephemeral storage of each GPU step at COCO size, in GB: KFP's launcher downloads every input artifact
# into an emptyDir (no size limit, on the node's boot disk) and the step writes its outputs beside them before
# the upload: the reads plus the writes of docs/kubeflow-and-vertex.md "The data plane" (a test adds them up from that table).
GPU_STEP_SCRATCH_GB = {"process_data": 53, "train": 32, "evaluate": 2}
GPU_BOOT_DISK_GB = 200  # docs/kubeflow-and-vertex.md's GKE node pool: the largest step, the CUDA image and the kubelet's eviction margin

# What one COCO run of the training pipeline writes as artifacts (raw_data 20.4, train_data 31.2, test_data 1.3 GB
# and the model: docs/kubeflow-and-vertex.md "The data plane"), in GB; the store must hold it, and more for runs kept side by side.
COCO_ARTIFACT_GB = 53

PIPELINES = ("train", "caption")
CAPTION_GPU_STEPS = ("caption_shard",)
# An alias moves, a folder fills: these look again every run, and hand on only strings naming what they found
# (a model version, a listing's fingerprint), so that every task after them is cached on those.
CAPTION_UNCACHED_STEPS = ("resolve_model", "list_images")
CAPTION_PARALLELISM = 8  # shards captioned at once (GPU pods)


def compiled_for(target: str) -> str:
    """The marker in the pipeline description that ``captioning submit`` reads back."""
    return f"[compiled for {target}]"


def _option(default, help: str, **cli):
    """A build option: its default, its help, and how the command line shows it (``envvar``, ``min``)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class BuildOptions:
    """How the pipeline is compiled; ``captioning compile``, ``captioning submit`` and ``main`` take these."""

    target: str = _option("kubeflow", "kubeflow or vertex (accelerator names and secrets differ).")
    image: str = _option(DEFAULT_IMAGE, "The component image the pods run.", envvar="CAPTIONING_IMAGE")
    accelerator_type: str = _option("", "Default: nvidia.com/gpu (kubeflow), NVIDIA_L4 (vertex).")
    accelerator_count: int = _option(1, "Accelerators per GPU step.", min=0)
    preset: str = _option("coco2014", "Defaults of the pipeline parameters: demo or coco2014.")
    pipeline: str = _option("train", "train: log_raw_data → ... → promote; caption: batch captioning with the "
                                     "promoted model (resolve_model → fetch_model, list_images → "
                                     "plan_captions, → caption_shard × N → merge_captions).")
    # The defaults fit the allocatable size of g2-standard-8 (L4), n1-standard-8 (T4) and a2-highgpu-1g (A100)
    # after GKE's system pods (docs/kubeflow-and-vertex.md, "Resources").
    cpu: str = _option("2", "CPU request and limit of the CPU steps (log_raw_data, promote).")
    memory: str = _option("8Gi", "Memory request and limit of the CPU steps.")
    gpu_cpu: str = _option("6", "CPU request and limit of the GPU steps.")
    gpu_memory: str = _option("22Gi", "Memory request and limit of the GPU steps.")
    retries: int = _option(3, "Retries of a failed or lost cached step (pre-empted GPU nodes).", min=0)
    retry_backoff: str = _option("2m", "Wait before the first retry; it doubles at each retry.")
    retry_window: str = _option("72h", "Retries must end this long after the first attempt began (Argo stops "
                                       "them there): room for several attempts of the longest step.")
    raw_cache_pvc: str = _option(RAW_CACHE_PVC, "Kubeflow: PVC keeping the COCO archives ('' for none).")
    raw_cache_bucket: str = _option("", "Vertex AI: gs://BUCKET/PREFIX keeping the COCO archives across runs (raw_data "
                                        "then only references them; '' for none).")
    checkpoint_pvc: str = _option(CHECKPOINT_PVC, "Kubeflow: PVC holding train's checkpoints when the "
                                                  "checkpoint_dir parameter is empty ('' for none).")
    gpu_node_selector: str = _option("", "Kubeflow: KEY=VALUE label of the GPU nodes, e.g. "
                                         "cloud.google.com/gke-accelerator=nvidia-l4.")
    spot: bool = _option(False, "Kubeflow: tolerate GKE spot and pre-emptible node taints.")
    pipeline_root: str = _option("", "Where the runs' artifacts go, written into the IR as its defaultPipelineRoot: "
                                     "gs://BUCKET/PATH, or on Kubeflow also s3:// or minio://. Empty: the "
                                     "cluster's default store (Kubeflow) - too small for COCO from KFP 2.15 on "
                                     "(docs/kubeflow-and-vertex.md); Vertex AI needs one, here or at submit.")
    kfp_version: str = _option(_pinned_backend(), f"Kubeflow: the Pipelines backend release the IR is for "
                                                  f"({', '.join(KFP_BACKENDS)}); only fields it parses are "
                                                  "emitted, and what is left out is said.")
    security_context: bool = _option(True, "Kubeflow: run as uid 1000, non-root, in the pod spec (from backend 2.16: "
                                           "--kfp-version leaves it out for older ones).")

    @property
    def backend(self) -> dict:
        return KFP_BACKENDS[self.kfp_version]

    @property
    def emits_security_context(self) -> bool:
        return self.security_context and self.backend["security_context"]

    def left_out(self) -> list[str]:
        """What the IR does without, for the backend it is compiled for (``compile`` and ``submit`` print it)."""
        coco_training = self.preset == "coco2014" and self.pipeline == "train"
        if self.target != "kubeflow":
            return ["no --raw-cache-bucket: a log_raw_data that runs (not answered from the cache) uploads the 20.4 "
                    "GB of COCO archives as raw_data again; a gs://BUCKET/PREFIX keeps them once (docs/kubeflow-and-vertex.md, 'The data "
                    "plane')"] if coco_training and not self.raw_cache_bucket else []
        notes = []
        if not self.backend["optional_secret"]:
            notes.append(f"KFP {self.kfp_version}: the Secret {WANDB_SECRET!r} is attached as required (optional "
                         "Secrets parse from 2.15): create it even for offline runs, with an empty key if need be "
                         f"(kubectl create secret generic {WANDB_SECRET} --from-literal={WANDB_SECRET_KEY}=), or "
                         "every pod waits in CreateContainerConfigError")
        if not self.pipeline_root and coco_training:
            notes.append("no --pipeline-root: the artifacts go to the cluster's default store; a COCO run moves "
                         f"about {COCO_ARTIFACT_GB} GB through it (about 33 GB when raw_data only references the "
                         "raw-cache volume; docs/kubeflow-and-vertex.md, 'The data plane'), more than the 20Gi SeaweedFS volume KFP installs from "
                         "2.15: pass a bucket, or size the store (manifests/cluster/kfp-store)")
        if self.security_context and not self.backend["security_context"]:
            notes.append(f"KFP {self.kfp_version}: no securityContext in the pod specs (it parses from 2.16): the "
                         f"pods run as the image's USER {IMAGE_UID}, but nothing in the spec says non-root, so a "
                         "namespace enforcing Pod Security 'restricted' refuses them")
        return notes

    @property
    def accelerator(self) -> str:
        return self.accelerator_type or ACCELERATORS[self.target]

    def __post_init__(self):
        from captioning.config import PRESETS

        if self.pipeline not in PIPELINES:
            raise ValueError(f"--pipeline {self.pipeline!r}: choose {' or '.join(PIPELINES)}")
        if self.target not in ACCELERATORS:
            raise ValueError(f"--target {self.target!r}: choose kubeflow or vertex")
        if self.preset not in PRESETS:
            raise ValueError(f"--preset {self.preset!r}: unknown preset; choose one of {', '.join(PRESETS)}")
        if self.target == "vertex" and not re.fullmatch(r"(NVIDIA|TPU)_[A-Z0-9_]+", self.accelerator):
            raise ValueError(f"--accelerator-type {self.accelerator!r}: Vertex AI names accelerators like NVIDIA_L4, "
                             "NVIDIA_TESLA_T4, NVIDIA_H100_80GB")
        if self.target == "kubeflow" and "/" not in self.accelerator:
            raise ValueError(f"--accelerator-type {self.accelerator!r}: Kubernetes names accelerators as extended "
                             "resources, like nvidia.com/gpu or amd.com/gpu")
        if self.gpu_node_selector and "=" not in self.gpu_node_selector:
            raise ValueError(f"--gpu-node-selector {self.gpu_node_selector!r}: expected KEY=VALUE")
        if self.pipeline_root:
            schemes = ("gs://",) if self.target == "vertex" else ("gs://", "s3://", "minio://")
            scheme, _, rest = self.pipeline_root.partition("://")
            if f"{scheme}://" not in schemes or not rest.split("/")[0]:
                raise ValueError(f"--pipeline-root {self.pipeline_root!r}: expected {' or '.join(s + 'BUCKET/PATH' for s in schemes)} "
                                 f"({self.target})")
        if self.kfp_version not in KFP_BACKENDS:
            raise ValueError(f"--kfp-version {self.kfp_version!r}: choose one of {', '.join(KFP_BACKENDS)} (the "
                             "backend releases whose Kubernetes config this project checks)")
        if self.raw_cache_bucket and (self.target != "vertex" or not re.fullmatch(
                r"gs://[a-z0-9][-_.a-z0-9]{1,221}[a-z0-9](/[^\s]*)?", self.raw_cache_bucket)):
            raise ValueError(f"--raw-cache-bucket {self.raw_cache_bucket!r}: a gs://BUCKET/PREFIX, for --target "
                             "vertex (on Kubeflow the archives stay on --raw-cache-pvc)")
        if self.spot and self.target == "vertex":
            raise ValueError("--spot: Kubeflow only; Vertex AI Pipelines chooses the machines of its tasks itself")
        # kfp's own patterns, less the decimal "K" (kfp takes it, Kubernetes does not)
        for flag, value in (("--cpu", self.cpu), ("--gpu-cpu", self.gpu_cpu)):
            if not re.fullmatch(r"([0-9]*[.])?[0-9]+m?", value):
                raise ValueError(f"{flag} {value!r}: expected a CPU quantity like 2, 0.5 or 500m")
        for flag, value in (("--memory", self.memory), ("--gpu-memory", self.gpu_memory)):
            if not re.fullmatch(r"[0-9]+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|Ki)?", value):
                raise ValueError(f"{flag} {value!r}: expected a whole memory quantity like 22Gi, 8G or 1536Mi")
        for flag, value in (("--retry-backoff", self.retry_backoff), ("--retry-window", self.retry_window)):
            if not re.fullmatch(r"\d+\s*(s|m|h|d)", value):
                raise ValueError(f"{flag} {value!r}: expected a duration like 90s, 2m, 72h or 3d")
        pinned = re.fullmatch(r"[^@\s]+@sha256:([0-9a-f]*)", self.image)
        if "@" in self.image and not (pinned and len(pinned.group(1)) == 64):
            raise ValueError(f"--image {self.image!r}: a digest reference is NAME@sha256:<64 hex digits>")

    @property
    def image_pinned(self) -> bool:
        """By digest: the cache key then names the image's content, not a tag that can move."""
        return "@sha256:" in self.image


def pipeline_signature(preset: str) -> inspect.Signature:
    """``preset`` and every pipeline parameter, typed as its setting, defaulting to the preset's value."""
    from captioning.config import load_config
    from captioning.parameters import PARAMETERS, PRESET_PARAMETER, parameter_type, parameters_from_config

    defaults = parameters_from_config(load_config(preset=preset))
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature(
        [inspect.Parameter(PRESET_PARAMETER, kind, annotation=str, default=preset)]
        + [inspect.Parameter(name, kind, annotation=parameter_type(name), default=defaults[name])
           for name in PARAMETERS])


def build_pipeline(options: BuildOptions = BuildOptions()):
    """The pipeline function for these build options (image, target, accelerators, parameter defaults)."""
    from kfp import dsl

    from captioning.parameters import PRESET_PARAMETER
    from captioning.workflow import STEPS, upstream_of
    from captioning.io import VOLUME_ENV
    from components.factory import CHECKPOINT_DIR_ENV, DOWNLOAD_CACHE_ENV, UPSTREAM_REF, step_component, step_parameters

    def kubernetes_settings(task, name):
        from kfp import kubernetes

        _kubernetes_task(task, options, gpu=name in GPU_STEPS)
        volumes = {"log_raw_data": (options.raw_cache_pvc, RAW_CACHE_MOUNT, DOWNLOAD_CACHE_ENV, "coco2014"),
                   "train": (options.checkpoint_pvc, CHECKPOINT_MOUNT, CHECKPOINT_DIR_ENV, "")}
        if name in volumes and volumes[name][0]:
            pvc, mount, env, folder = volumes[name]
            kubernetes.mount_pvc(task, pvc_name=pvc, mount_path=mount)
            task.set_env_variable(env, f"{mount}/{folder}".rstrip("/"))
            task.set_env_variable(VOLUME_ENV, f"{pvc}={mount}")  # named in the error when the volume is read-only
        if name == "process_data" and options.raw_cache_pvc:
            # raw_data only references the archives log_raw_data keeps there: read them at the same path
            kubernetes.mount_pvc(task, pvc_name=options.raw_cache_pvc, mount_path=RAW_CACHE_MOUNT)

    def add_step(name, params, tasks):
        """One task: its artifacts from the upstream tasks, its parameters from the pipeline's."""
        step = STEPS[name]
        arguments = {i: tasks[src].outputs[out] for i, (src, out) in step.inputs.items()}
        if upstream_of(name):
            arguments[UPSTREAM_REF] = tasks[upstream_of(name)].outputs["wandb_ref"]
        arguments.update({p: params[p] for p in (PRESET_PARAMETER, *step_parameters(step))})
        task = step_component(name)(**arguments).set_container_image(options.image)
        if options.target == "kubeflow":
            kubernetes_settings(task, name)
        elif name == "log_raw_data" and options.raw_cache_bucket:  # Vertex AI: no volume outlives a run, a bucket does
            task.set_env_variable(DOWNLOAD_CACHE_ENV, options.raw_cache_bucket)
        if name in GPU_STEPS:
            task.set_accelerator_type(options.accelerator).set_accelerator_limit(options.accelerator_count)
            cpu, memory = options.gpu_cpu, options.gpu_memory
        else:
            cpu, memory = options.cpu, options.memory
        task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
        cached = name not in UNCACHED_STEPS
        task.set_caching_options(cached)
        if cached:  # Argo's backoff factor must be an integer
            task.set_retry(options.retries, options.retry_backoff, 2, options.retry_window)
        else:  # an explicit limit of 0: without one, the task takes the controller's default (2 on KFP 2.17)
            task.set_retry(0, options.retry_backoff, 2, options.retry_window)
        if name == "promote":  # promote.deploy serves the new model with the pipeline's own image
            from captioning.deploy.after_promote import IMAGE_ENV, STORE_ENV

            task.set_env_variable(IMAGE_ENV, options.image)
            task.set_env_variable(STORE_ENV, options.backend["store"])
        task.set_display_name(name)
        tasks[name] = task

    signature = pipeline_signature(options.preset)

    def volume_check(claims: list[str]):
        """Kubeflow with volumes: an uncached check after log_raw_data that no other run's pod holds them (the
        dependency is not in the later tasks' cache keys). Not retried: a held volume stays held for hours."""
        from components.check_volumes import check_volumes

        task = check_volumes(claims=claims).set_container_image(options.image)
        _kubernetes_task(task, options, gpu=False)
        task.set_cpu_request("100m").set_cpu_limit("500m").set_memory_request("256Mi").set_memory_limit("512Mi")
        task.set_caching_options(False)
        task.set_retry(0, options.retry_backoff, 2, options.retry_window)
        return task.set_display_name("check_volumes")

    def captioning_pipeline(*args):
        params = dict(zip(signature.parameters, args))
        tasks = {}
        claims = [c for c in (options.raw_cache_pvc, options.checkpoint_pvc) if c] if options.target == "kubeflow" \
            else []
        check = None
        for name in STEPS:
            if name == "promote":
                with dsl.If(tasks["evaluate"].outputs["Output"] > params["min_score"], name=GATE):
                    add_step(name, params, tasks)
            else:
                add_step(name, params, tasks)
            if check is not None and name in ("process_data", "train"):
                tasks[name].after(check)
            if name == "log_raw_data" and claims:
                check = volume_check(claims).after(tasks[name])

    captioning_pipeline.__signature__ = signature
    captioning_pipeline.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    return dsl.pipeline(name="captioning", description=f"{DESCRIPTION} {compiled_for(options.target)}",
                        pipeline_root=options.pipeline_root or None)(captioning_pipeline)


def caption_signature(preset: str) -> inspect.Signature:
    """``preset`` and the batch captioning parameters, typed as their settings, defaulting to the preset's."""
    from captioning.config import load_config
    from captioning.parameters import CAPTION_PARAMETERS, PRESET_PARAMETER, caption_parameters_from_config

    defaults = caption_parameters_from_config(load_config(preset=preset))
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature(
        [inspect.Parameter(PRESET_PARAMETER, kind, annotation=str, default=preset)]
        + [inspect.Parameter(name, kind, annotation=type(defaults[name]), default=defaults[name])
           for name in CAPTION_PARAMETERS])


def build_caption_pipeline(options: BuildOptions = BuildOptions(pipeline="caption")):
    """Batch captioning with a registered model: resolve it, plan shards, caption them in parallel, merge."""
    from kfp import dsl

    from captioning.parameters import PRESET_PARAMETER
    from components.caption_shard import caption_shard
    from components.fetch_model import fetch_model
    from components.list_images import list_images
    from components.merge_captions import merge_captions
    from components.plan_captions import plan_captions
    from components.resolve_model import resolve_model

    signature = caption_signature(options.preset)

    def settle(task, name):
        task.set_container_image(options.image).set_display_name(name)
        if options.target == "kubeflow":
            _kubernetes_task(task, options, gpu=name in CAPTION_GPU_STEPS)
        if name in CAPTION_GPU_STEPS:
            task.set_accelerator_type(options.accelerator).set_accelerator_limit(options.accelerator_count)
            cpu, memory = options.gpu_cpu, options.gpu_memory
        else:
            cpu, memory = options.cpu, options.memory
        task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
        task.set_caching_options(name not in CAPTION_UNCACHED_STEPS)
        # Every step is idempotent (atomic files, an alias looked up again): retry them all.
        task.set_retry(options.retries, options.retry_backoff, 2, options.retry_window)
        return task

    def caption_pipeline(*args):
        p = dict(zip(signature.parameters, args))
        preset = p[PRESET_PARAMETER]
        registry = dict(registry=p["registry"], collection=p["collection"], wandb_mode=p["wandb_mode"],
                        wandb_secret=p["wandb_secret"])
        found = settle(resolve_model(preset=preset, model=p["model"], **registry), "resolve_model")
        model = settle(fetch_model(preset=preset, model_ref=found.outputs["model_ref"],
                                   model_version=found.outputs["model_version"], **registry), "fetch_model")
        listed = settle(list_images(preset=preset, source=p["source"]), "list_images")
        plan = settle(plan_captions(preset=preset, source=p["source"], shard_images=p["shard_images"],
                                    listing=listed.outputs["listing"]), "plan_captions")
        with dsl.ParallelFor(plan.outputs["Output"], parallelism=CAPTION_PARALLELISM) as shard:
            captioned = settle(caption_shard(model=model.outputs["resolved"], plan=plan.outputs["plan"], shard=shard,
                                             preset=preset, caption_batch_size=p["caption_batch_size"],
                                             sample=p["sample"]), "caption_shard")
        settle(merge_captions(plan=plan.outputs["plan"], shards=dsl.Collected(captioned.outputs["captions"]),
                              preset=preset, wandb_project=p["wandb_project"], wandb_entity=p["wandb_entity"],
                              wandb_mode=p["wandb_mode"], wandb_secret=p["wandb_secret"]), "merge_captions")

    caption_pipeline.__signature__ = signature
    caption_pipeline.__annotations__ = {q.name: q.annotation for q in signature.parameters.values()}
    return dsl.pipeline(name="captioning-batch", description=f"Caption images with the promoted model "
                        f"{compiled_for(options.target)}", pipeline_root=options.pipeline_root or None)(caption_pipeline)


def _kubernetes_task(task, options: BuildOptions, gpu: bool) -> None:
    """Every pod of both pipelines on Kubeflow: the W&B Secret, the image's user, the run's id, GPU taints."""
    from kfp import kubernetes

    from captioning.tracking import KFP_RUN_ID_ENV

    # The key reaches the pods from a Secret, never as a value in the YAML.
    kubernetes.use_secret_as_env(task, secret_name=WANDB_SECRET, secret_key_to_env={WANDB_SECRET_KEY: "WANDB_API_KEY"},
                                 optional=True)
    if not options.backend["optional_secret"]:  # the field is unknown there: without it the Secret is required
        for secret in task.platform_config["kubernetes"]["secretAsEnv"]:
            secret.pop("optional", None)
    # Pod Security "restricted": the backend (>= 2.16) adds no privilege escalation, all capabilities
    # dropped and the RuntimeDefault seccomp profile; the user and non-root are ours to say.
    if options.emits_security_context:
        kubernetes.set_security_context(task, run_as_user=IMAGE_UID, run_as_group=IMAGE_UID, run_as_non_root=True)
    # Which run this pod belongs to, for grouping its W&B run: from the pod's label, outside the cache key.
    kubernetes.use_field_path_as_env(task, env_name=KFP_RUN_ID_ENV, field_path=RUN_ID_LABEL)
    if gpu:
        kubernetes.add_toleration(task, **GPU_TOLERATION)
        if options.gpu_node_selector:
            key, value = options.gpu_node_selector.split("=", 1)
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
    if options.spot:
        for toleration in SPOT_TOLERATIONS:
            kubernetes.add_toleration(task, **toleration)


def compile_pipeline(output, options: BuildOptions = BuildOptions()) -> Path:
    from kfp import compiler

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    build = build_caption_pipeline if options.pipeline == "caption" else build_pipeline
    compiler.Compiler().compile(build(options), str(output))
    return output


if __name__ == "__main__":
    # The defaults only: `captioning compile` takes the build options (the CLI imports this module, not back).
    import sys

    if sys.argv[1:]:
        print(f"error: python pipeline.py takes no options (it compiles the defaults); use: captioning compile "
              f"{' '.join(sys.argv[1:])}", file=sys.stderr)
        sys.exit(2)
    print(compile_pipeline(Path("captioning_pipeline.yaml"), BuildOptions()))
