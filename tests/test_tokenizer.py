import pytest

import data
from conftest import answer_part
from tokenizer import Tokenizer


def test_tokenizer_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer(str(tmp_path / "missing.model"))
    bad = tmp_path / "notes.model"
    bad.write_text("not a sentencepiece model")
    with pytest.raises(ValueError, match="notes.model is not a sentencepiece model"):
        Tokenizer(str(bad))


def test_tiny_tokenizer(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0) and 300 <= tok.n_words <= 400
    text = "Is 7 greater than 3? Yes or No?\nAnswer: Yes  é"  # byte fallback encodes the unseen "é"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids[1:-1]) == text


def test_real_tokenizer_answer_merge(real_tok):
    assert (real_tok.n_words, real_tok.bos_id, real_tok.eos_id, real_tok.pad_id) == (32000, 1, 2, 0)
    assert real_tok.encode("Answer: Yes", bos=False, eos=False) == [673, 29901, 3869]
    assert real_tok.encode("Answer: ", bos=False, eos=False) == [673, 29901, 29871]  # the lone "▁"
    ex = data.Example("boolq", 0, "", "Sky -- The sky is blue.", " is the sky blue\nAnswer: ", ["No", "Yes"], 1)
    ids, labels = data.encode_train(real_tok, ex, 64)
    assert ids[-3:] == [29901, 3869, 2] and labels[-2:] == [3869, 2]  # ":", "▁Yes", EOS
    assert labels[:-2] == [data.IGNORE_INDEX] * (len(ids) - 2)
    for (ids, labels), answer in zip(data.encode_candidates(real_tok, ex, 64), ex.candidates):
        assert answer_part(real_tok, ids, labels) == answer
