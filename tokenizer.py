"""Tokenizers: sentencepiece models (LLaMA 1 and 2's tokenizer.model) and Hugging Face tokenizer.json files (the
Llama 3 releases on the hub, most hub models), behind one interface: n_words, bos_id, eos_id, pad_id, encode(text,
bos, eos) and decode(ids). open_tokenizer() takes either file, or the folder that holds one.

Padding: batches are padded on the right and pads always get label -100, so a pad is never a target and, the model
being causal, no real token ever attends to one. The pad id is the tokenizer's own pad token where it has one, and
otherwise a token that is never a target (LLaMA's <unk>, Llama 3's BOS).
"""
import json
import os
import re
import tempfile

import sentencepiece as spm


class SentencePieceTokenizer:
    """A sentencepiece model, e.g. LLaMA's tokenizer.model (32,000 pieces, bos=1, eos=2, no pad: pad is <unk>)."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path} "
                                    "(expected a sentencepiece .model file such as LLaMA's tokenizer.model)")
        if _is_tiktoken(model_path):
            raise ValueError(f"{model_path} is a tiktoken file (Meta's own Llama 3 tokenizer.model), which is not "
                             "supported: use the tokenizer.json of the Hugging Face release of the same model "
                             "(e.g. meta-llama/Meta-Llama-3-8B), which encodes the same")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{model_path} is not a sentencepiece model ({e}); "
                             "pass LLaMA's tokenizer.model or one made by train_tokenizer()") from None
        self.files = [model_path]  # what defines it: an export copies them beside the weights
        self.n_words = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{model_path} defines no BOS or EOS piece; both are needed")

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))


class HFTokenizer:
    """A Hugging Face tokenizer.json (e.g. Llama 3's byte-level BPE: " Yes" is the one token "ĠYes"), read with the
    `tokenizers` library. BOS, EOS and pad come from the tokenizer_config.json beside it (or special_tokens_map.json),
    as transformers reads them: Llama 3 has <|begin_of_text|> and <|end_of_text|>, and no pad, so pad is BOS. As in
    transformers, special tokens written in the text (a chat template) are read as special tokens."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            import tokenizers
        except ImportError:
            raise ImportError(f"reading {path} needs Hugging Face's `tokenizers` package: pip install tokenizers") \
                from None
        try:
            self.tk = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the library raises a bare Exception for files it cannot parse
            raise ValueError(f"{path} is not a tokenizer.json that the `tokenizers` library reads ({e})") from None
        self.n_words = self.tk.get_vocab_size(with_added_tokens=True)
        folder = os.path.dirname(os.path.abspath(path))
        self.files = [path] + [os.path.join(folder, name) for name in CONFIG_FILES  # what defines it (see above)
                               if os.path.isfile(os.path.join(folder, name))]
        special = _special_tokens(folder)
        self.bos_id, self.eos_id = self._id(special, "bos_token", path), self._id(special, "eos_token", path)
        if special.get("pad_token"):
            self.pad_id = self._id(special, "pad_token", path)
        else:  # BOS, or else any special token but EOS: tokens never trained on
            others = [i for i, t in sorted(self.tk.get_added_tokens_decoder().items()) if t.special]
            self.pad_id = next((i for i in [self.bos_id] + others if i != self.eos_id), self.bos_id)

    def _id(self, special: dict, field: str, path: str) -> int:
        token = special.get(field)
        if not token:
            raise ValueError(f"{path}: no {field} in a tokenizer_config.json or special_tokens_map.json beside it; "
                             "keep the files that came with tokenizer.json together")
        if self.tk.token_to_id(token) is None:
            raise ValueError(f"{path}: its {field} {token!r} (from tokenizer_config.json) is not in its vocabulary")
        return self.tk.token_to_id(token)

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        return [self.bos_id] * bos + self.tk.encode(text, add_special_tokens=False).ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=False)


Tokenizer = SentencePieceTokenizer | HFTokenizer  # what data.py's functions take


CONFIG_FILES = ("special_tokens_map.json", "tokenizer_config.json")  # beside a tokenizer.json


def _special_tokens(folder: str) -> dict:
    """{"bos_token": text, ...} from tokenizer_config.json, completed by special_tokens_map.json; a token may be
    written as {"content": text, ...}."""
    special = {}
    for name in CONFIG_FILES:  # the second wins
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    config = json.load(f)
            except (ValueError, OSError) as e:
                raise ValueError(f"{path} is not valid JSON ({e})") from None
            for field in ("bos_token", "eos_token", "pad_token"):
                value = config.get(field)
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str) or field not in special:
                    special[field] = value
    return special


def _is_tiktoken(path: str) -> bool:
    """tiktoken files are text, one "<base64 token> <rank>" per line; sentencepiece models are binary protobuf."""
    with open(path, "rb") as f:
        return re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+\r?\n?", f.readline()) is not None


def find_tokenizer(folder: str) -> str | None:
    """The tokenizer in `folder` (a checkpoint folder): tokenizer.model if it is sentencepiece, else
    tokenizer.json, else a tiktoken tokenizer.model (which open_tokenizer refuses with advice); None if none."""
    model, hf = os.path.join(folder, "tokenizer.model"), os.path.join(folder, "tokenizer.json")
    if os.path.isfile(model) and not (_is_tiktoken(model) and os.path.isfile(hf)):
        return model
    return hf if os.path.isfile(hf) else None


def open_tokenizer(path: str) -> Tokenizer:
    """A SentencePieceTokenizer or an HFTokenizer: `path` is a tokenizer.model, a tokenizer.json, or the folder
    that holds one."""
    if os.path.isdir(path):
        found = find_tokenizer(path)
        if found is None:
            raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {path}")
        path = found
    return HFTokenizer(path) if path.endswith(".json") else SentencePieceTokenizer(path)


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
