"""Candidate scoring with logits only at the scored positions, in batches sorted by length: against a full-logits
log-likelihood computed here one sequence at a time (no batching, no padding), for every model kind that
train.evaluate() runs (plain, tied, both own shard units, FSDP2; 2 and 3 ranks), and against transformers."""
import dataclasses

import pytest
import torch

import data
import model
import superglue
import train
from dist_utils import run_workers
from tokenizer import open_tokenizer

TINY = model.ModelArgs.from_name("tiny")


def full_logits_scores(net, encoded):
    """The straightforward way: each sequence alone, the logits at every position, log_softmax, and the labelled
    tokens' log-probabilities summed."""
    scores = []
    for seqs in encoded:
        row = []
        for ids, labels in seqs:
            with torch.no_grad():
                logprobs = net(torch.tensor([ids]))[0].float().log_softmax(-1)  # (T, V)
            row.append(sum(logprobs[t - 1, labels[t]].item() for t in range(1, len(ids)) if labels[t] != -100))
        scores.append(row)
    return scores


def uneven_examples(n=7):
    """Prompts of 1 to 7 sentences, 2 to 4 candidates of 1 to 3 words."""
    return [data.Example("cb", i, "Suppose ", "The sky is blue on a clear day. " * (1 + 3 * i % 7),
                         " Is that correct? Yes or No?\nAnswer: ", ["Yes", "No", "Maybe", "Yes or No"][:2 + i % 3],
                         i % 2) for i in range(n)]


def tiny_model(n_words, tied=False, seed=0, dtype=torch.float32):
    net = model.Transformer(dataclasses.replace(TINY, vocab_size=n_words, tie_embeddings=tied))
    model.init_weights(net, seed=seed, std=0.2)  # far from uniform: a wrong position shows in the scores
    return net.to(dtype)


# --------------------------------------------------------------------------------------------- one process

def test_logits_at_equal_the_full_logits_there():
    tokens = torch.randint(0, TINY.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
    at = torch.tensor([0, 10, 11, 12, 32, 5])  # b * 11 + t, in any order
    for tied in (False, True):
        net = tiny_model(TINY.vocab_size, tied)
        with torch.no_grad():
            full = net(tokens)
            torch.testing.assert_close(net(tokens, at), full.flatten(0, 1)[at], atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_scores_equal_the_full_logits_reference_at_every_batch_size(tok, tied):
    net = tiny_model(tok.n_words, tied)
    examples = uneven_examples()
    expected = full_logits_scores(net, [data.encode_candidates(tok, ex, 128) for ex in examples])
    for batch_size in (1, 2, 3, 5, 64):
        scores = data.score_candidates(net, tok, examples, 128, batch_size)
        assert [len(s) for s in scores] == [len(ex.candidates) for ex in examples]
        torch.testing.assert_close(torch.tensor(sum(scores, [])), torch.tensor(sum(expected, [])), atol=1e-4,
                                   rtol=0, msg=f"batch_size {batch_size}")


def test_bf16_scores_on_cpu_match_the_reference(tok):
    net = tiny_model(tok.n_words, tied=True, dtype=torch.bfloat16)
    examples = uneven_examples()
    expected = full_logits_scores(net, [data.encode_candidates(tok, ex, 128) for ex in examples])
    scores = data.score_candidates(net, tok, examples, 128, batch_size=4)
    torch.testing.assert_close(torch.tensor(sum(scores, [])), torch.tensor(sum(expected, [])), atol=0.1, rtol=0.01)


def test_real_tokenizer_and_superglue_lines(real_tok, real_superglue):
    examples = [ex for task in ("cb", "boolq", "copa", "record", "wsc")
                for ex in superglue.load_task(task, real_superglue, "val")[:3]]
    net = model.Transformer(model.ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=real_tok.n_words,
                                            multiple_of=32))
    model.init_weights(net, std=0.2)
    encoded = [data.encode_candidates(real_tok, ex, 256) for ex in examples]  # BoolQ's passages are cut to fit
    expected = full_logits_scores(net, encoded)
    for batch_size in (3, 8):
        scores = data.score_candidates(net, real_tok, examples, 256, batch_size)
        torch.testing.assert_close(torch.tensor(sum(scores, [])), torch.tensor(sum(expected, [])), atol=1e-4,
                                   rtol=0, msg=f"batch_size {batch_size}")


def test_the_output_projection_sees_only_the_scored_positions(tok):
    """The final norm and the output layer get one row per scored token (the answer's and the EOS), not B x T."""
    for tied in (False, True):
        net = tiny_model(tok.n_words, tied)
        shapes = []
        net.norm.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
        examples = uneven_examples()
        data.score_candidates(net, tok, examples, 128, batch_size=4)
        n_scored = sum(sum(lab != -100 for lab in labels[1:])
                       for ex in examples for _, labels in data.encode_candidates(tok, ex, 128))
        assert all(len(shape) == 2 for shape in shapes) and sum(s[0] for s in shapes) == n_scored, shapes


def test_scoring_batches_sort_by_length_and_count():
    lengths = [[5, 6], [100, 101, 100], [7]]
    assert data.scoring_batches(lengths, 2) == [[(1, 1), (1, 0)], [(1, 2), (2, 0)], [(0, 1), (0, 0)]]
    gen = torch.Generator().manual_seed(0)
    for n_examples in (0, 1, 9, 40):
        lengths = [torch.randint(10, 500, (int(torch.randint(1, 5, (1,), generator=gen)),), generator=gen).tolist()
                   for _ in range(n_examples)]
        for batch_size in (1, 3, 16):
            batches = data.scoring_batches(lengths, batch_size)
            pairs = [ij for batch in batches for ij in batch]
            assert sorted(pairs) == [(i, j) for i, seqs in enumerate(lengths) for j in range(len(seqs))]
            assert all(len(batch) <= batch_size for batch in batches)
            assert len(batches) == data.count_scoring_batches(sum(map(len, lengths)), batch_size)
            longest = [max(lengths[i][j] for i, j in batch) for batch in batches]
            assert longest == sorted(longest, reverse=True)
            # each batch is a run of the sorted lengths, so its padding is at most (its longest - its shortest) x
            # (size - 1); summed over the batches that is at most (longest - shortest) x (batch_size - 1)
            flat = [lengths[i][j] for i, j in pairs]
            padding = sum(max(lengths[i][j] for i, j in b) * len(b) - sum(lengths[i][j] for i, j in b) for b in batches)
            assert padding <= (max(flat, default=0) - min(flat, default=0)) * (batch_size - 1)


def test_our_scores_equal_transformers_plain_scoring(tmp_path):
    """transformers' LlamaForCausalLM scores with bench_eval.py's plain reference (data order, full logits); our model
    reads the same weights from the folder transformers saved."""
    transformers = pytest.importorskip("transformers")
    import bench_eval
    import checkpoint

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      initializer_range=0.2)
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path)
    ours = checkpoint.load_model(tmp_path)
    encoded = bench_eval.synthetic_candidates(6, 128, 512)
    expected = bench_eval.hf_scores(reference, encoded, 4, 0, torch.device("cpu"))
    scores = data.score_sequences(ours, encoded, batch_size=4, pad_id=0)
    torch.testing.assert_close(torch.tensor(sum(scores, [])), torch.tensor(expected), atol=1e-3, rtol=0)


