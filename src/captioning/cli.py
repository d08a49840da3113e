"""The ``captioning`` command."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from captioning import DEFAULT_IMAGE
from captioning.data.demo import DEMO_TRAIN_IMAGES, DEMO_VAL_IMAGES
from captioning.console import fail
from captioning.errors import CaptioningError
from captioning.redact import redact, redact_tree

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
bench_app = typer.Typer(no_args_is_help=True, help="Speed measurements (medians over repeats), one JSON line each.")
app.add_typer(bench_app, name="bench")
image_app = typer.Typer(no_args_is_help=True, help="The component image.")
app.add_typer(image_app, name="image")

log = logging.getLogger("captioning")


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    # TensorFlow's C++ log repeats what the steps report themselves (e.g. each corrupt JPEG).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1" if verbose else "3")
    from rich.console import Console

    from captioning.redact import RedactingFilter

    handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
    handler.addFilter(RedactingFilter())
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[handler], force=True)
    for noisy in ("urllib3", "absl", "tensorflow", "h5py", "matplotlib", "PIL", "google", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    """Show, Attend and Tell captioning on MS-COCO as a Kubeflow/Vertex pipeline tracked in W&B."""
    _setup_logging(verbose)
    # Parsed already; W&B records the command line in each run's metadata, so no URL password may stay in it.
    sys.argv[:] = [redact(arg) for arg in sys.argv]


HIGHLIGHTS = {
    "log_raw_data": ("bytes", "bytes_downloaded"),
    "process_data": ("images", "captions", "skipped_files", "vocab_size", "max_length"),
    "train": ("epochs", "best_epoch", "val_CIDEr", "val_BLEU-4", "beam_width", "resumed_epochs"),
    "evaluate": ("BLEU-4", "METEOR", "CIDEr", "baseline_CIDEr", "scenes_correct", "two_object_scenes_correct"),
    "promote": ("promoted", "candidate", "production"),
    "resolve_model": ("model_version",),
    "fetch_model": ("model_version",),
    "list_images": ("images",),
    "plan_captions": ("images", "shards"),
    "caption_shards": ("shards", "skipped"),
    "merge_captions": ("captioned", "skipped", "mean_score"),
}


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("step", "status", "seconds", "highlights", box=None, pad_edge=False)
    for name, step in summary["steps"].items():
        metrics = step.get("metrics", {})
        shown = []
        for key in HIGHLIGHTS.get(name, ()):
            if key in metrics:
                value = metrics[key]
                shown.append(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}")
        if step["status"] == "failed":
            shown = [redact(f"error: {step.get('error')}")]
        elif step["status"] == "skipped":
            shown = [step.get("reason", "")]
        table.add_row(name, step["status"], str(step.get("seconds", "")), " ".join(shown))
    Console(width=160).print(table)


@app.command()
def run(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file over the preset."),
    set_: List[str] = typer.Option([], "--set", help="Override one setting: section.key=value (repeatable)."),
    preset: str = typer.Option("demo", help="Base settings: demo or coco2014."),
    workdir: Path = typer.Option(Path("work"), help="Where every step writes its outputs."),
    summary_json: Optional[Path] = typer.Option(None, help="Summary file (default: WORKDIR/summary.json)."),
    runner: str = typer.Option("inprocess", help="inprocess, or docker: the compiled pipeline in containers (kfp.local)."),
    image: str = typer.Option(DEFAULT_IMAGE, help="Component image for --runner docker."),
    user: str = typer.Option("image", help="--runner docker: run the containers as the image's own user (as a "
                             "cluster does), 'host' (your uid:gid) or UID[:GID]."),
    pipeline: str = typer.Option("train", help="train: log_raw_data → ... → promote; caption: caption the images "
                                 "of batch.source with the model holding batch.model (the production alias)."),
) -> None:
    """Run every step in order and write a summary JSON."""
    from captioning.config import load_config
    from captioning.runners.inprocess import run_pipeline, write_summary

    if runner not in ("inprocess", "docker"):
        fail(CaptioningError(f"--runner {runner!r}: choose inprocess or docker"))
    if pipeline not in ("train", "caption"):
        fail(CaptioningError(f"--pipeline {pipeline!r}: choose train or caption"))
    from captioning.errors import ConfigError
    from captioning.io import check_writable, exclusive_workdir, not_a_file

    summary_path = summary_json or Path(workdir) / "summary.json"
    try:
        cfg = load_config(config, set_, preset)
        try:
            if summary_path.exists() and not summary_path.is_file():  # refused before the work, not after it
                raise ConfigError(f"--summary-json {summary_path}: {not_a_file(summary_path)}; name a regular file")
        except OSError as exc:  # a name too long, a component that is a file
            raise ConfigError(f"--summary-json {summary_path}: {exc.strerror or exc}") from None
        with exclusive_workdir(workdir):
            check_writable(summary_path.parent, "--summary-json")
            if runner == "docker":
                from captioning.runners.kfp_local import run_in_docker

                summary = run_in_docker(cfg, workdir, image, preset, user, pipeline)
            elif pipeline == "caption":
                from captioning.runners.inprocess import run_caption_pipeline

                summary = run_caption_pipeline(cfg, workdir)
            else:
                summary = run_pipeline(cfg, workdir)
            path = write_summary(summary, summary_path)
    except CaptioningError as exc:
        fail(exc)
    _print_summary(summary)
    typer.echo(f"summary: {path}")
    if summary["status"] != "ok":
        from captioning.io import exit_process

        exit_process(1)


def _check_decoder(decoder: str | None) -> None:
    if decoder not in (None, "greedy", "beam"):
        fail(CaptioningError(f"--decoder {decoder!r}: choose greedy or beam"))


def escape_field(text: str) -> str:
    """A tab-separated field that stays one field on one line: backslash, tab, line breaks and every other control
    character escaped (\\\\, \\t, \\n, \\r, \\xNN, \\uNNNN)."""
    import unicodedata

    named = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
    out = []
    for ch in text:
        if ch in named:
            out.append(named[ch])
        elif unicodedata.category(ch) in ("Cc", "Zl", "Zp", "Cs"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


@app.command()
def caption(
    images: List[Path] = typer.Argument(..., help="JPEG or PNG files."),
    model: Path = typer.Option(..., "--model", "-m", help="The train step's model folder (or a registry version)."),
    attention_png: Optional[Path] = typer.Option(None, help="Also write one attention figure per image here."),
    decoder: Optional[str] = typer.Option(None, help="greedy or beam (default: what train chose on validation)."),
    beam_width: Optional[int] = typer.Option(None, min=1, max=20),
    max_image_mb: float = typer.Option(16.0, min=0.001, help="A larger file is refused before it is read."),
    json_lines: bool = typer.Option(False, "--json", help="One JSON object per image (path, caption, score)."),
) -> None:
    """Print one caption per image: PATH<TAB>CAPTION, the path escaped (\\t, \\n, \\\\, \\xNN for control
    characters) so that a file name cannot forge a line; or JSON lines with --json."""
    from captioning.caption import caption_images

    _check_decoder(decoder)
    try:
        results = caption_images(model, images, decoder, beam_width, max_bytes=int(max_image_mb * (1 << 20)))
    except CaptioningError as exc:
        fail(exc)
    for item in results:
        if json_lines:
            # ASCII: a path that is not valid UTF-8 (a lone surrogate from the file system) still prints
            typer.echo(json.dumps({"path": str(item.path), "caption": item.caption, "score": round(item.score, 6)}))
        else:
            typer.echo(f"{escape_field(str(item.path))}\t{item.caption}")
    if attention_png:
        from captioning.attention import plot_attention, read_rgb

        for item in results:
            out = attention_png / f"{item.path.stem}.attention.png"
            plot_attention(read_rgb(item.path), item.words, item.attention, out, title=item.caption)
            typer.echo(f"attention: {out}", err=True)


@app.command()
def serve(
    model: Optional[str] = typer.Option(
        None, "--model", "-m", envvar="AIP_STORAGE_URI", show_envvar=False,
        help="A model folder, an alias in --registry (production), wandb:ALIAS (the W&B Registry), gs://... or s3://... "
        "(AWS_ENDPOINT_URL for an S3-compatible store; default: AIP_STORAGE_URI, as Vertex AI sets it)."),
    registry: Optional[Path] = typer.Option(None, help="The local registry folder promote wrote (for an alias)."),
    collection: str = typer.Option("captioning-model", help="The registry collection of the alias."),
    name: str = typer.Option("captioner", help="The model's name in the routes (/v1/models/NAME:predict)."),
    host: str = typer.Option("0.0.0.0", help="Address to listen on."),
    port: Optional[int] = typer.Option(None, envvar="AIP_HTTP_PORT", min=1, max=65535,
                                       help="Default: AIP_HTTP_PORT (Vertex AI) or 8080."),
    max_batch: int = typer.Option(32, min=1, help="Most images captioned as one batch."),
    window_ms: float = typer.Option(50.0, min=0, help="How long the batcher waits for images still being decoded."),
    max_request_mb: float = typer.Option(32.0, min=0.001, help="Largest request body (413 above)."),
    max_image_mb: float = typer.Option(16.0, min=0.001, help="Largest image (413 above)."),
    max_instances: int = typer.Option(64, min=1, help="Most images per request (413 above)."),
    header_timeout_s: float = typer.Option(10.0, min=0.1, help="A request's headers must arrive within this, or "
                                           "the connection is closed (slow clients hold no slot)."),
    body_timeout_s: float = typer.Option(60.0, min=0.1, help="A request's body must arrive within this (408)."),
    decode_budget_mb: float = typer.Option(4096.0, min=1, help="Memory all requests may decode into at once, "
                                           "judged from the image headers before decoding (503 past it)."),
    allow_uri: List[str] = typer.Option([], help="A URI prefix instances may name (gs://bucket/, https://host/); "
                                        "repeatable. Without one, {\"uri\": ...} instances are refused."),
    decoder: Optional[str] = typer.Option(None, help="greedy or beam (default: what train chose on validation)."),
    beam_width: Optional[int] = typer.Option(None, min=1, max=20),
) -> None:
    """Serve a model over HTTP: KServe v1, Open Inference v2 and Vertex AI's routes, batched on the device."""
    from captioning.caption import CaptionModel
    from captioning.model_source import resolve_model
    from captioning.serving import DEFAULT_PORT, Limits, serve as run_server

    _check_decoder(decoder)
    try:
        if not model:
            raise CaptioningError("--model: none given and AIP_STORAGE_URI is not set; name a model folder, an "
                                  "alias with --registry, wandb:ALIAS, gs://... or s3://...")
        resolved = resolve_model(model, str(registry or ""), collection)
        loaded = CaptionModel(resolved.path, decoder, beam_width, version=resolved.version)
    except CaptioningError as exc:
        fail(exc)
    mib = 1 << 20
    limits = Limits(max_request_bytes=int(max_request_mb * mib), max_image_bytes=int(max_image_mb * mib),
                    max_instances=max_instances, max_batch=max_batch, window_ms=window_ms, allow_uri=tuple(allow_uri),
                    header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s,
                    decode_budget_bytes=int(decode_budget_mb * mib))
    run_server(loaded, name, host, port or DEFAULT_PORT, limits)


