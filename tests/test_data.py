import collections
import json
import math
import os
import re
import shutil

import pytest
import torch

import data
import model
import superglue
import train
from conftest import answer_part

EXAMPLE = os.path.join(os.path.dirname(__file__), "example.jsonl")


# ------------------------------------------------------------------------------------------------ encoding

def test_truncation_cuts_passage_middle_only(tok):
    passage = "START " + "the grass is green and the sky is blue. " * 40 + "FINISH"
    ex = data.Example("boolq", 7, "", passage, " is the sky blue\nAnswer: ", ["No", "Yes"], 1)
    assert len(tok.encode(ex.prompt + "Yes", bos=True, eos=True)) > 60
    for ids, labels in data.encode_candidates(tok, ex, 60) + [data.encode_train(tok, ex, 60)]:
        text = tok.decode(ids[1:-1])
        assert len(ids) <= 60
        assert text.startswith("START") and " ... " in text and "FINISH is the sky blue\nAnswer: " in text
        assert answer_part(tok, ids, labels) in ("No", "Yes")
    assert data.encode_train(tok, ex, 60)[0][-2:] == tok.encode("Yes", bos=False, eos=True)
    with pytest.raises(ValueError, match="max_len=8"):
        data.encode_train(tok, ex, 8)


def test_collate_pads_right_and_masks_pads():
    tokens, labels = data.collate([([5, 6, 7], [-100, 6, 7]), ([8], [8])], pad_id=0)
    assert tokens.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert labels.tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert tokens.dtype == labels.dtype == torch.long


def test_sequence_logprobs_matches_loop():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
    expected = torch.zeros(2)
    for b in range(2):
        for t in range(1, 5):
            if labels[b, t] != -100:
                expected[b] += torch.log_softmax(logits[b, t - 1], dim=-1)[labels[b, t]]
    asked = []

    def logits_fn(tokens, logits_at):
        asked.append(logits_at.tolist())
        return logits.flatten(0, 1)[logits_at]

    tokens = torch.zeros_like(labels)  # what the rigged logits_fn is given does not matter
    assert torch.allclose(data.sequence_logprobs(logits_fn, tokens, labels), expected, atol=1e-5)
    assert asked == [[1, 2, 5, 6, 7, 8]]  # b * T + t of the positions before each label, and only those
    out = data.sequence_logprobs(lambda tokens, at: logits.bfloat16().flatten(0, 1)[at], tokens, labels)
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=0.1)


def believer(preferred, n_words, confidence=10.0):
    """A rigged causal 'model': wherever the tokens so far are a prefix of `preferred`, it puts logit
    `confidence` on the next token of `preferred`; every other logit is 0."""
    def logits_fn(tokens, logits_at):
        logits = torch.zeros(*tokens.shape, n_words)
        for b, row in enumerate(tokens.tolist()):
            for t in range(min(len(row), len(preferred) - 1)):
                if row[:t + 1] != preferred[:t + 1]:
                    break
                logits[b, t, preferred[t + 1]] = confidence
        return logits.flatten(0, 1)[logits_at]
    return logits_fn


def test_scoring_picks_the_answer_the_model_believes(tok):
    ex = data.Example("cb", 0, "Suppose ", "It rained.", " Can we infer that \"it was wet\"?\nAnswer: ",
                      ["Yes", "No", "Maybe"], 0)
    encoded = data.encode_candidates(tok, ex, 64)
    for believed in range(3):
        scores = data.score_candidates(believer(encoded[believed][0], tok.n_words), tok, [ex], 64, batch_size=8)
        assert data.predict([ex], scores) == [believed]


