"""Building the component image with the local Docker engine (the docker Python package).

Python packages reach the image only through a wheelhouse filled on the host
(``pip wheel`` against ``requirements.lock``), so the build itself needs no
package index: that is how CI, air-gapped clusters and this project's own
offline machines build it.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from captioning import DEFAULT_IMAGE
from captioning.errors import CaptioningError

log = logging.getLogger(__name__)

TF_REQUIREMENTS = {"gpu": "tensorflow[and-cuda]==2.21.0", "cpu": "tensorflow-cpu==2.21.0"}


class ImageBuildError(CaptioningError):
    pass


def project_root() -> Path:
    """The checkout holding docker/ and components/ (pipeline.py ships beside them)."""
    import pipeline

    root = Path(pipeline.__file__).resolve().parent
    if not (root / "docker" / "Dockerfile").is_file() or not (root / "components").is_dir():
        raise ImageBuildError(f"{root}: no docker/Dockerfile here; run `captioning image build` from a checkout")
    return root


def build_wheelhouse(dest: Path, variant: str, root: Path) -> Path:
    """Wheels of the project and every pinned dependency (plus TensorFlow for ``variant``)."""
    dest.mkdir(parents=True, exist_ok=True)
    lock = root / "requirements.lock"
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(dest), "--find-links", str(dest),
           "-c", str(lock), str(root), TF_REQUIREMENTS[variant]]
    log.info("filling the wheelhouse %s (%s)", dest, variant)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageBuildError(f"pip wheel into {dest} failed:\n{proc.stderr[-3000:]}")
    shutil.copyfile(lock, dest / "constraints.txt")
    # Only the freshly built project wheel: an older one would satisfy the constraint too.
    wheels = sorted(dest.glob("captioning-*.whl"), key=lambda p: p.stat().st_mtime)
    for stale in wheels[:-1]:
        stale.unlink()
    return dest


@dataclass
class BuildResult:
    tag: str
    base: str
    image_id: str
    size_bytes: int
    digest_ref: str = ""  # NAME@sha256:... once a registry holds the image; what `compile --image` should get


def repository(tag: str) -> str:
    """``registry:5000/ml/captioning:1.0`` -> ``registry:5000/ml/captioning`` (a port is not a tag)."""
    name = tag.split("@", 1)[0]
    head, _, last = name.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}" if head else last.split(":", 1)[0]


def digest_from_push(events, tag: str) -> str:
    """The digest a registry answered to ``docker push`` (its event stream), as NAME@sha256:..."""
    digest = ""
    for event in events:
        if "error" in event:
            raise ImageBuildError(f"docker push {tag} failed: {event['error'].strip()}")
        digest = event.get("aux", {}).get("Digest", digest)
    if not digest:
        raise ImageBuildError(f"docker push {tag}: the registry reported no digest")
    return f"{repository(tag)}@{digest}"


def known_digest(attrs: dict, tag: str) -> str:
    """A digest reference the local engine already knows for ``tag``'s repository (pulled or pushed before)."""
    repo = repository(tag)
    return next((ref for ref in attrs.get("RepoDigests") or [] if ref.split("@", 1)[0] == repo), "")


def _docker():
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:
        raise ImageBuildError(f"no Docker engine reachable ({exc}); start dockerd or set DOCKER_HOST") from None
    return client


def _build(client, context: Path, dockerfile: str, tag: str, buildargs: dict[str, str]) -> str:
    log.info("docker build %s (%s)", tag, ", ".join(f"{k}={v}" for k, v in buildargs.items()))
    image_id = None
    tail: list[str] = []
    for chunk in client.api.build(path=str(context), dockerfile=dockerfile, tag=tag, buildargs=buildargs,
                                  rm=True, forcerm=True, decode=True):
        if "stream" in chunk:
            line = chunk["stream"].rstrip()
            if line:
                tail = (tail + [line])[-40:]
                log.debug("%s", line)
        if "error" in chunk:
            raise ImageBuildError(f"docker build of {tag} failed: {chunk['error'].strip()}\n" + "\n".join(tail[-15:]))
        if "aux" in chunk and "ID" in chunk["aux"]:
            image_id = chunk["aux"]["ID"]
    if image_id is None:
        raise ImageBuildError(f"docker build of {tag} reported no image")
    return image_id


def build_image(tag: str = DEFAULT_IMAGE, base_image: str | None = None, wheelhouse: Path | None = None,
                variant: str = "gpu", debian_image: str = "debian:bookworm-slim", fetch_imagenet: bool = True,
                push: bool = False) -> BuildResult:
    """Build the shared TensorFlow base (unless ``base_image`` is given) and the component image on it."""
    if variant not in TF_REQUIREMENTS:
        raise ImageBuildError(f"--variant {variant!r}: choose gpu or cpu")
    root = project_root()
    client = _docker()
    wheelhouse = build_wheelhouse(Path(wheelhouse or root / "build" / f"wheelhouse-{variant}"), variant, root)
    with tempfile.TemporaryDirectory(prefix="captioning-image-") as tmp:
        context = Path(tmp)
        shutil.copytree(root / "docker", context / "docker")
        shutil.copytree(root / "components", context / "components",
                        ignore=shutil.ignore_patterns("__pycache__"))
        # Hard links keep a multi-GB wheelhouse from being copied (same file system) .
        shutil.copytree(wheelhouse, context / "wheelhouse", copy_function=_link_or_copy)
        if base_image:
            base, tf_requirement = base_image, TF_REQUIREMENTS[variant]
        else:
            base = f"captioning-tf-base:2.21.0-{variant}"
            _build(client, context, "docker/base.Dockerfile", base,
                   {"DEBIAN_IMAGE": debian_image, "TF_REQUIREMENT": TF_REQUIREMENTS[variant]})
            tf_requirement = ""
        image_id = _build(client, context, "docker/Dockerfile", tag,
                          {"BASE_IMAGE": base, "TF_REQUIREMENT": tf_requirement,
                           "FETCH_IMAGENET": "1" if fetch_imagenet else "0"})
    image = client.images.get(image_id)
    if push:
        name, _, version = tag.rpartition(":") if ":" in tag.rsplit("/", 1)[-1] else (tag, "", "latest")
        log.info("docker push %s", tag)
        digest_ref = digest_from_push(client.api.push(name, tag=version, stream=True, decode=True), tag)
    else:
        digest_ref = known_digest(image.attrs, tag)
    return BuildResult(tag, base, image_id, int(image.attrs.get("Size", 0)), digest_ref)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        Path(dst).hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)