# ----------------------------------------------------------------------------------------------- sharded

CONFIGS = {"own-block": ["--sharding", "own", "--shard-unit", "block"],
           "own-linear": ["--sharding", "own", "--shard-unit", "linear"],
           "fsdp2": ["--sharding", "fsdp2"]}


def _sharded_eval_worker(rank, world, tok_path, n_examples, configs):
    """Every rank scores its share of n_examples (some more batches than others, or none); the gathered scores
    must equal the one-process reference, and every rank must run the same number of forward passes."""
    tok = open_tokenizer(tok_path)
    examples = uneven_examples(n_examples)
    for name, tied in configs:
        margs = dataclasses.replace(TINY, vocab_size=tok.n_words, tie_embeddings=tied)
        args = train.parse_args(CONFIGS[name] + ["--tokenizer", tok_path, "--batch-size", "2", "--max-len", "128"])
        net = train.build_model(args, margs, rank, world, torch.device("cpu"), torch.float32)
        calls = []
        net.register_forward_pre_hook(lambda module, inputs: calls.append(1))
        scores = train.evaluate(net, tok, examples, args, rank, world, torch.device("cpu"))
        reference = model.Transformer(margs)
        model.init_weights(reference, seed=args.seed)  # train.py's random model
        expected = full_logits_scores(reference, [data.encode_candidates(tok, ex, 128) for ex in examples])
        torch.testing.assert_close(torch.tensor(sum(scores, [])), torch.tensor(sum(expected, [])), atol=1e-4,
                                   rtol=0, msg=f"{name}, tied={tied}")
        every = [None] * world
        torch.distributed.all_gather_object(every, len(calls))
        most = max(data.count_scoring_batches(sum(len(ex.candidates) for ex in examples[r::world]), 2)
                   for r in range(world))
        assert every == [most] * world, (name, every)


def test_sharded_eval_on_two_ranks_with_uneven_shares(tok_path):
    # 5 examples: rank 0 gets 9 candidates (5 batches of 2), rank 1 gets 5 (3 batches)
    configs = [("own-block", False), ("own-linear", True), ("fsdp2", False), ("fsdp2", True)]
    run_workers(_sharded_eval_worker, tok_path, 5, configs)


def test_sharded_eval_on_three_ranks_with_an_empty_share(tok_path):
    run_workers(_sharded_eval_worker, tok_path, 2, [("own-block", True), ("fsdp2", False)], world_size=3)