def test_eos_keeps_a_prefix_from_winning(tok):
    """The model believes "Morgan Freeman"; "Morgan" alone scores higher unless the EOS after it counts."""
    ex = data.Example("record", 0, "", "", "Who?\nAnswer: ", ["Morgan", "Morgan Freeman"], 1)
    (short_ids, short_labels), (long_ids, long_labels) = data.encode_candidates(tok, ex, 64)
    assert long_ids[:len(short_ids) - 1] == short_ids[:-1]  # "Morgan" is a token prefix of "Morgan Freeman"
    model = believer(long_ids, tok.n_words)
    scores = data.score_candidates(model, tok, [ex, ex], 64, batch_size=2)  # batch of 2: one example per batch
    hit, miss = 10 - math.log(math.exp(10) + tok.n_words - 1), -math.log(math.exp(10) + tok.n_words - 1)
    n_short, n_long = sum(lab != -100 for lab in short_labels), sum(lab != -100 for lab in long_labels)
    assert scores[0] == pytest.approx([(n_short - 1) * hit + miss, n_long * hit], abs=1e-3) and scores[1] == scores[0]
    assert data.predict([ex, ex], scores) == [1, 1]
    no_eos = [(ids, labels[:-1] + [-100]) for ids, labels in ((short_ids, short_labels), (long_ids, long_labels))]
    tokens, labels = data.collate(no_eos, tok.pad_id)
    without_eos = data.sequence_logprobs(model, tokens, labels)
    assert without_eos[0] > without_eos[1]


def sequence_model(probs, n_words):
    """A rigged causal 'model' that gives each whole token sequence in `probs` its probability: at every position
    the next token follows the sequences that agree with the tokens so far (every other token gets ~0)."""
    def logits_fn(tokens, logits_at):
        logits = torch.full((*tokens.shape, n_words), -1e4)
        for b, row in enumerate(tokens.tolist()):
            for t in range(len(row)):
                following = collections.Counter()
                for seq, p in probs.items():
                    if len(seq) > t + 1 and tuple(row[:t + 1]) == seq[:t + 1]:
                        following[seq[t + 1]] += p
                for token, p in following.items():
                    logits[b, t, token] = math.log(p / sum(following.values()))
        return logits.flatten(0, 1)[logits_at]
    return logits_fn


def test_candidates_starting_with_a_digit_are_scored_without_bias(real_tok):
    """LLaMA encodes "Answer: " as [..., ':', '▁']; " CNN" absorbs the '▁' ('▁CNN'), "3-D" does not ('▁', '3', ...).
    Every candidate is scored from the token after ':', as in the official code, so "3-D" pays for its '▁' too:
    with P(" CNN") = 0.45 and P(" 3-D") = 0.35, CNN wins."""
    ex = data.Example("record", 0, "", "The 3-D film was shown on CNN.", "\n@placeholder aired it.\nAnswer: ",
                      ["3-D", "CNN"], 1)
    assert real_tok.encode(ex.prompt, bos=True, eos=False)[-2:] == [29901, 29871]  # ':', '▁'
    full = {c: tuple(real_tok.encode(ex.prompt + c, bos=True, eos=True)) for c in ("CNN", "3-D", "BBC")}
    model = sequence_model({full["CNN"]: 0.45, full["3-D"]: 0.35, full["BBC"]: 0.2}, real_tok.n_words)
    scores = data.score_candidates(model, real_tok, [ex], 256, batch_size=4)
    assert scores[0] == pytest.approx([math.log(0.35), math.log(0.45)], abs=1e-4)
    assert data.predict([ex], scores) == [1]


def test_every_candidate_shares_the_prompt_prefix(real_tok):
    """Digits, CJK characters and emoji do not merge with the '▁' of "Answer: ", words do: all are scored from the
    same position, and training labels mask exactly what the official `labels[:len(source) - 1]` masks."""
    ex = data.Example("record", 0, "", "Tokyo got 3-D emoji.", "\nAnswer: ", ["CNN", "3-D", "東京", "🙂", "Yes"], 2)
    n = len(real_tok.encode(ex.prompt, bos=True, eos=False)) - 1  # the official rule
    encoded = data.encode_candidates(real_tok, ex, 256)
    for (ids, labels), answer in zip(encoded, ex.candidates):
        assert labels == [data.IGNORE_INDEX] * n + ids[n:] and ids[:n] == encoded[0][0][:n]
        assert answer_part(real_tok, ids, labels) == answer
    assert [ids[n] for ids, _ in encoded].count(29871) == 3  # the lone '▁' is scored for 3-D, 東京 and 🙂
    assert data.encode_train(real_tok, ex, 256) == encoded[2]


