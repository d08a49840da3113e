"""Show, Attend and Tell image captioning on MS-COCO, as pipeline steps.

Every step is a plain function with a typed configuration; the CLI, the
in-process runner and the KFP components all call the same functions.
"""

__version__ = "0.1.0"  # the one place: pyproject.toml, the image tag and the components read it

DEFAULT_IMAGE = f"captioning:{__version__}"
