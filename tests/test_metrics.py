"""The PTB tokenization behind every COCO metric: pycocoevalcap's, without writing into site-packages."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CAPTIONS = {1: ["A man's t-shirt, on the bed.", "Two dogs -- playing!"], 7: ["Café au lait (with foam)?"],
            3: ["a cat ; on a mat ...", "  spaces   inside  "]}

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java (installed by .ci/run)")


def test_tokenize_equals_pycocoevalcaps_ptb_tokenizer():
    from pycocoevalcap.tokenizer import ptbtokenizer
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from captioning.metrics import tokenize

    package = Path(ptbtokenizer.__file__).parent
    before = sorted(os.listdir(package))
    ours = tokenize(CAPTIONS)
    assert sorted(os.listdir(package)) == before  # nothing written beside the jar
    assert ours == PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in CAPTIONS.items()})
    assert ours[1][0] == "a man 's t-shirt on the bed"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root to run a process as another user")
def test_tokenize_works_as_a_user_who_cannot_write_site_packages():
    """A pod runs as the image's user (1000), which cannot write site-packages."""
    code = ("from captioning.metrics import tokenize; print(tokenize({1: ['A red square.']})[1][0])")
    as_user = ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", sys.executable, "-c"]
    env = dict(os.environ, HOME="/tmp")
    proc = subprocess.run([*as_user, code], capture_output=True, text=True, timeout=120, env=env, cwd="/tmp")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "a red square"
    original = ("from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer; "
                "PTBTokenizer().tokenize({1: [{'caption': 'a red square'}]})")
    failed = subprocess.run([*as_user, original], capture_output=True, text=True, timeout=120, env=env, cwd="/tmp")
    assert "PermissionError" in failed.stderr  # what the library itself does as that user
