"""Candidate scoring's speed and memory: this project's (data.score_sequences on model.py, as train.py's evaluation
scores) against transformers' LlamaForCausalLM scoring the same candidates the plain way a user writes it.

Run through bench.py: `python bench.py --methods eval,eval-hf` (see its --data-dir, --tokenizer, --eval-examples,
--eval-batch-size); both scorers run in that one process, taking turns (run_evals).
"""
import os
import random
import statistics

import torch

import data
import superglue
from flags import DTYPES
from formats import hf_config
from measure import device_name, memory_how, model_args, peak_memory, random_model, timed
from plan import GiB, sizes
from tokenizer import open_tokenizer

EVAL_METHODS = ("eval", "eval-hf")  # candidate scoring: this project's, and transformers' written plainly


def synthetic_candidates(n, vocab_size, max_len, seed=0) -> list:
    """n examples of random tokens shaped like SuperGLUE's, encoded as data.encode_candidates() encodes: BOS (1)
    and a prompt of 64 to 448 tokens (at most max_len - 5), then 2 to 4 candidates of 1 to 4 tokens and EOS (2),
    labelled (scored) after the prompt."""
    gen = random.Random(seed)
    examples = []
    for _ in range(n):
        prompt = [1] + [gen.randrange(3, vocab_size) for _ in range(gen.randint(64, min(448, max_len - 5)))]
        answers = [[gen.randrange(3, vocab_size) for _ in range(gen.randint(1, 4))] + [2]
                   for _ in range(gen.randint(2, 4))]
        examples.append([(prompt + a, [data.IGNORE_INDEX] * len(prompt) + a) for a in answers])
    return examples


def eval_candidates(args, margs) -> tuple[list, int, str]:
    """(encoded candidates, pad id, what they are): the first --eval-examples (default 8) of the val.jsonl of every
    SuperGLUE task in --data-dir, prompts cut to train.py's --max-len of 1,024 tokens; or synthetic ones (64)."""
    max_len = min(1024, margs.max_seq_len)
    if args.data_dir == "synthetic":
        n = args.eval_examples or 64
        return synthetic_candidates(n, margs.vocab_size, max_len), 0, f"{n} synthetic examples"
    tok = open_tokenizer(args.tokenizer)
    if tok.n_words > margs.vocab_size:
        raise SystemExit(f"--tokenizer {args.tokenizer} has {tok.n_words} tokens, more than --model {args.model}'s "
                         f"{margs.vocab_size} embedding rows: pick a larger model, or --data-dir synthetic")
    tasks = [t for t in superglue.TASKS if os.path.isfile(os.path.join(args.data_dir, superglue.TASK_DIRS[t],
                                                                        "val.jsonl"))]
    if not tasks:
        raise SystemExit(f"--data-dir {args.data_dir} holds no <Task>/val.jsonl of SuperGLUE")
    examples = [ex for t in tasks for ex in superglue.load_task(t, args.data_dir, "val")[:args.eval_examples or 8]]
    encoded = [data.encode_candidates(tok, ex, max_len) for ex in examples]
    return encoded, tok.pad_id, f"{len(examples)} SuperGLUE val examples ({', '.join(tasks)}) from {args.data_dir}"


def hf_scores(model, encoded, batch_size, pad_id, device) -> list[float]:
    """Candidate scoring as a transformers user writes it: the sequences in their order, batch_size at a time,
    padded on the right to the longest of each batch, logits at every position, log_softmax, gather."""
    seqs = [seq for example in encoded for seq in example]
    scores = []
    for start in range(0, len(seqs), batch_size):
        batch = seqs[start:start + batch_size]
        tokens, labels = data.collate(batch, pad_id)
        mask = torch.tensor([[1] * len(ids) + [0] * (tokens.shape[1] - len(ids)) for ids, _ in batch])
        logits = model(input_ids=tokens.to(device), attention_mask=mask.to(device)).logits.float()  # (B, T, V)
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = labels[:, 1:].to(device)
        picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)         # (B, T-1)
        scores += (picked * (targets != data.IGNORE_INDEX)).sum(dim=1).tolist()
    return scores


def hf_model(margs, dtype, device):
    """transformers' LlamaForCausalLM with margs's shape, random weights, made on `device` in `dtype`."""
    import transformers

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(margs))).eval()
    finally:
        torch.set_default_dtype(default)


