"""The IR each Kubeflow Pipelines backend release gets parses with that release's published protos.

Issue 25, point 2: a backend's Argo compiler unmarshals every executor's Kubernetes config strictly and
refuses the run on a field it does not know (2.14: `SecretAsEnv.optional`; 2.14 and 2.15:
`securityContext`). `--kfp-version` emits only what the release parses and says what it leaves out.
The protos are the releases' kfp-kubernetes and kfp-pipeline-spec wheels (tests/kfp_backend_protos.lock,
downloaded by `make setup`), each parsed in its own process (helpers/strict_ir_parse.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import captioning_cli

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / ".venv" / "kfp-backend-protos"
LOCK = Path(__file__).parent / "kfp_backend_protos.lock"


def release_of(minor: str) -> str:
    """The patch release the lock pins for a backend minor version (the same for both wheels)."""
    (version,) = {line.split("==")[1].split()[0] for line in LOCK.read_text().splitlines()
                  if line.startswith("kfp-") and line.split("==")[1].startswith(minor + ".")}
    return version


def strict_parse(minor: str, ir: Path) -> dict:
    version = release_of(minor)
    wheels = [PROTOS / f"kfp_{name}-{version}-py3-none-any.whl" for name in ("pipeline_spec", "kubernetes")]
    missing = [str(w) for w in wheels if not w.is_file()]
    assert not missing, f"{missing}: the backends' protos are downloaded by `make setup`"
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "helpers" / "strict_ir_parse.py"), *map(str, wheels), str(ir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def compiled(tmp_path, **options) -> Path:
    from pipeline import BuildOptions, compile_pipeline

    name = "-".join(f"{k}={v}" for k, v in options.items())
    return compile_pipeline(tmp_path / f"{name}.yaml", BuildOptions(image="registry.example/c:1", **options))


def kubernetes_executors(ir: Path) -> dict:
    return list(yaml.safe_load_all(ir.read_text()))[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_the_lock_covers_every_backend_the_option_offers():
    from pipeline import KFP_BACKENDS, BuildOptions

    assert {release_of(minor)[:4] for minor in KFP_BACKENDS} == set(KFP_BACKENDS)
    assert BuildOptions().kfp_version == max(KFP_BACKENDS)  # the pinned SDK's release


@pytest.mark.parametrize("pipeline", ["train", "caption"])
@pytest.mark.parametrize("minor", ["2.14", "2.15", "2.16", "2.17"])
def test_every_backend_parses_the_ir_compiled_for_it(tmp_path, minor, pipeline):
    ir = compiled(tmp_path, kfp_version=minor, pipeline=pipeline)
    result = strict_parse(minor, ir)
    assert result["pipeline_spec"] == "ok"
    assert len(result["executors"]) == 6  # train: five steps and check_volumes; caption: six steps
    assert set(result["executors"].values()) == {"ok"}, result


def test_the_checker_refuses_what_an_older_backend_does_not_know(tmp_path):
    """The default IR (for the pinned 2.17) is refused by 2.14 and 2.15, naming the field, as their compilers do."""
    ir = compiled(tmp_path)
    old = strict_parse("2.14", ir)["executors"]
    assert len(old) == 6 and all('no field named "optional"' in why for why in old.values()), old
    middle = strict_parse("2.15", ir)["executors"]
    assert all('no field named "securityContext"' in why for why in middle.values()), middle


def test_what_each_release_gets_and_loses(tmp_path):
    # promote.deploy hands the server the artifact store this release's launcher uses for minio:// URIs
    stores = {"2.14": "minio-service", "2.15": "minio-service", "2.16": "seaweedfs", "2.17": "seaweedfs"}
    for minor, store in stores.items():
        ir = next(yaml.safe_load_all(compiled(tmp_path, kfp_version=minor).read_text()))
        promote_env = ir["deploymentSpec"]["executors"]["exec-promote"]["container"]["env"]
        assert {"name": "CAPTIONING_KFP_STORE", "value": f"http://{store}.kubeflow:9000"} in promote_env
    for minor, optional, context in (("2.14", None, False), ("2.15", True, False), ("2.16", True, True)):
        ir = compiled(tmp_path, kfp_version=minor)
        for name, config in kubernetes_executors(ir).items():
            (secret,) = config["secretAsEnv"]
            assert secret.get("optional") is optional and secret["secretName"] == "wandb", (minor, name)
            assert ("securityContext" in config) is context, (minor, name)
            assert config["fieldPathAsEnv"], (minor, name)  # the run id still reaches the pod
    # Turning the security context off still works on a release that knows it.
    assert not any("securityContext" in c for c in kubernetes_executors(
        compiled(tmp_path, kfp_version="2.17", security_context=False)).values())


def test_compile_says_what_it_left_out_and_refuses_an_unknown_release(tmp_path):
    proc = captioning_cli("compile", "--kfp-version", "2.14", "--output", str(tmp_path / "p.yaml"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "KFP 2.14: the Secret 'wandb' is attached as required" in proc.stderr
    assert "KFP 2.14: no securityContext" in proc.stderr
    quiet = captioning_cli("compile", "--kfp-version", "2.16", "--output", str(tmp_path / "q.yaml"), cwd=tmp_path)
    assert quiet.returncode == 0 and "KFP 2.16" not in quiet.stderr
    bad = captioning_cli("compile", "--kfp-version", "2.13", "--output", str(tmp_path / "r.yaml"), cwd=tmp_path)
    assert bad.returncode == 2 and "--kfp-version '2.13'" in bad.stderr and "2.14, 2.15, 2.16, 2.17" in bad.stderr
