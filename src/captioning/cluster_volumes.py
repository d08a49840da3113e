"""Kubeflow: is the checkpoint volume already held by another run's pod?

The volume is ReadWriteOnce: while one run's train mounts it on a node, a second run's train on
another node waits in Pending (Multi-Attach) and says nothing in the pipeline. An uncached task
before train (pipeline.py: check_volumes) lists the namespace's pods and fails, naming the pod, its
run and its node, when another run's pod mounts the claim. Two runs that start within the same
minute can both pass; the check is for the usual case, a run started while another trains.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from captioning.errors import DataError

log = logging.getLogger(__name__)
RUN_LABEL = "pipeline/runid"  # the label KFP gives every pod of a run (pipeline.RUN_ID_LABEL)
ACTIVE_PHASES = ("Pending", "Running")


def volume_users(pods: list[dict], claim: str, own_run: str) -> list[dict]:
    """The pods (of other runs, or of no run) that mount ``claim`` and are not finished."""
    users = []
    for pod in pods:
        phase = pod.get("status", {}).get("phase")
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod.get("spec", {}).get("volumes", []) or []
                  if v.get("persistentVolumeClaim")}
        run = (pod.get("metadata", {}).get("labels") or {}).get(RUN_LABEL, "")
        if phase in ACTIVE_PHASES and claim in claims and not (own_run and run == own_run):
            users.append({"pod": pod["metadata"]["name"], "run": run, "phase": phase,
                          "node": pod.get("spec", {}).get("nodeName") or "not scheduled yet"})
    return users


def check_volume_free(claim: str, own_run: str, pods: list[dict], namespace: str) -> None:
    users = volume_users(pods, claim, own_run)
    if users:
        held = "; ".join(f"pod {u['pod']} ({'run ' + u['run'] if u['run'] else 'no pipeline run'}, {u['phase']}, "
                         f"node {u['node']})" for u in users)
        raise DataError(f"the checkpoint volume {claim} (ReadWriteOnce) in namespace {namespace} is mounted by {held}: "
                        "this run's train would wait for it in Pending on another node. Wait for that run, or "
                        "compile with another --checkpoint-pvc (or a gs:// checkpoint_dir)")
    log.info("check_volumes: %s is not mounted by another run's pod", claim)


def list_pods_in_cluster(namespace: str) -> list[dict]:
    """The namespace's pods as the API returns them (camelCase), with the pod's own service account."""
    from kubernetes import client, config

    config.load_incluster_config()
    response = client.CoreV1Api().list_namespaced_pod(namespace, _preload_content=False)
    return json.loads(response.data)["items"]


def check_in_cluster(claim: str) -> None:
    """In a pipeline pod: its namespace and run from the pod's environment (pipeline.py passes the run id)."""
    from captioning.submit.kubeflow import POD_NAMESPACE_FILE
    from captioning.tracking import KFP_RUN_ID_ENV

    namespace = Path(POD_NAMESPACE_FILE).read_text().strip()
    try:
        pods = list_pods_in_cluster(namespace)
    except Exception as exc:  # noqa: BLE001 - RBAC or API trouble: the check is advice, not a gate
        log.warning("check_volumes: could not list the pods of %s (%s); %s not checked", namespace, exc, claim)
        return
    check_volume_free(claim, os.environ.get(KFP_RUN_ID_ENV, ""), pods, namespace)
