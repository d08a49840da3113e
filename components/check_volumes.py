"""Kubeflow: fail early, naming the holder, when another run's pod mounts the checkpoint volume."""

from kfp import dsl

from captioning import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, target_image=DEFAULT_IMAGE)
def check_volumes(checkpoint_pvc: str):
    """Uncached, before train: a ReadWriteOnce volume held by another run would leave train Pending silently."""
    from captioning.cluster_volumes import check_in_cluster
    from components.batch_pod import run_or_exit

    run_or_exit("check_volumes", lambda: check_in_cluster(checkpoint_pvc))
