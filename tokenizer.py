"""Tokenizers: a sentencepiece model such as LLaMA's tokenizer.model, and training a tiny one for the demo."""
import os
import tempfile

import sentencepiece as spm


class Tokenizer:
    """A sentencepiece model, e.g. LLaMA's tokenizer.model (32,000 pieces, bos=1, eos=2, no pad).

    Padding strategy: LLaMA has no pad piece, so pad_id is the model's own pad id when it has one and otherwise
    its <unk> id (0 for LLaMA). Batches are padded on the right and pads always get label -100, so a pad is never
    a target and, the model being causal, no real token ever attends to one.
    """

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path} "
                                    "(expected a sentencepiece .model file such as LLaMA's tokenizer.model)")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{model_path} is not a sentencepiece model ({e}); "
                             "pass LLaMA's tokenizer.model or one made by train_tokenizer()") from None
        self.n_words = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{model_path} defines no BOS or EOS piece; both are needed")

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))


def train_tokenizer(texts: list[str], model_prefix: str, vocab_size: int) -> str:
    """Train a small BPE sentencepiece model laid out like LLaMA's (unk=0, bos=1, eos=2, no pad, digits split,
    byte fallback so any text encodes). Writes `<model_prefix>.model` atomically and returns its path.
    Byte fallback needs vocab_size >= 259 + the number of distinct characters in `texts`."""
    path = model_prefix + ".model"
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts), model_prefix=os.path.join(tmp, "spm"), vocab_size=vocab_size,
                model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
                unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
                remove_extra_whitespaces=False, hard_vocab_limit=False, minloglevel=2)
        except RuntimeError as e:
            raise ValueError(f"sentencepiece could not train {path} with vocab_size={vocab_size}: {e}") from None
        os.replace(os.path.join(tmp, "spm.model"), path)
    return path
