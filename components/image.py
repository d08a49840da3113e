"""The image every component runs in; set CAPTIONING_IMAGE before importing the components."""

import os

IMAGE = os.environ.get("CAPTIONING_IMAGE", "captioning:0.1.0")
