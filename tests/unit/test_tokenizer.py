"""WordPiece fitting: deterministic vocab in the BertTokenizerFast layout; loads back offline, also plain BERT dirs."""
from __future__ import annotations

import pytest

from flava.data.tokenizer import fit_wordpiece, load_tokenizer

TEXTS = [f"a {c} {s} is {p} the {c2} {s2}." for c in ("red", "green", "blue") for s in ("circle", "square")
         for p in ("left of", "above", "below") for c2 in ("yellow", "purple") for s2 in ("triangle", "star")]


def test_fit_save_load_roundtrip(tmp_path):
    tok = fit_wordpiece(TEXTS, 120, tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    assert (tmp_path / "tok" / "tokenizer_config.json").is_file()
    assert tok.pad_token_id == 0 and tok.mask_token_id is not None
    enc = tok("A red circle is left of the blue star.")
    assert enc["input_ids"][0] == tok.cls_token_id and enc["input_ids"][-1] == tok.sep_token_id
    assert tok.unk_token_id not in enc["input_ids"]
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == "a red circle is left of the blue star."
    again = load_tokenizer(tmp_path / "tok")
    assert again("blue square")["input_ids"] == tok("blue square")["input_ids"]
    assert len(tok) <= 120


def test_fit_is_deterministic(tmp_path):
    fit_wordpiece(TEXTS, 100, tmp_path / "a")
    fit_wordpiece(TEXTS, 100, tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_loads_a_bert_vocab_txt_directory(tmp_path):
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "circle", "blue"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab=str(tmp_path / "vocab.txt")).save_pretrained(str(tmp_path / "bert"))
    tok = load_tokenizer(tmp_path / "bert")
    assert tok("red circle")["input_ids"] == [2, 5, 6, 3]


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="no non-empty texts"):
        fit_wordpiece(["", "  "], 100, tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a saved tokenizer"):
        load_tokenizer(tmp_path / "empty")


def test_learn_vocab_merges_most_frequent_pair_with_lexicographic_ties():
    from flava.data.tokenizer import learn_wordpiece_vocab

    vocab = learn_wordpiece_vocab({"ab": 3, "cd": 3, "abc": 1}, 100, reserved=["[UNK]"])
    assert vocab[:6] == ["[UNK]", "##b", "##c", "##d", "a", "c"]
    # (a, ##b) occurs 4 times, (c, ##d) 3 times, (ab, ##c) once: merged in that order.
    assert vocab[6:] == ["ab", "cd", "abc"]
    assert learn_wordpiece_vocab({"ab": 3, "cd": 3}, 100, min_frequency=4) == ["##b", "##d", "a", "c"]
    assert len(learn_wordpiece_vocab({"abcdef": 5}, 8)) == 8