BUILD_PANEL = "Building the pipeline"


def with_build_options(*, required: tuple[str, ...] = (), panel: str | None = None,
                       unpanelled: tuple[str, ...] = ()):
    """Give a command every field of ``pipeline.BuildOptions`` as an option; it receives them as ``build``.

    The build options are declared once, in ``BuildOptions``: ``compile``, ``submit``
    and ``pipeline.py`` (its defaults) all take them from there.
    """
    from pipeline import BuildOptions

    def decorate(command):
        signature = inspect.signature(command)
        options = []
        for field in dataclasses.fields(BuildOptions):
            meta = field.metadata
            flag = "--" + field.name.replace("_", "-")
            if field.type is bool:
                flag = f"{flag}/--no-{flag[2:]}"
            default = ... if field.name in required else field.default
            option = typer.Option(default, flag, help=meta["help"], envvar=meta.get("envvar"), min=meta.get("min"),
                                  rich_help_panel=None if field.name in unpanelled else panel,
                                  show_default=field.name not in required)
            options.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                             annotation=field.type))

        @functools.wraps(command)
        def wrapper(**kwargs):
            values = {field.name: kwargs.pop(field.name) for field in dataclasses.fields(BuildOptions)}
            try:
                build = BuildOptions(**values)
            except ValueError as exc:
                fail(CaptioningError(str(exc)))
            return command(build=build, **kwargs)

        kept = [p for p in signature.parameters.values() if p.name != "build"]
        wrapper.__signature__ = signature.replace(parameters=kept + options)
        wrapper.__annotations__ = {**{k: v for k, v in command.__annotations__.items() if k != "build"},
                                   **{p.name: p.annotation for p in options}}
        return wrapper

    return decorate