def padding_share(batches: list[list[int]]) -> float:
    """Padded positions / all positions, of batches given as their sequences' lengths."""
    total = sum(max(lengths) * len(lengths) for lengths in batches)
    return 1 - sum(map(sum, batches)) / total if total else 0.0


def scorer(method, margs, dtype, device, encoded, batch_size, pad_id):
    """(score(), model, the batches' lengths) for `method`: this project's scoring or transformers' plain one."""
    if method == "eval":
        model = random_model(margs, dtype, device)
        batches = data.scoring_batches([[len(ids) for ids, _ in e] for e in encoded], batch_size)
        return (lambda: data.score_sequences(lambda tokens, at: model(tokens.to(device), at.to(device)),
                                             encoded, batch_size, pad_id),
                model, [[len(encoded[i][j][0]) for i, j in b] for b in batches])
    lengths = [len(ids) for example in encoded for ids, _ in example]
    model = hf_model(margs, dtype, device)
    return (lambda: hf_scores(model, encoded, batch_size, pad_id, device), model,
            [lengths[start:start + batch_size] for start in range(0, len(lengths), batch_size)])


@torch.no_grad()
def run_evals(methods, args, device) -> list:
    """Each scorer scores every candidate once (its peak memory measured: scoring keeps no state from one pass to
    the next, so one warm-up pass is enough), then the scorers take turns
    for `steps` timed passes each, so that a change in the machine's load affects them alike. tokens/s counts
    the candidates' tokens, not the padding, over the median pass; the spread is the slowest / fastest pass."""
    margs, dtype = model_args(args.model), DTYPES[args.dtype]
    encoded, pad_id, what = eval_candidates(args, margs)
    n_tokens = sum(len(ids) for example in encoded for ids, _ in example)
    rows, scorers, resident = [], {}, 0
    for method in methods:
        try:
            score, model, batches = scorer(method, margs, dtype, device, encoded, args.eval_batch_size, pad_id)
        except ImportError:
            rows.append({"method": method, "error": "transformers is not installed (pip install -r "
                         "requirements-test.txt)"})
            continue
        with peak_memory(device, list(model.parameters())) as mem:
            score()
        # on GPU the scorers built before are resident too; the CPU tracker counts only this one's tensors
        peak = mem["gib"] - (resident / GiB if device.type == "cuda" else 0)
        resident += sum(p.numel() * p.element_size() for p in model.parameters())
        scorers[method] = score
        rows.append({"method": method, "peak_gib": peak, "padding": padding_share(batches), "times": []})
    for _ in range(args.steps):
        for row in rows:
            if row["method"] in scorers:
                row["times"].append(timed(scorers[row["method"]], device))
    for row in rows:
        if "times" in row:
            times = row.pop("times")
            row.update(pass_s=statistics.median(times), spread=max(times) / min(times),
                       tokens_per_s=n_tokens / statistics.median(times))
        row.update(sequences=sum(map(len, encoded)), tokens=n_tokens, candidates=what)
    return rows


def print_eval(rows, args, device):
    print(f"candidate scoring, model {args.model}: {sizes(model_args(args.model))['total'] / 1e6:.3g}M parameters, "
          f"{args.dtype}, {args.eval_batch_size} sequences per batch, 1 warm-up + {args.steps} timed "
          f"passes over {rows[0]['candidates']}, on {device_name(device)}")
    print(f"peak memory: {memory_how(device)}; tokens/s: the candidates' tokens (not the padding) / the median "
          "pass; the scorers take turns; spread: slowest / fastest pass\n")
    hf = next((r for r in rows if r["method"] == "eval-hf" and "pass_s" in r), None)
    print(f"{'method':>8} {'sequences':>9} {'tokens':>8} {'padding':>8} {'peak GiB':>9} {'pass s':>8} {'spread':>7} "
          f"{'tokens/s':>9} {'vs eval-hf':>10}")
    for r in rows:
        if "pass_s" not in r:
            print(f"{r['method']:>8} {'ERROR':>9}   {r['error']}")
            continue
        speed = f"{r['tokens_per_s'] / hf['tokens_per_s']:>10.2f}" if hf else f"{'':>10}"
        print(f"{r['method']:>8} {r['sequences']:>9} {r['tokens']:>8} {r['padding']:>8.1%} {r['peak_gib']:>9.4g} "
              f"{r['pass_s']:>8.2f} {r['spread']:>7.2f} {r['tokens_per_s']:>9.1f} {speed}")

