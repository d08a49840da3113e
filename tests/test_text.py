from captioning.text import END, PAD, START, UNK, Vocabulary, clean_caption, length_at_percentile


def test_cleaning_strips_case_punctuation_and_normalises_unicode():
    assert clean_caption("A man riding a Surfboard.") == "a man riding a surfboard"
    assert clean_caption("a man, riding   a surfboard!!") == "a man riding a surfboard"
    assert clean_caption("A red circle — on the “left” side…") == "a red circle on the left side"
    assert clean_caption("ＡＮ image: a_b") == "an image a b"  # full-width letters fold; _ is punctuation
    assert clean_caption("Un café à Paris") == "un café à paris"  # letters with accents stay
    assert clean_caption("  \t ") == ""


def test_vocabulary_threshold_cap_and_specials():
    captions = [["a", "red", "circle"]] * 3 + [["a", "blue", "square"]] * 2 + [["a", "rare", "word"]]
    vocab = Vocabulary.build(captions, min_count=2, max_size=7)
    assert vocab.tokens[:4] == [PAD, START, END, UNK]
    assert vocab.pad_id == 0
    assert vocab.tokens[4:] == ["a", "circle", "red"]  # by frequency, then alphabetically; capped at 7
    ids = vocab.encode(["a", "blue", "circle"], max_length=10)
    assert ids == [vocab.start_id, vocab.index["a"], vocab.unk_id, vocab.index["circle"], vocab.end_id]
    assert vocab.decode(ids + [vocab.index["a"]]) == f"a {UNK} circle"


def test_encode_truncates_but_keeps_end(tmp_path):
    vocab = Vocabulary.build([["w%d" % i for i in range(10)]], 1, 100)
    ids = vocab.encode(["w%d" % i for i in range(10)], max_length=5)
    assert len(ids) == 5 and ids[0] == vocab.start_id and ids[-1] == vocab.end_id
    vocab.save(tmp_path / "v.json")
    assert Vocabulary.load(tmp_path / "v.json").tokens == vocab.tokens


def test_length_percentile():
    lengths = [10] * 98 + [40, 50]
    assert length_at_percentile(lengths, 95) == 10
    assert length_at_percentile(lengths, 100) == 50


def test_step_words_label_each_decoding_step_up_to_end():
    from captioning.text import Vocabulary

    vocab = Vocabulary.build([["a", "red", "cat"]], min_count=1, max_size=10)
    ids = [vocab.index["a"], vocab.unk_id, vocab.index["cat"], vocab.end_id, 0, 0]
    assert vocab.step_words(ids) == ["a", "<unk>", "cat", "<end>"]  # aligned with the attention steps
    assert vocab.decode(ids) == "a <unk> cat"
    assert vocab.step_words(ids[:3]) == ["a", "<unk>", "cat"]  # no <end> reached: none invented
