"""One containerized KFP component per pipeline step.

Each component is thin: typed KFP artifacts and parameters in and out, the
work done by the ``captioning`` library inside the project's image. Heavy
imports happen inside the functions, never at compile time.
"""
