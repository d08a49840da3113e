"""``captioning submit``: the compiled pipeline to a Kubeflow cluster or to Vertex AI Pipelines.

``package`` reads and checks a compiled package, ``parameters`` turns validated
settings into runtime parameters, and ``kubeflow`` / ``vertex`` talk to each
backend through its own SDK (``kfp.Client``, ``aiplatform.PipelineJob``).
"""
