"""Parse a compiled IR with one KFP backend release's published protos, refusing unknown fields.

    python strict_ir_parse.py PIPELINE_SPEC_WHEEL KUBERNETES_WHEEL IR.yaml  -> JSON {"pipeline_spec": "ok"|error,
                                                                               "executors": {name: "ok"|error}}

One process per release: the releases' descriptors share names and cannot live in one descriptor pool.
The backend's Argo compiler unmarshals each executor's Kubernetes config this strictly
(backend/src/v2/compiler/argocompiler/container.go, protojson.Unmarshal).
"""

import json
import sys
import types
import zipfile

import yaml
from google.protobuf import json_format


def load(wheel: str, member: str, module: str) -> types.ModuleType:
    """The wheel's generated module, registered under its import name (the Kubernetes proto imports the spec's)."""
    mod = types.ModuleType(module)
    source = zipfile.ZipFile(wheel).read(member)
    sys.modules[module] = mod
    exec(compile(source, f"{wheel}!{member}", "exec"), mod.__dict__)
    return mod


def parse(message, data) -> str:
    try:
        json_format.ParseDict(data, message, ignore_unknown_fields=False)
        return "ok"
    except json_format.ParseError as exc:
        return str(exc).splitlines()[0]


def main(spec_wheel: str, kubernetes_wheel: str, ir: str) -> None:
    # Bare packages, not the installed kfp: its own protos would take these names in the descriptor pool.
    sys.modules["kfp"], sys.modules["kfp.pipeline_spec"] = types.ModuleType("kfp"), types.ModuleType("kfp.pipeline_spec")
    spec = load(spec_wheel, "kfp/pipeline_spec/pipeline_spec_pb2.py", "kfp.pipeline_spec.pipeline_spec_pb2")
    sys.modules["kfp.pipeline_spec"].pipeline_spec_pb2 = spec
    kubernetes = load(kubernetes_wheel, "kfp/kubernetes/kubernetes_executor_config_pb2.py",
                      "kfp_kubernetes_release_pb2")
    docs = list(yaml.safe_load_all(open(ir)))
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    print(json.dumps({"pipeline_spec": parse(spec.PipelineSpec(), docs[0]),
                      "executors": {name: parse(kubernetes.KubernetesExecutorConfig(), config)
                                    for name, config in executors.items()}}))


if __name__ == "__main__":
    main(*sys.argv[1:])
