import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
REALDATA = os.path.join(ROOT, "..", "shared", "realdata")

import data  # noqa: E402  (after the path is set)
from tokenizer import open_tokenizer, train_tokenizer  # noqa: E402

REAL_TOKENIZER = os.path.join(REALDATA, "llama_tokenizer.model")
REAL_SUPERGLUE = os.path.join(REALDATA, "superglue")
ENGLISH = ["The sky is blue on a clear day and the grass is green.", "Is that correct? Yes or No?",
           "Does this mean that the man turned on the faucet? Question: What is the answer?"]


@pytest.fixture(scope="session")
def tok_path(tmp_path_factory):
    """A tiny LLaMA-like sentencepiece tokenizer.model (byte fallback: any text encodes)."""
    texts = data.synthetic_texts(300, 0) + ENGLISH * 20
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("spm") / "tiny"), 400)


@pytest.fixture(scope="session")
def tok(tok_path):
    return open_tokenizer(tok_path)


@pytest.fixture(scope="session")
def real_tok():
    if not os.path.isfile(REAL_TOKENIZER):
        pytest.skip("../shared/realdata/llama_tokenizer.model is absent")
    return open_tokenizer(REAL_TOKENIZER)


@pytest.fixture(scope="session")
def real_superglue():
    if not os.path.isdir(REAL_SUPERGLUE):
        pytest.skip("../shared/realdata/superglue is absent")
    return REAL_SUPERGLUE


def answer_part(tok, ids, labels):
    """Text of the unmasked tokens before the final EOS."""
    assert labels[-1] == ids[-1] == tok.eos_id
    return tok.decode([i for i, lab in zip(ids[:-1], labels[:-1]) if lab != data.IGNORE_INDEX])
