"""Kubeflow: fail early, naming the holder, when another run's pods mount the pipeline's volumes."""

from typing import List

from kfp import dsl

from captioning import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, target_image=DEFAULT_IMAGE)
def check_volumes(claims: List[str]):
    """Uncached, after log_raw_data: a ReadWriteOnce volume held by another run would leave process_data or train
    Pending without a word."""
    from captioning.cluster_volumes import check_in_cluster
    from components.batch_pod import run_or_exit

    run_or_exit("check_volumes", lambda: check_in_cluster(list(claims)))
