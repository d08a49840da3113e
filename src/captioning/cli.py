"""The ``captioning`` command."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import List, Optional

import typer

from captioning.errors import CaptioningError

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

    handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[handler], force=True)
    for noisy in ("urllib3", "absl", "tensorflow", "h5py", "matplotlib", "PIL", "google"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    """Show, Attend and Tell captioning on MS-COCO as a Kubeflow/Vertex pipeline tracked in W&B."""
    _setup_logging(verbose)


HIGHLIGHTS = {
    "log_raw_data": ("bytes", "bytes_downloaded"),
    "process_data": ("images", "captions", "skipped_files", "vocab_size", "max_length"),
    "train": ("epochs", "best_epoch", "val_loss", "resumed_epochs"),
    "evaluate": ("BLEU-4", "METEOR", "CIDEr", "baseline_CIDEr"),
    "promote": ("promoted", "candidate", "production"),
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
            shown = [f"error: {step.get('error')}"]
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
    image: str = typer.Option("captioning:0.1.0", help="Component image for --runner docker."),
) -> None:
    """Run every step in order and write a summary JSON."""
    from captioning.config import load_config
    from captioning.runner import run_pipeline, write_summary

    if runner not in ("inprocess", "docker"):
        _fail(CaptioningError(f"--runner {runner!r}: choose inprocess or docker"))
    try:
        cfg = load_config(config, set_, preset)
        if runner == "docker":
            from captioning.docker_runner import run_in_docker

            summary = run_in_docker(cfg, workdir, image, preset)
        else:
            summary = run_pipeline(cfg, workdir)
    except CaptioningError as exc:
        _fail(exc)
    path = write_summary(summary, summary_json or Path(workdir) / "summary.json")
    _print_summary(summary)
    typer.echo(f"summary: {path}")
    if summary["status"] != "ok":
        raise typer.Exit(1)


@app.command()
def caption(
    images: List[Path] = typer.Argument(..., help="JPEG or PNG files."),
    model: Path = typer.Option(..., "--model", "-m", help="The train step's model folder (or a registry version)."),
    attention_png: Optional[Path] = typer.Option(None, help="Also write one attention figure per image here."),
    decoder: Optional[str] = typer.Option(None, help="greedy or beam (default: as evaluated)."),
    beam_width: Optional[int] = typer.Option(None, min=1, max=20),
) -> None:
    """Print one caption per image: PATH<TAB>CAPTION."""
    from captioning.caption import caption_images

    if decoder not in (None, "greedy", "beam"):
        _fail(CaptioningError(f"--decoder {decoder!r}: choose greedy or beam"))
    try:
        results = caption_images(model, images, decoder, beam_width)
    except CaptioningError as exc:
        _fail(exc)
    for item in results:
        typer.echo(f"{item.path}\t{item.caption}")
    if attention_png:
        from captioning.attention import plot_attention, read_rgb

        for item in results:
            out = attention_png / f"{item.path.stem}.attention.png"
            plot_attention(read_rgb(item.path), item.words, item.attention, out, title=item.caption)
            typer.echo(f"attention: {out}", err=True)


@app.command("compile")
def compile_cmd(
    output: Path = typer.Option(Path("captioning_pipeline.yaml"), "--output", "-o"),
    target: str = typer.Option("kubeflow", help="kubeflow or vertex (accelerator names and secrets differ)."),
    image: str = typer.Option("captioning:0.1.0", help="The component image the pods run."),
    accelerator_type: str = typer.Option("", help="Default: nvidia.com/gpu (kubeflow), NVIDIA_L4 (vertex)."),
    accelerator_count: int = typer.Option(1, min=0),
    preset: str = typer.Option("coco2014", help="Defaults of the pipeline parameters."),
) -> None:
    """Compile the pipeline to KFP IR YAML (same as `python pipeline.py`)."""
    from pipeline import ACCELERATORS, BuildOptions, compile_pipeline

    if target not in ACCELERATORS:
        _fail(CaptioningError(f"--target {target!r}: choose kubeflow or vertex"))
    from captioning.config import preset_dict

    try:
        preset_dict(preset)
    except CaptioningError as exc:
        _fail(exc)
    path = compile_pipeline(output, BuildOptions(target=target, image=image, accelerator_type=accelerator_type,
                                                 accelerator_count=accelerator_count, preset=preset))
    typer.echo(str(path))


@image_app.command("build")
def image_build(
    tag: str = typer.Option("captioning:0.1.0"),
    base_image: Optional[str] = typer.Option(None, help="Build on this local image instead of the TF base."),
    wheelhouse: Optional[Path] = typer.Option(None, help="Wheel folder (default build/wheelhouse-VARIANT)."),
    variant: str = typer.Option("gpu", help="gpu: tensorflow[and-cuda]; cpu: tensorflow-cpu."),
    debian_image: str = typer.Option("debian:bookworm-slim", help="Base of the TF base image."),
    imagenet: bool = typer.Option(True, help="Try to bake the ImageNet weights into the image."),
) -> None:
    """Build the component image with the local Docker engine; Python packages come from a wheelhouse."""
    from captioning.image import build_image

    try:
        result = build_image(tag, base_image, wheelhouse, variant, debian_image, imagenet)
    except CaptioningError as exc:
        _fail(exc)
    typer.echo(json.dumps({"tag": result.tag, "base": result.base, "id": result.image_id,
                           "size_bytes": result.size_bytes}))


@app.command("demo-data")
def demo_data(
    dest: Path = typer.Argument(..., help="Folder for the mirror (COCO 2014 layout)."),
    train_images: int = typer.Option(900, min=1),
    val_images: int = typer.Option(300, min=1),
    seed: int = 0,
    awkward: bool = typer.Option(True, help="Include truncated, empty, CMYK, ... files."),
) -> None:
    """Write the synthetic demo data as a COCO mirror (serve it over HTTP or point data.base_url at it)."""
    from captioning.data.demo import write_coco_mirror

    info = write_coco_mirror(dest, train_images=train_images, val_images=val_images, seed=seed, awkward=awkward)
    typer.echo(json.dumps(info, indent=1))


@bench_app.command("features")
def bench_features_cmd(
    images: int = typer.Option(128, min=1),
    batch: int = typer.Option(32, min=1),
    repeats: int = typer.Option(3, min=1),
    as_json: bool = typer.Option(False, "--json", help="Print only the JSON line."),
) -> None:
    """JPEG files -> features written, vs the backbone on in-memory tensors; storage per image."""
    from captioning.bench import bench_features

    result = bench_features(images, batch, repeats)
    typer.echo(json.dumps(result) if as_json else json.dumps(result, indent=1))


@bench_app.command("train")
def bench_train_cmd(
    steps: int = typer.Option(20, min=1),
    repeats: int = typer.Option(3, min=1),
    baseline: bool = typer.Option(True, help="Also time the tutorial-style implementation."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Training steps at vocabulary 5000, embedding 256, units 512, batch 64, COCO-like lengths."""
    from captioning.bench import bench_train

    result = bench_train(steps, repeats, baseline)
    typer.echo(json.dumps(result) if as_json else json.dumps(result, indent=1))


@bench_app.command("decode")
def bench_decode_cmd(
    captions: int = typer.Option(256, min=1),
    repeats: int = typer.Option(3, min=1),
    baseline: bool = typer.Option(True, help="Also time tutorial-style decoding (one image, eager steps)."),
    baseline_captions: int = typer.Option(8, min=1, help="Captions for the (slow) tutorial-style run."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Greedy decoding of up to 50 tokens at the same sizes."""
    from captioning.bench import bench_decode

    result = bench_decode(captions, repeats, baseline, baseline_captions)
    typer.echo(json.dumps(result) if as_json else json.dumps(result, indent=1))


if __name__ == "__main__":
    app()
