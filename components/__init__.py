"""One containerized KFP component per pipeline step.

Each component is thin: typed KFP artifacts and parameters in and out, the
work done by the ``captioning`` library inside the project's image. Each file
holds one component, because ``kfp.dsl.executor_main`` finds a step's function
through ``kfp_config.ini``; ``factory.py`` writes them all from the steps'
declarations in ``captioning.workflow``. Heavy imports happen inside the
containers, never at compile time.
"""
