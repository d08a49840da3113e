"""Kubeflow: are the pipeline's volumes already held by another run's pods?

Both are ReadWriteOnce: while one run's process_data holds the raw cache, or its train the
checkpoints, on a node, a second run's pod on another node waits in Pending (Multi-Attach) and
says nothing in the pipeline. An uncached task after log_raw_data (pipeline.py: check_volumes)
lists the namespace's pods and fails, naming the pod, its run and its node, when another run's pod
mounts one of the claims. Two runs that reach it within the same minute can both pass; a run that
reaches it while another is still between its own check and its train can too.
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


def check_volumes_free(claims: list[str], own_run: str, pods: list[dict], namespace: str) -> None:
    held = []
    for claim in claims:
        users = volume_users(pods, claim, own_run)
        if users:
            held.append(f"{claim} by " + "; ".join(
                f"pod {u['pod']} ({'run ' + u['run'] if u['run'] else 'no pipeline run'}, {u['phase']}, "
                f"node {u['node']})" for u in users))
    if held:
        raise DataError(f"ReadWriteOnce volumes in namespace {namespace} are mounted by another run: {' and '.join(held)}. "
                        "This run's process_data (the raw cache) and train (the checkpoints) would wait for them in "
                        "Pending on another node. Wait for that run, or compile with other --raw-cache-pvc / "
                        "--checkpoint-pvc names")
    log.info("check_volumes: %s not mounted by another run's pod", ", ".join(claims))


def list_pods_in_cluster(namespace: str) -> list[dict]:
    """The namespace's pods as the API returns them (camelCase), with the pod's own service account."""
    from kubernetes import client, config

    config.load_incluster_config()
    response = client.CoreV1Api().list_namespaced_pod(namespace, _preload_content=False)
    return json.loads(response.data)["items"]


def check_in_cluster(claims: list[str]) -> None:
    """In a pipeline pod: its namespace and run from the pod's environment (pipeline.py passes the run id)."""
    from captioning.submit.kubeflow import POD_NAMESPACE_FILE
    from captioning.tracking import KFP_RUN_ID_ENV

    try:
        namespace = Path(POD_NAMESPACE_FILE).read_text().strip()
    except OSError as exc:  # no service account token mounted: nothing to ask the API with
        log.warning("check_volumes: not in a pod with a service account (%s); %s not checked", exc, ", ".join(claims))
        return
    try:
        pods = list_pods_in_cluster(namespace)
    except Exception as exc:  # noqa: BLE001 - RBAC or API trouble: the check is advice, not a gate
        log.warning("check_volumes: could not list the pods of %s (%s); %s not checked", namespace, exc,
                    ", ".join(claims))
        return
    check_volumes_free(claims, os.environ.get(KFP_RUN_ID_ENV, ""), pods, namespace)
