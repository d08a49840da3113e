"""COCO caption metrics with pycocoevalcap's scorers and its PTB tokenizer (Java).

``COCOEvalCap.evaluate()`` is not used: it always builds SPICE, which downloads
Stanford CoreNLP and fails offline. The scorers are called directly instead.
CIDEr here is coco-caption's CIDEr-D.
"""

from __future__ import annotations

import shutil
from collections import Counter

from captioning.errors import CaptioningError

METRIC_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def _require_java() -> None:
    if shutil.which("java") is None:
        raise CaptioningError("evaluate: Java is needed for the PTB tokenizer and METEOR; install a JRE "
                              "(e.g. apt-get install default-jre-headless)")


def one_line(text: str) -> str:
    """A caption the tokenizer reads as exactly one line: every control character and Unicode line or paragraph
    separator (Java's tokenizer also ends lines at \\r, VT, FF, U+0085, U+2028, U+2029) becomes a space, and
    text that cannot be encoded (a lone surrogate) becomes U+FFFD."""
    import unicodedata

    out = []
    for ch in text:
        kind = unicodedata.category(ch)
        out.append(" " if kind in ("Cc", "Zl", "Zp") else "\ufffd" if kind == "Cs" else ch)
    return "".join(out)


def _ptb_lines(sentences: list[str]) -> list[str]:
    """The Java PTB tokenizer's output lines for these one-line sentences (a time limit, a clean error)."""
    import os
    import subprocess
    import tempfile

    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    jar = os.path.join(os.path.dirname(os.path.abspath(ptb.__file__)), ptb.STANFORD_CORENLP_3_4_1_JAR)
    with tempfile.TemporaryDirectory(prefix="ptb-") as tmp:
        source = os.path.join(tmp, "sentences.txt")
        with open(source, "w", encoding="utf-8") as fh:
            fh.write("\n".join(sentences))
        try:
            proc = subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                                   "-lowerCase", source], cwd=tmp, capture_output=True, check=False,
                                  timeout=SCORER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise CaptioningError(f"PTB tokenizer did not finish within {SCORER_TIMEOUT_S:g} s "
                                  f"({len(sentences)} captions)") from None
    if proc.returncode != 0:
        raise CaptioningError(f"PTB tokenizer ({jar}) failed: {proc.stderr.decode(errors='replace')[-500:]}")
    return proc.stdout.decode("utf-8", errors="replace").split("\n")  # one per caption, none after the last


def tokenize(captions: dict[int, list[str]]) -> dict[int, list[str]]:
    """pycocoevalcap's PTB tokenization (the same Java command and the same punctuation removal as
    ``PTBTokenizer.tokenize``), with its temporary file in the temp folder: pycocoevalcap writes it
    beside its jar in site-packages, which the image's own user cannot write to."""
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    _require_java()
    keys = [k for k, v in captions.items() for _ in v]
    sentences = [one_line(c) for v in captions.values() for c in v]
    lines = _ptb_lines(sentences)
    if len(lines) != len(keys):  # a shifted line would score every later caption against another image's
        image = _shifting_image(keys, sentences)
        raise CaptioningError(f"PTB tokenizer: {len(lines)} lines back for {len(keys)} captions; a caption of "
                              f"image {image} does not stay one line; no score is computed from shifted lines")
    tokenized: dict[int, list[str]] = {}
    for key, line in zip(keys, lines):
        words = [w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS]
        tokenized.setdefault(key, []).append(" ".join(words))
    return tokenized


def _shifting_image(keys: list, sentences: list[str]):
    """The image whose caption the tokenizer did not keep on one line, by halving (a few runs, only on failure)."""
    while len(keys) > 1:
        half = len(keys) // 2
        if len(_ptb_lines(sentences[:half])) != half:
            keys, sentences = keys[:half], sentences[:half]
        else:
            keys, sentences = keys[half:], sentences[half:]
    return keys[0] if keys else "?"