# ---------------------------------------------------------------------------------- batches and the demo task

def test_epoch_batches_cover_every_index_once():
    n, batch_size, world = 23, 3, 4
    per_rank = [data.epoch_batches(n, batch_size, world, r, seed=1, epoch=0) for r in range(world)]
    assert {len(b) for b in per_rank} == {math.ceil(n / (batch_size * world))}
    assert sorted(i for batches in per_rank for batch in batches for i in batch) == list(range(n))
    assert all(len(batch) <= batch_size for batches in per_rank for batch in batches)
    assert sum(len(batches[0]) for batches in per_rank) == batch_size * world  # first global batch is full
    assert [len(batches[-1]) for batches in per_rank] == [3, 3, 3, 2]  # the last 11 spread over the ranks
    assert per_rank[2] == data.epoch_batches(n, batch_size, world, 2, seed=1, epoch=0)
    assert per_rank[2] != data.epoch_batches(n, batch_size, world, 2, seed=1, epoch=1)
    single = data.epoch_batches(7, 3, 1, 0, seed=0, epoch=0)
    assert [len(b) for b in single] == [3, 3, 1] and sorted(sum(single, [])) == list(range(7))
    with pytest.raises(ValueError, match="rank"):
        data.epoch_batches(7, 3, 2, 2, seed=0, epoch=0)


def test_synthetic_task_golds_are_true(tok):
    examples = data.synthetic_task(200, seed=3)
    assert [ex.prompt for ex in examples] == [ex.prompt for ex in data.synthetic_task(200, seed=3)]
    for ex in examples:
        a, relation, b = re.fullmatch(r"Is (\d) (greater|less) than (\d)\? Yes or No\?\nAnswer: ", ex.prompt).groups()
        truth = int(a) > int(b) if relation == "greater" else int(a) < int(b)
        assert ex.task == "synthetic" and ex.candidates[ex.gold] == ("Yes" if truth else "No")
    assert 60 < sum(ex.gold for ex in examples) < 140
    assert superglue.compute_metrics("synthetic", examples, [ex.gold for ex in examples]) == {"accuracy": 1.0}
    ids, labels = data.encode_train(tok, examples[0], 32)
    assert answer_part(tok, ids, labels) == examples[0].candidates[examples[0].gold]


# --------------------------------------------------------------------------------------------- your own data

