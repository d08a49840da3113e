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


def test_score_equals_coco_caption_on_coco_format_files(tmp_path, monkeypatch):
    """Our score() against pycocoevalcap's own COCOEvalCap on COCO-format files read by pycocotools: raw
    references, PTB-tokenized on both sides. SPICE is left out (it downloads CoreNLP): stubbed, at the edge."""
    import json
    import random

    from pycocoevalcap import eval as coco_eval
    from pycocotools.coco import COCO

    from captioning.metrics import score

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, []

        def method(self):
            return "SPICE"

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    rng = random.Random(7)
    words = "a man dog cat red blue on the of with sitting standing bed table two small large".split()
    raw = ["A man's T-shirt, on the bed.", "Two dogs -- playing!", "A RED cat; sitting on a table...",
           "Café au lait (with foam)?", "a small   dog with a blue ball"]
    references = {i: [rng.choice(raw) + " " + " ".join(rng.choices(words, k=rng.randint(0, 5)))
                      for _ in range(rng.randint(1, 5))] for i in range(1, 13)}
    predictions = {i: " ".join(rng.choices(words, k=rng.randint(3, 9))) for i in references}
    predictions[5] = references[5][0].lower()  # one perfect caption

    gts = {"info": {}, "licenses": [], "type": "captions",
           "images": [{"id": i} for i in references],
           "annotations": [{"image_id": i, "id": n, "caption": c}
                           for n, (i, c) in enumerate(((i, c) for i, cs in references.items() for c in cs), 1)]}
    (tmp_path / "gts.json").write_text(json.dumps(gts))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": i, "caption": c} for i, c in predictions.items()]))
    coco = COCO(str(tmp_path / "gts.json"))
    evaluation = coco_eval.COCOEvalCap(coco, coco.loadRes(str(tmp_path / "res.json")))
    evaluation.evaluate()

    ours, _ = score(references, predictions)
    names = {"BLEU-1": "Bleu_1", "BLEU-2": "Bleu_2", "BLEU-3": "Bleu_3", "BLEU-4": "Bleu_4",
             "METEOR": "METEOR", "ROUGE-L": "ROUGE_L", "CIDEr": "CIDEr"}
    for ours_name, theirs in names.items():
        assert ours[ours_name] == pytest.approx(evaluation.eval[theirs], abs=1e-9), ours_name
    assert 0 < ours["CIDEr"] and ours["BLEU-1"] > ours["BLEU-4"]


@pytest.mark.parametrize("breaker", ["\r", "\u2028", "\u2029", "\x0b", "\x0c", "\x85", "\r\n"])
def test_a_line_break_inside_a_reference_shifts_no_score(breaker):
    """Issue 27, case 1: Java's tokenizer ends lines at these too; one such reference used to move every later
    reference onto the wrong image (BLEU-1 0.155 -> 0.017, exit 0). The scores must equal those of the same
    text with a space."""
    from captioning.metrics import score, tokenize

    refs = {1: [f"a red square{breaker}on the left", "a red square"], 2: ["a blue circle", "a blue ring"],
            3: ["a green triangle", "green triangle on top"]}
    plain = {k: [c.replace(breaker, " ") for c in v] for k, v in refs.items()}
    assert tokenize(refs) == tokenize(plain)
    if breaker == "\r":  # the whole scoring once (METEOR's Java is slow to start)
        predictions = {1: "a red square", 2: "a blue circle", 3: "a green triangle"}
        assert score(refs, predictions) == score(plain, predictions)


def test_text_that_cannot_be_encoded_is_replaced_not_a_crash():
    """Issue 27, case 2: a lone surrogate ("\\ud800", legal JSON) is replaced, and the caption keeps its line."""
    from captioning.metrics import tokenize

    assert tokenize({1: ["a dog \ud800 runs"], 2: ["a cat"]}) == {1: ["a dog runs"], 2: ["a cat"]}  # U+FFFD dropped


def test_a_tokenizer_that_returns_another_number_of_lines_fails_naming_the_image(monkeypatch):
    """The guard behind the normalisation: a shifted output is an error, never scores."""
    import subprocess as sp

    from captioning.errors import CaptioningError
    from captioning.metrics import tokenize

    real = sp.run

    def shifting(cmd, **kwargs):  # the caption holding "BREAK" comes back as two lines, as a missed break would
        proc = real(cmd, **kwargs)
        proc.stdout = proc.stdout.replace(b"break", b"\nbreak")
        return proc

    monkeypatch.setattr(sp, "run", shifting)
    with pytest.raises(CaptioningError, match=r"PTB tokenizer: 4 lines back for 3 captions; a caption of image 9 "
                                              r"does not stay one line"):
        tokenize({4: ["a cat", "a dog"], 9: ["a BREAK bird"]})


def test_meteor_fails_cleanly_and_in_time_instead_of_hanging():
    """Issue 27, case 3: with nothing to score METEOR answers "Error: specify Meteor stats", pycocoevalcap's
    compute_score raises holding its lock, and Meteor.__del__ then waited on it for ever (evaluate hung, holding
    the work-dir lock). Run in a child process so a hang fails the test instead of stalling it."""
    code = ("import gc\n"
            "from captioning.errors import CaptioningError\n"
            "from captioning.metrics import meteor_score, score\n"
            "for call in (lambda: score({}, {}), lambda: meteor_score({}, {}, timeout_s=60)):\n"
            "    try:\n"
            "        call()\n"
            "    except CaptioningError as exc:\n"
            "        print('refused:', exc)\n"
            "gc.collect()\n"
            "print('done')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "refused: no caption to score: the split holds no image that could be captioned"
    assert lines[1].startswith("refused: METEOR failed:") and lines[-1] == "done", proc.stdout


def test_meteor_that_does_not_answer_is_stopped_at_its_time_limit(monkeypatch):
    import time

    from pycocoevalcap.meteor.meteor import Meteor

    from captioning.errors import CaptioningError
    from captioning.metrics import meteor_score

    def stuck(self, gts, res):
        self.lock.acquire()
        time.sleep(30)

    monkeypatch.setattr(Meteor, "compute_score", stuck)
    started = time.monotonic()
    with pytest.raises(CaptioningError, match="METEOR did not answer within 1 s; stopped"):
        meteor_score({1: ["a cat"]}, {1: ["a cat"]}, timeout_s=1)
    assert time.monotonic() - started < 10
