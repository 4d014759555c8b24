import json
import os
import shutil
import sys

import pytest

import checkpoint
import data
import model
import tokenizer
import train
from conftest import answer_part
from tokenizer import open_tokenizer


def test_tokenizer_file_errors(tmp_path):
    for missing in ("missing.model", "missing.json"):
        with pytest.raises(FileNotFoundError, match=f"tokenizer .*not found: .*{missing}"):
            open_tokenizer(str(tmp_path / missing))
    bad = tmp_path / "notes.model"
    bad.write_text("not a sentencepiece model")
    with pytest.raises(ValueError, match="notes.model is not a sentencepiece model"):
        open_tokenizer(str(bad))


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


# ------------------------------------------------------------------------------------ tokenizer.json (HF)

BPE_TEXTS = ["Is the sky blue?\nAnswer: Yes", "Is grass red?\nAnswer: No", "Answer: Yes", "Answer: No",
             "The man turned on the faucet so water flowed.", "Which one? Answer: 3-D or CNN"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|finetune_right_pad_id|>"]


def byte_level_bpe(folder, config=None):
    """A small byte-level BPE laid out like Llama 3's: special tokens after the vocabulary, BOS added by the
    post-processor, BOS / EOS named in tokenizer_config.json (pass config={} for none)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(BPE_TEXTS * 50, trainers.BpeTrainer(
        vocab_size=360, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tk.add_special_tokens(LLAMA3_SPECIALS)
    bos = LLAMA3_SPECIALS[0]
    tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tk.token_to_id(bos))])
    os.makedirs(folder, exist_ok=True)
    tk.save(os.path.join(folder, "tokenizer.json"))
    if config is None:
        eos = {"__type": "AddedToken", "content": "<|end_of_text|>", "lstrip": False, "normalized": False,
               "rstrip": False, "single_word": False, "special": True}  # as older transformers write it
        config = {"bos_token": bos, "eos_token": eos,
                  "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1024}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return tk


def test_tokenizer_json_like_llama3(tmp_path, tok_path):
    tk = byte_level_bpe(tmp_path)
    bos, eos = tk.token_to_id("<|begin_of_text|>"), tk.token_to_id("<|end_of_text|>")
    for path in (tmp_path, tmp_path / "tokenizer.json"):  # the folder or the file
        tok = open_tokenizer(str(path))
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (bos, eos, bos)  # no pad token: BOS, never a target
        assert tok.n_words == tk.get_vocab_size() == bos + len(LLAMA3_SPECIALS)
    ids = tok.encode(" Yes", bos=False, eos=False)
    assert [tk.id_to_token(i) for i in ids] == ["ĠYes"]  # one token, with its leading space
    assert tk.id_to_token(tok.encode("Answer: ", bos=True, eos=False)[-1]) == "Ġ"
    assert tok.decode(tok.encode("Answer: 3-D", bos=True, eos=True)) == "<|begin_of_text|>Answer: 3-D<|end_of_text|>"
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<|finetune_right_pad_id|>"}))
    assert open_tokenizer(str(tmp_path)).pad_id == tk.token_to_id("<|finetune_right_pad_id|>")
    shutil.copy(tok_path, tmp_path / "tokenizer.model")  # as in Llama 2's HF folders: both, sentencepiece is used
    assert isinstance(open_tokenizer(str(tmp_path)), tokenizer.SentencePieceTokenizer)


def test_tokenizer_json_matches_transformers(tmp_path):
    """transformers reads the same folder into the same ids, BOS included, and the same BOS / EOS."""
    transformers = pytest.importorskip("transformers")
    byte_level_bpe(tmp_path)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    tok = open_tokenizer(str(tmp_path))
    assert (reference.bos_token_id, reference.eos_token_id) == (tok.bos_id, tok.eos_id)
    for text in BPE_TEXTS + ["Answer: 東京 🙂", "  two spaces\n\nand lines", "<|end_of_text|> in the text"]:
        assert tok.encode(text, bos=True, eos=False) == reference(text)["input_ids"], text


def test_answer_span_rule_for_byte_level_bpe(tmp_path):
    """"Answer: " ends in a lone 'Ġ' that " Yes" absorbs ('ĠYes'): the answer is scored from the token after ':',
    for every candidate, as with sentencepiece's '▁'."""
    byte_level_bpe(tmp_path)
    tok = open_tokenizer(str(tmp_path))
    ex = data.Example("boolq", 0, "", "Is the sky blue?", "\nAnswer: ", ["No", "Yes", "3-D"], 1)
    n = len(tok.encode(ex.prompt, bos=True, eos=False)) - 1
    encoded = data.encode_candidates(tok, ex, 64)
    for (ids, labels), answer in zip(encoded, ex.candidates):
        assert labels == [data.IGNORE_INDEX] * n + ids[n:] and ids[:n] == encoded[0][0][:n]
        assert tok.decode(ids[n:-1]) == " " + answer and labels[-1] == tok.eos_id
    ids, labels = data.encode_train(tok, ex, 64)
    assert [lab for lab in labels if lab != data.IGNORE_INDEX] == tok.encode(" Yes", bos=False, eos=True)


def test_tokenizer_files_refused_clearly(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json in"):
        open_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nIg== 1\nIw== 2\n")  # Meta's Llama 3 tokenizer.model
    with pytest.raises(ValueError, match="tiktoken file .* use the tokenizer.json of the Hugging Face release"):
        open_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if it were not installed
    with pytest.raises(ImportError, match="needs Hugging Face's `tokenizers` package: pip install tokenizers"):
        open_tokenizer(str(tmp_path))  # the folder: tokenizer.json wins over a tiktoken tokenizer.model
    monkeypatch.undo()
    byte_level_bpe(tmp_path, config={})
    with pytest.raises(ValueError, match="no bos_token in a tokenizer_config.json"):
        open_tokenizer(str(tmp_path / "tokenizer.json"))
    byte_level_bpe(tmp_path, config={"bos_token": "<s>", "eos_token": "</s>"})
    with pytest.raises(ValueError, match="its bos_token '<s>' .* is not in its vocabulary"):
        open_tokenizer(str(tmp_path))


def test_train_finds_the_tokenizer_in_the_checkpoint_folder(tmp_path):
    """--ckpt pointing at a Hugging Face folder with a tokenizer.json needs no --tokenizer."""
    pytest.importorskip("tokenizers")
    byte_level_bpe(tmp_path / "tok")
    tok = open_tokenizer(str(tmp_path / "tok"))
    margs = model.ModelArgs(**{**model.ModelArgs.from_name("tiny").__dict__, "vocab_size": tok.n_words})
    checkpoint.save_model(model.Transformer(margs), tmp_path / "ckpt", format="hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "tok" / name, tmp_path / "ckpt" / name)
    for split in ("train", "val"):
        (tmp_path / f"{split}.jsonl").write_text('{"prompt": "Is the sky blue?\\nAnswer: ", "completion": "Yes"}\n')
    flags = ["--task", "jsonl", "--data-dir", str(tmp_path), "--max-len", "32", "--save-dir", str(tmp_path / "out")]
    metrics = train.main(flags + ["--ckpt", str(tmp_path / "ckpt"), "--epochs", "1", "--batch-size", "1"])
    assert set(metrics) == {"nll", "perplexity"}
    os.remove(tmp_path / "ckpt" / "tokenizer.json")
    with pytest.raises(SystemExit, match="--ckpt .* holds no tokenizer.model or tokenizer.json"):
        train.main(flags + ["--ckpt", str(tmp_path / "ckpt"), "--epochs", "0"])


@pytest.mark.parametrize("fmt", ["hf", "meta"])
def test_export_carries_the_tokenizer_and_its_token_ids(tmp_path, fmt):
    """An export is a complete folder: the tokenizer's files beside the weights (so that --ckpt EXPORT needs no
    --tokenizer, and transformers reads both), and HF's config.json with the tokenizer's BOS / EOS ids."""
    pytest.importorskip("tokenizers")
    byte_level_bpe(tmp_path / "tok")
    tok = open_tokenizer(str(tmp_path / "tok"))
    for split in ("train", "val"):
        (tmp_path / f"{split}.jsonl").write_text('{"prompt": "Is the sky blue?\\nAnswer: ", "completion": "Yes"}\n')
    flags = ["--task", "jsonl", "--data-dir", str(tmp_path), "--max-len", "32", "--batch-size", "1"]
    train.main(flags + ["--tokenizer", str(tmp_path / "tok"), "--epochs", "1", "--save-dir", str(tmp_path / "a"),
                        "--export", str(tmp_path / "export"), "--export-format", fmt])
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "export").iterdir()}
    if fmt == "hf":
        config = json.loads((tmp_path / "export" / "config.json").read_text())
        assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_id, tok.eos_id)
        transformers = pytest.importorskip("transformers")
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
        assert hf_tok("Answer: Yes", add_special_tokens=False)["input_ids"] == tok.encode("Answer: Yes", False, False)
    metrics = train.main(flags + ["--ckpt", str(tmp_path / "export"), "--epochs", "0", "--save-dir", str(tmp_path / "b")])
    assert set(metrics) == {"nll", "perplexity"}