def score(references: dict[int, list[str]], predictions: dict[int, str]) -> tuple[dict[str, float], dict[str, dict[int, float]]]:
    """Corpus metrics and per-image BLEU-4 / CIDEr for predictions against all references."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    ids = sorted(predictions)
    if not ids:  # METEOR answers nothing to nothing (and pycocoevalcap then waits forever)
        raise CaptioningError("no caption to score: the split holds no image that could be captioned")
    gts = tokenize({i: references[i] for i in ids})
    res = tokenize({i: [predictions[i]] for i in ids})
    metrics: dict[str, float] = {}
    per_image: dict[str, dict[int, float]] = {}
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        metrics[f"BLEU-{n + 1}"] = float(bleu[n])
    per_image["BLEU-4"] = dict(zip(ids, map(float, bleu_each[3])))
    metrics["METEOR"] = meteor_score(gts, res)
    metrics["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    cider, cider_each = Cider().compute_score(gts, res)
    metrics["CIDEr"] = float(cider)
    per_image["CIDEr"] = dict(zip(ids, map(float, cider_each)))
    return metrics, per_image


# The Java scorers' time limit: COCO's 5,000 test images take about two minutes.
SCORER_TIMEOUT_S = 1800.0


def meteor_score(gts: dict, res: dict, timeout_s: float = SCORER_TIMEOUT_S) -> float:
    """pycocoevalcap's METEOR with a time limit and a clean error. Its ``compute_score`` holds a lock when it
    raises, and the object's ``__del__`` then waits on that lock for ever; here the Java process is stopped and
    the lock freed on every path."""
    import threading

    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()  # a Java subprocess
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["score"] = float(meteor.compute_score(gts, res)[0])
        except Exception as exc:  # noqa: BLE001 - reported below with what Java said
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="meteor", daemon=True)
    worker.start()
    worker.join(timeout_s)
    try:
        if worker.is_alive():
            raise CaptioningError(f"METEOR did not answer within {timeout_s:g} s; stopped")
        if "error" in outcome:
            meteor.meteor_p.kill()
            said = meteor.meteor_p.stderr.read().decode(errors="replace").strip()[-300:]
            raise CaptioningError(f"METEOR failed: {type(outcome['error']).__name__}: {outcome['error']}"
                                  + (f" (Java: {said})" if said else ""))
        return outcome["score"]
    finally:
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
        if meteor.lock.locked():  # left held by a compute_score that raised: __del__ would wait on it
            meteor.lock.release()


def metric_on(references_tok: dict[int, list[str]], predictions: dict[int, str], name: str) -> float:
    """One corpus metric (CIDEr or BLEU-n) of raw predictions against already tokenized references."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    ids = sorted(predictions)
    gts, res = {i: references_tok[i] for i in ids}, tokenize({i: [predictions[i]] for i in ids})
    if name == "CIDEr":
        return float(Cider().compute_score(gts, res)[0])
    if name.startswith("BLEU-") and name[5:] in ("1", "2", "3", "4"):
        return float(Bleu(4).compute_score(gts, res, verbose=0)[0][int(name[5:]) - 1])
    raise ValueError(f"{name}: not a metric computed on validation (CIDEr or BLEU-1..4)")


def cider_only(references_tok: dict[int, list[str]], caption_tok: str) -> float:
    from pycocoevalcap.cider.cider import Cider

    return float(Cider().compute_score(references_tok, {i: [caption_tok] for i in references_tok})[0])


def choose_blind_caption(train_captions: list[str], val_refs: dict[int, list[str]],
                         candidates: int = 20) -> tuple[str, float]:
    """The best single constant caption, chosen on validation among the most common training
    captions, with its validation CIDEr. A model that ignores the image scores about this."""
    common = [c for c, _ in Counter(train_captions).most_common(candidates)]
    if not common or not val_refs:
        return "", 0.0
    tokenized = tokenize({k: [c] for k, c in enumerate(common)})
    val_tok = tokenize(val_refs)
    scores = [cider_only(val_tok, tokenized[k][0]) for k in range(len(common))]
    best = max(range(len(common)), key=scores.__getitem__)
    return common[best], scores[best]


def caption_cider(references: dict[int, list[str]], caption: str) -> float:
    """CIDEr-D of one caption given for every image."""
    if not caption or not references:
        return 0.0
    return cider_only(tokenize(references), tokenize({0: [caption]})[0][0])