def test_jsonl_rows(tmp_path):
    examples = data.load_jsonl(EXAMPLE)
    rows = [json.loads(line) for line in open(EXAMPLE, encoding="utf-8")]
    assert len(examples) == len(rows) == 10
    for ex, row, line_no in zip(examples, rows, range(1, 11)):
        assert ex.prompt == row["prompt"] and ex.idx == f"{EXAMPLE}, line {line_no}"
        assert (ex.candidates, ex.gold) == ((row["candidates"], row["label"]) if "candidates" in row
                                            else ([row["completion"]], 0))

    def load(*lines):
        path = tmp_path / "val.jsonl"
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return data.load_jsonl(str(path))

    good = '{"prompt": "p", "completion": "c"}'
    for row, message in [
        ('{"prompt": null, "completion": "c"}', "field 'prompt' is null; it must be text"),
        ('{"prompt": "p", "completion": 5}', "field 'completion' is 5; it must be text"),
        ('{"prompt": "p"}', 'expected an object with "prompt" and either "completion", or "candidates" and "label"'),
        ('{"prompt": "p", "completion": "c", "candidates": ["a", "b"], "label": 0}', "either"),
        ('["p", "c"]', "expected an object"),
        ('{"prompt": "p", "candidates": ["a"], "label": 0}', "field 'candidates' must be a list of at least 2 texts"),
        ('{"prompt": "p", "candidates": ["a", null], "label": 0}', r"candidates\[1\] is null; it must be text"),
        ('{"prompt": "p", "candidates": ["a", "b"], "label": 2}', "field 'label' is 2; it must be the index"),
        ('{"prompt": "p", "candidates": ["a", "b"], "label": true}', "field 'label' is true"),
        ('{"prompt": "p", "candidates": ["a", "b"]}', "field 'label' is null"),
        ('{"prompt": "\\udc00", "completion": "c"}', "field 'prompt' holds a lone surrogate"),
    ]:
        with pytest.raises(ValueError, match=re.escape(str(tmp_path / "val.jsonl")) + ", line 3: .*" + message):
            load(good, "", row)
    with pytest.raises(ValueError, match="val.jsonl holds no examples"):
        load("", " ")
    with pytest.raises(FileNotFoundError, match="--task jsonl needs train.jsonl and val.jsonl"):
        data.load_jsonl(str(tmp_path / "train.jsonl"))


def reference_metrics(net, tok, rows):
    """Mean NLL per target token of the gold answers, and accuracy over the rows with candidates, computed here
    from the model's logits: the targets of an answer are its tokens that differ from the prompt's own encoding
    and the EOS, from a position shared by all the candidates of a row."""
    nll, n_tokens, right, choices = 0.0, 0, 0, 0
    for row in rows:
        answers = row.get("candidates", [row.get("completion")])
        gold = row.get("label", 0)
        prompt_ids = tok.encode(row["prompt"], bos=True, eos=False)
        seqs = [tok.encode(row["prompt"] + a, bos=True, eos=True) for a in answers]
        start = min(next(i for i, (a, b) in enumerate(zip(prompt_ids + [None], ids)) if a != b) for ids in seqs)
        logprobs = []
        for ids in seqs:
            with torch.no_grad():
                logits = net(torch.tensor([ids]))[0].float().log_softmax(-1)
            logprobs.append(sum(logits[t - 1, ids[t]].item() for t in range(start, len(ids))))
        nll -= logprobs[gold]
        n_tokens += len(seqs[gold]) - start
        if len(answers) > 1:
            choices += 1
            right += max(range(len(answers)), key=logprobs.__getitem__) == gold
    return {"nll": nll / n_tokens, "perplexity": math.exp(nll / n_tokens), "accuracy": right / choices}


def test_jsonl_task_trains_and_reports_nll_perplexity_accuracy(tmp_path, tok, tok_path):
    for split in ("train", "val"):
        shutil.copy(EXAMPLE, tmp_path / f"{split}.jsonl")
    flags = ["--task", "jsonl", "--data-dir", str(tmp_path), "--tokenizer", tok_path, "--max-len", "128"]
    before = train.main(flags + ["--epochs", "0", "--save-dir", str(tmp_path / "zero")])
    margs = model.ModelArgs(**{**model.ModelArgs.from_name("tiny").__dict__, "vocab_size": tok.n_words})
    net = model.Transformer(margs)
    model.init_weights(net, seed=42)  # train.py's random model for --seed 42
    rows = [json.loads(line) for line in open(EXAMPLE, encoding="utf-8")]
    assert before == pytest.approx(reference_metrics(net, tok, rows), rel=1e-4)
    after = train.main(flags + ["--epochs", "5", "--batch-size", "10", "--save-dir", str(tmp_path / "five")])
    assert set(after) == {"nll", "perplexity", "accuracy"} and after["nll"] < before["nll"]
    with pytest.raises(SystemExit):
        train.parse_args(flags + ["--predict"])