def _print_left_out(build) -> None:
    """What the compiled IR does without, for the backend it is for (BuildOptions.left_out)."""
    for note in build.left_out():
        typer.echo(f"note: {note}", err=True)


@app.command("compile")
@with_build_options()
def compile_cmd(build, output: Path = typer.Option(Path("captioning_pipeline.yaml"), "--output", "-o")) -> None:
    """Compile the pipeline to KFP IR YAML."""
    from pipeline import compile_pipeline

    typer.echo(str(compile_pipeline(output, build)))
    _print_left_out(build)
    if not build.image_pinned:
        typer.echo(f"note: --image {build.image} is a tag: KFP's cache key holds the reference, not the content, "
                   "so a rebuilt image under the same tag is answered from the cache. Pass NAME@sha256:... "
                   "(`captioning image build --push` prints it).", err=True)


SUBMIT_KUBEFLOW = "Kubeflow"
SUBMIT_VERTEX = "Vertex AI"
SUBMIT_PACKAGE = "Package"


@app.command()
@with_build_options(required=("target",), panel=SUBMIT_PACKAGE, unpanelled=("target", "preset"))
def submit(
    build,
    set_: List[str] = typer.Option([], "--set", help="A setting as section.key=value; becomes a runtime parameter."),
    package: Optional[Path] = typer.Option(None, help="A package from `captioning compile` (default: compile "
                                           "now into ./captioning_pipeline.TARGET.yaml).", rich_help_panel=SUBMIT_PACKAGE),
    experiment: Optional[str] = typer.Option(
        None, help="Experiment, created when missing. Default: captioning (kubeflow), none (vertex)."),
    run_name: Optional[str] = typer.Option(None, help="Default: captioning-YYYYmmdd-HHMMSS."),
    service_account: Optional[str] = typer.Option(
        None, help="Identity of the pods. Default: captioning-runner (kubeflow, from manifests/); "
        "the project's default (vertex)."),
    host: Optional[str] = typer.Option(None, envvar="KF_PIPELINES_ENDPOINT", help="KFP API URL.",
                                       rich_help_panel=SUBMIT_KUBEFLOW),
    namespace: Optional[str] = typer.Option(None, envvar="KF_PIPELINES_NAMESPACE",
                                            help="Profile namespace (multi-user Kubeflow).",
                                            rich_help_panel=SUBMIT_KUBEFLOW),
    token: Optional[str] = typer.Option(None, envvar="KF_PIPELINES_TOKEN", show_default=False,
                                        help="Bearer token (default: the in-cluster service-account token).",
                                        rich_help_panel=SUBMIT_KUBEFLOW),
    cookie: Optional[str] = typer.Option(None, envvar="KF_PIPELINES_COOKIE", show_default=False,
                                         help="Session cookie, e.g. authservice_session=...",
                                         rich_help_panel=SUBMIT_KUBEFLOW),
    ui_host: Optional[str] = typer.Option(None, envvar="KF_PIPELINES_UI_ENDPOINT", help="Base of the printed URL.",
                                          rich_help_panel=SUBMIT_KUBEFLOW),
    project: Optional[str] = typer.Option(None, envvar="GOOGLE_CLOUD_PROJECT", rich_help_panel=SUBMIT_VERTEX),
    region: str = typer.Option("us-central1", envvar="GOOGLE_CLOUD_REGION", rich_help_panel=SUBMIT_VERTEX),
    wandb_secret: Optional[str] = typer.Option(
        None, help="Secret Manager secret with the W&B key. Default: projects/PROJECT/secrets/wandb-api-key/"
        "versions/latest.", rich_help_panel=SUBMIT_VERTEX),
    api_endpoint: Optional[str] = typer.Option(None, help="Vertex API endpoint (private service connect).",
                                               rich_help_panel=SUBMIT_VERTEX),
    access_token: Optional[str] = typer.Option(
        None, envvar="GOOGLE_OAUTH_ACCESS_TOKEN", show_default=False,
        help="OAuth access token (e.g. from `gcloud auth print-access-token`); default: application default "
        "credentials.", rich_help_panel=SUBMIT_VERTEX),
    wait: bool = typer.Option(False, help="Follow the run to its end; exit 1 unless it succeeds."),
    timeout_s: float = typer.Option(7 * 24 * 3600, help="Give up waiting after this long."),
    poll_s: float = typer.Option(10.0, min=0.01, help="Seconds between state checks."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be sent; contact nothing."),
) -> None:
    """Submit the pipeline to Kubeflow Pipelines or Vertex AI Pipelines."""
    from captioning.parameters import caption_runtime_parameters, runtime_parameters
    from captioning.submit.kubeflow import DEFAULT_SERVICE_ACCOUNT, KubeflowTarget
    from captioning.submit.package import check_package, read_package
    from captioning.submit.vertex import VertexTarget
    from captioning.submit.vertex import check_target as check_vertex_target

    target = build.target
    try:
        if wandb_secret:
            set_ = [*set_, f"wandb.api_key_secret={wandb_secret}"]  # validated like any setting
        parameters = (caption_runtime_parameters if build.pipeline == "caption" else runtime_parameters)(
            build.preset, set_)
        if target == "vertex" and project and not parameters["wandb_secret"] and parameters["wandb_mode"] == "online":
            from captioning.submit.vertex import default_wandb_secret

            parameters["wandb_secret"] = default_wandb_secret(project)
        if target == "kubeflow":
            pipeline_root = build.pipeline_root or None
            where = KubeflowTarget(host, namespace, token, cookie, experiment or "captioning", run_name, pipeline_root,
                                   DEFAULT_SERVICE_ACCOUNT if service_account is None else service_account, ui_host)
        else:
            where = VertexTarget(project or "", region, build.pipeline_root, service_account, experiment, run_name,
                                 api_endpoint)
            check_vertex_target(where)  # before compiling: a missing --project should not wait for that
        if package is None:
            from pipeline import compile_pipeline

            stem = "captioning_batch" if build.pipeline == "caption" else "captioning_pipeline"
            package = compile_pipeline(Path(f"{stem}.{target}.yaml"), build)
            typer.echo(f"compiled: {package}", err=True)
            _print_left_out(build)
        check_package(read_package(package), target, parameters, build.pipeline)
        if target == "kubeflow":
            outcome = _submit_kubeflow(package, parameters, dry_run, wait, timeout_s, poll_s, where)
        else:
            outcome = _submit_vertex(package, parameters, dry_run, wait, timeout_s, poll_s, where, access_token)
    except CaptioningError as exc:
        fail(exc)
    if outcome.get("state") not in (None, "SUCCEEDED", "PIPELINE_STATE_SUCCEEDED"):
        raise typer.Exit(1)


def _state_echo(state: str) -> None:
    typer.echo(f"state: {state}", err=True)


def _submit_kubeflow(package, parameters, dry_run, wait, timeout_s, poll_s, target) -> dict:
    from captioning.submit import kubeflow

    if dry_run:
        typer.echo(json.dumps(redact_tree(kubeflow.dry_run_plan(package, parameters, target)), indent=1))
        return {}
    outcome = kubeflow.submit_kubeflow(package, parameters, target, wait=wait, timeout_s=timeout_s, poll_s=poll_s,
                                       on_state=_state_echo)
    typer.echo(f"experiment: {outcome['experiment']}" + (f" (namespace {outcome['namespace']})"
                                                          if outcome["namespace"] else ""))
    typer.echo(f"run: {outcome['url']}")
    if outcome["state"]:
        typer.echo(f"state: {outcome['state']}")
    return outcome


def _submit_vertex(package, parameters, dry_run, wait, timeout_s, poll_s, target, access_token) -> dict:
    from captioning.submit import vertex

    if dry_run:
        typer.echo(json.dumps(redact_tree(vertex.dry_run_plan(package, parameters, target)), indent=1))
        return {}
    outcome = vertex.submit_vertex(package, parameters, target, wait=wait, timeout_s=timeout_s, poll_s=poll_s,
                                   access_token=access_token, on_state=_state_echo)
    typer.echo(f"job: {outcome['job']}")
    typer.echo(f"run: {outcome['url']}")
    if outcome["state"]:
        typer.echo(f"state: {outcome['state']}")
    return outcome


def _register_deploy() -> None:
    from captioning.deploy.command import deploy

    app.command("deploy")(deploy)


_register_deploy()


@image_app.command("build")
def image_build(
    tag: str = typer.Option(DEFAULT_IMAGE),
    base_image: Optional[str] = typer.Option(None, help="Build on this local image instead of the TF base."),
    wheelhouse: Optional[Path] = typer.Option(None, help="Wheel folder (default build/wheelhouse-VARIANT)."),
    variant: str = typer.Option("gpu", help="gpu: tensorflow[and-cuda]; cpu: tensorflow-cpu."),
    debian_image: str = typer.Option("debian:bookworm-slim", help="Base of the TF base image."),
    imagenet: bool = typer.Option(True, help="Try to bake the ImageNet weights into the image."),
    push: bool = typer.Option(False, help="Push TAG to its registry and print the digest reference to compile with."),
) -> None:
    """Build the component image with the local Docker engine; Python packages come from a wheelhouse.

    Prints the image's digest reference (NAME@sha256:...) once the registry knows it (after --push): compile
    with that, and KFP's cache key names the image's content rather than a tag that can move."""
    from captioning.image_build import build_image

    try:
        result = build_image(tag, base_image, wheelhouse, variant, debian_image, imagenet, push)
    except CaptioningError as exc:
        fail(exc)
    typer.echo(json.dumps({"tag": result.tag, "base": result.base, "id": result.image_id,
                           "size_bytes": result.size_bytes, "digest_ref": result.digest_ref}))
    if not result.digest_ref:
        typer.echo("note: no registry digest yet (a local build has none); push with --push to get NAME@sha256:...",
                   err=True)


@app.command("demo-data")
def demo_data(
    dest: Path = typer.Argument(..., help="Folder for the mirror (COCO 2014 layout)."),
    train_images: int = typer.Option(DEMO_TRAIN_IMAGES, min=1),
    val_images: int = typer.Option(DEMO_VAL_IMAGES, min=1),
    seed: int = 0,
    awkward: bool = typer.Option(True, help="Include truncated, empty, CMYK, ... files."),
) -> None:
    """Write the synthetic demo data as a COCO mirror (serve it over HTTP or point data.base_url at it)."""
    from captioning.data.demo import write_coco_mirror

    info = write_coco_mirror(dest, train_images=train_images, val_images=val_images, seed=seed, awkward=awkward)
    typer.echo(json.dumps(info, indent=1))


# Options every bench command takes.
Repeats = Annotated[int, typer.Option(min=1, help="Timed runs; medians are reported.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print only the JSON line.")]


def _print_bench(result: dict, as_json: bool) -> None:
    typer.echo(json.dumps(result) if as_json else json.dumps(result, indent=1))


@bench_app.command("features")
def bench_features_cmd(
    images: int = typer.Option(128, min=1),
    batch: int = typer.Option(32, min=1),
    source: str = typer.Option("zip", help="zip: read the JPEGs out of a zip, as process_data does; files: from disk."),
    repeats: Repeats = 3,
    as_json: AsJson = False,
) -> None:
    """JPEGs -> features written, vs the backbone on in-memory tensors; storage per image."""
    from captioning.bench import bench_features

    if source not in ("zip", "files"):
        fail(CaptioningError(f"--source {source!r}: choose zip or files"))
    _print_bench(bench_features(images, batch, repeats, source=source), as_json)


@bench_app.command("train")
def bench_train_cmd(
    steps: int = typer.Option(20, min=1),
    repeats: Repeats = 3,
    baseline: bool = typer.Option(True, help="Also time the tutorial-style implementation."),
    input_only: bool = typer.Option(False, "--input-only", help="Only the input pipeline, from a cold page cache."),
    captions_per_image: int = typer.Option(5, min=1, max=64, help="K captions of each image in a batch."),
    as_json: AsJson = False,
) -> None:
    """Per-image training steps with their input pipeline (feature shards on disk) at vocabulary 5000,
    embedding 256, units 512, batch 64 captions, COCO-like lengths; the input pipeline alone."""
    from captioning.bench import bench_train

    _print_bench(bench_train(steps, repeats, baseline, input_only, captions_per_image), as_json)


@bench_app.command("decode")
def bench_decode_cmd(
    captions: int = typer.Option(256, min=1),
    repeats: Repeats = 3,
    baseline: bool = typer.Option(True, help="Also time tutorial-style decoding (one image, eager steps)."),
    baseline_captions: int = typer.Option(8, min=1, help="Captions for the (slow) tutorial-style run."),
    as_json: AsJson = False,
) -> None:
    """Greedy decoding of up to 50 tokens at the same sizes."""
    from captioning.bench import bench_decode

    _print_bench(bench_decode(captions, repeats, baseline, baseline_captions), as_json)


@bench_app.command("serve")
def bench_serve_cmd(
    requests: int = typer.Option(64, min=2, help="One-image requests per timed run."),
    concurrency: int = typer.Option(16, min=1, help="Requests in flight at once in the concurrent runs."),
    model: str = typer.Option("", help="Model folder or alias (default: an untrained model at the bench sizes)."),
    registry: str = typer.Option("", help="Registry folder for an alias."),
    url: str = typer.Option("", help="A running server to measure instead (http://127.0.0.1:8080)."),
    max_batch: int = typer.Option(32, min=1),
    window_ms: float = typer.Option(50.0, min=0),
    repeats: Repeats = 3,
    as_json: AsJson = False,
) -> None:
    """captions/s and p50/p95 latency over loopback HTTP: concurrent (batched) vs one request at a time."""
    from captioning.bench import bench_serve

    try:
        result = bench_serve(requests, concurrency, repeats, model, url, registry, max_batch, window_ms)
    except CaptioningError as exc:
        fail(exc)
    _print_bench(result, as_json)


if __name__ == "__main__":
    app()
