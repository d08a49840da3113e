"""The runners: every step in this process (``inprocess``), or the compiled pipeline in containers (``kfp_local``).

Both run the same step functions (``captioning.workflow``); Kubeflow and Vertex AI
run them through the components in ``components/``.
"""
