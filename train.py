"""Full-parameter fine-tuning of LLaMA with LOMO (Lv et al. 2023) on SuperGLUE, from a laptop CPU to 8 GPUs.

    python train.py                                   # CPU demo: tiny model, synthetic task, LOMO
    torchrun --nproc_per_node 8 train.py --model 65b --ckpt <dir> --tokenizer <tokenizer.model> \\
        --task boolq --data-dir <SuperGLUE dir>       # the paper's 65B setting
    python train.py --model 7b --dry-run              # memory plan, as the paper's Table 1
    python train.py --optimizer lora                  # the LoRA baseline; --lora-rank 2: LoRA + LOMO

Fused updates leave no gradient to accumulate, so there is no gradient accumulation: the global batch is
--batch-size (per rank, as in the official config) x the number of ranks; the demo's default is a global batch of
16, split over the ranks. The loss of a step is the mean over the answer tokens of the whole global batch, so
1 rank and N ranks compute the same step.
"""
import contextlib
import dataclasses
import gc
import math
import os
import random
import resource
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import plan
import rundir
import shard
import superglue
from checkpoint import open_checkpoint
from formats import CheckpointError, meta_params
from flags import DTYPES, parse_args
from lora import LoRA
from model import ModelArgs, Transformer, cross_entropy, random_weights
from optimizers import Optimizers
from tokenizer import find_tokenizer, open_tokenizer, train_tokenizer


# ------------------------------------------------------------------------------------------------- setup

def init_distributed():
    """(rank, world, device): torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain python runs one process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def all_reduce(x, world, op=dist.ReduceOp.SUM):
    """Reduce a number over ranks (as float64, on the device that the backend needs)."""
    if world == 1:
        return x
    t = torch.tensor(float(x), dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=op)
    return t.item()


@contextlib.contextmanager
def user_errors(flag):
    """The project's errors about a user's file (missing, unreadable, malformed: OSError or ValueError from
    data.py and checkpoint.py) as one line naming the flag, without a traceback. Wraps only the loading of files,
    so that a ValueError from a bug elsewhere keeps its traceback."""
    try:
        yield
    except (OSError, ValueError) as e:
        raise SystemExit(f"{flag}: {e}") from None


def load_tokenizer(args, rank, world):
    """--tokenizer, else the tokenizer in --ckpt's folder, else (the demo) a tiny one trained here."""
    path = args.tokenizer or (find_tokenizer(args.ckpt) if args.ckpt and os.path.isdir(args.ckpt) else None)
    if path:
        with user_errors("--tokenizer"):
            return open_tokenizer(path)
    if args.ckpt or args.task != "synthetic":
        raise SystemExit(f"--tokenizer is required for --task {args.task}" + (
            f": --ckpt {args.ckpt} holds no tokenizer.model or tokenizer.json" if args.ckpt else "") +
            " (LLaMA's tokenizer.model, or the tokenizer.json of a Hugging Face release, or its folder)")
    # The demo's tokenizer: rank 0 trains it into a private temporary folder and sends the file to the other
    # ranks, so that no folder is shared between users, runs or machines.
    with tempfile.TemporaryDirectory(prefix="lomo-demo-tokenizer-") as folder:
        path = Path(folder) / "synthetic.model"
        model_file = [None]
        if rank == 0:
            train_tokenizer(data.synthetic_texts(), str(path.with_suffix("")), vocab_size=320)
            model_file = [path.read_bytes()]
        if world > 1:
            dist.broadcast_object_list(model_file, src=0)
            path.write_bytes(model_file[0])
        return open_tokenizer(str(path))


def model_args(args, tok):
    """The model's shape: the --model preset, or what --ckpt holds (which must then match the preset). The tiny
    demo model takes the tokenizer's vocabulary; any other needs an embedding row for every token."""
    margs = ModelArgs.from_name(args.model) if args.model else None
    if args.model == "tiny" and not args.ckpt:
        return dataclasses.replace(margs, vocab_size=tok.n_words)
    where = "the --model preset"
    if args.ckpt:
        try:
            ckpt = open_checkpoint(args.ckpt).args
        except (CheckpointError, FileNotFoundError) as e:  # one line that names the file, no traceback
            raise SystemExit(f"--ckpt: {e}") from None
        if margs and ckpt.architecture() != margs.architecture():
            raise SystemExit(f"--ckpt {args.ckpt} holds a model with {ckpt}, not the --model {args.model} preset "
                             f"{margs}: pass the matching --model, or none")
        # a checkpoint without a context length (Meta's, off the presets) keeps the preset's
        margs, where = (dataclasses.replace(ckpt, max_seq_len=margs.max_seq_len) if margs else ckpt), f"--ckpt {args.ckpt}"
    if tok.n_words > margs.vocab_size:  # more rows than tokens is fine: many checkpoints pad their embedding
        raise SystemExit(f"the tokenizer has {tok.n_words} tokens but {where} has an embedding of only "
                         f"{margs.vocab_size} rows: use the tokenizer that came with the weights")
    if args.export and args.export_format == "meta":
        try:  # refuse now, not after training, what Meta's params.json cannot say
            meta_params(margs)
        except CheckpointError as e:
            raise SystemExit(f"--export-format meta: {e}") from None
    return margs


class RandomWeights:
    """model.random_weights as a reader: every backend gets the same random model, one tensor at a time."""

    def __init__(self, margs, seed):
        self.stream = random_weights(margs, seed)

    def read(self, name, rows):
        drawn, tensor = next(self.stream)
        assert drawn == name, f"random weights are drawn in model order: {name} asked for, {drawn} next"
        return tensor[rows]


def build_model(args, margs, rank, world, device, dtype, lora=None):
    """The model for this run and this rank: plain (1 rank), hand-sharded (own) or FSDP2, with `lora`'s adapters
    attached; for --optimizer lora, with every weight frozen."""
    if world == 1:
        with torch.device("meta"):
            model = Transformer(margs, checkpointing=True).to(dtype)
        model.to_empty(device=device)
        if lora is not None:
            lora.attach(model)
    elif args.sharding == "own":
        model = shard.ShardedTransformer(margs, args.shard_unit, dist.group.WORLD, device, dtype, lora)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        model = shard.fsdp2_transformer(margs, init_device_mesh(device.type, (world,)), device, dtype, lora)
    if not args.resume:  # a resume fills every row itself (and refuses a checkpoint that misses one)
        read = open_checkpoint(args.ckpt).read if args.ckpt else RandomWeights(margs, args.seed).read
        shard.load_rows(model, lambda name, rows: read(name, rows).to(device=device, dtype=dtype))
    if args.optimizer == "lora":  # the LoRA baseline: no weight of the model ever gets a gradient
        model.requires_grad_(False)
    return model


# -------------------------------------------------------------------------------------------- one step

def train_step(args, model, opt, tokens, labels, world):
    """One step on this rank's slice of the global batch: (the global mean loss, a row for metrics.jsonl).
    The loss is the sum over this rank's answer tokens divided by the global count, so that the gradients
    summed over ranks are those of the mean over the global batch. --clip-loss-value clamps each token's loss."""
    logits = model(tokens)
    local_sum = cross_entropy(logits, labels, reduction="sum", max_token_loss=args.clip_loss_value)
    n_tokens = max(1, all_reduce((labels[:, 1:] != data.IGNORE_INDEX).sum().item(), world))
    global_loss = all_reduce(local_sum.item(), world) / n_tokens
    return global_loss, opt.update(local_sum / n_tokens, math.isfinite(global_loss))


@torch.no_grad()
def evaluate(model, tok, examples, args, rank, world, device, desc="eval"):
    """Score every candidate of every example (each rank a slice), gather the scores. Every rank runs the same
    number of forward passes: a rank with fewer batches runs dropped one-token passes. Rank 0 shows a bar."""
    mine = list(range(rank, len(examples), world))
    n_batches = data.count_scoring_batches(sum(len(examples[i].candidates) for i in mine), args.batch_size)
    n_forwards = int(all_reduce(n_batches, world, dist.ReduceOp.MAX))
    bar = tqdm(total=n_forwards, desc=desc, unit="batch", disable=rank != 0, leave=False)

    def logits_fn(tokens, logits_at):
        bar.update(1)
        return model(tokens.to(device), logits_at.to(device))
    scores = data.score_candidates(logits_fn, tok, [examples[i] for i in mine], args.max_len, args.batch_size)
    for _ in range(n_forwards - n_batches):  # dropped: the other ranks' forward passes need this rank's collectives
        logits_fn(torch.tensor([[tok.bos_id]]), torch.tensor([0]))
    bar.close()
    by_index = {i: s for part in rundir.gather_objects(list(zip(mine, scores)), world) for i, s in part}
    return [by_index[i] for i in range(len(examples))]


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


# ------------------------------------------------------------------------------------------------- main

def load_examples(args, split, n, rank=0):
    """n examples of a split, sampled as --sampling says; all of them when n is None, or, with a notice, when the
    file holds fewer (as the official code does)."""
    if args.task == "synthetic":
        return data.synthetic_task(n, seed=args.seed + (split == "val"))
    with user_errors("--data-dir"):
        if args.task == "jsonl":
            examples = data.load_jsonl(os.path.join(args.data_dir, f"{split}.jsonl"))
        else:
            examples = superglue.load_task(args.task, args.data_dir, split)
    if n is None:
        return examples
    if n > len(examples) and rank == 0:
        print(f"notice: {args.task} {split} holds {len(examples)} examples, fewer than the {n} asked for "
              f"(--{'train' if split == 'train' else 'eval'}-samples): all are used")
    if args.sampling == "paper":
        return data.paper_subset(examples, n)
    return data.group_subset(examples, n, args.seed)


def check_max_len(args, tok, margs, splits):
    """--max-len must fit the model, and every example with its passage cut away entirely (as data.fit_prompt
    would cut it): checked on every split before training, with the value to pass."""
    if args.max_len > margs.max_seq_len:
        raise SystemExit(f"--max-len {args.max_len} exceeds the model's max_seq_len {margs.max_seq_len}: pass "
                         f"--max-len {margs.max_seq_len} or less (passages are cut to fit)")
    for split, examples in splits.items():
        if not examples:
            continue
        need, i = max((len(tok.encode(ex.before + ex.after + c, bos=True, eos=True)), i)  # the prompt, no passage
                      for i, ex in enumerate(examples) for c in ex.candidates)
        if need > args.max_len:
            fix = (f"pass --max-len {need} or more" if need <= margs.max_seq_len else
                   f"that is more than the model's max_seq_len {margs.max_seq_len}")
            raise SystemExit(f"--max-len {args.max_len} is too short for {split}: example {examples[i].idx} needs "
                             f"{need} tokens even with its passage cut away; {fix}")


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        return plan.print_plan(args)
    owns_group = int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized()
    rank, world, device = init_distributed()
    ok = False
    try:
        metrics = run(args, rank, world, device)
        ok = True
        return metrics
    finally:
        if owns_group:
            close_distributed(ok)


def close_distributed(ok: bool):
    """Destroy the process group that init_distributed() made, so that torchrun sees exit status 0.
    gloo's worker threads release each collective's tensors, which needs the GIL: a thread still doing so when the
    interpreter shuts down aborts the process ("terminate called without an active exception", exit -6, after
    'done'). So a clean run first waits for every rank, which leaves those threads idle. After an error the wait
    is skipped: another rank may never reach it."""
    if ok:
        dist.barrier()
    dist.destroy_process_group()
    gc.collect()  # free what still holds the group while Python is fully alive


def run(args, rank, world, device):
    """Check everything checkable, then train, evaluate, predict and export, as the flags say; returns the final
    validation metrics."""
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed + rank)  # each rank its own dropout masks (and stochastic rounding)
    random.seed(args.seed)
    tok = load_tokenizer(args, rank, world)
    margs = model_args(args, tok)
    train_set = load_examples(args, "train", args.train_samples, rank) if args.epochs else []
    val_set = load_examples(args, "val", args.eval_samples, rank)
    # the test split; RTE's model also predicts the diagnostics AX-b and AX-g
    predict_sets = {args.task: load_examples(args, "test", None, rank)} if args.predict else {}
    if args.predict and args.task == "rte":
        with user_errors("--data-dir"):
            predict_sets.update(superglue.load_diagnostics(args.data_dir))
    check_max_len(args, tok, margs, {f"{args.task} train": train_set, f"{args.task} val": val_set,
                                     **{f"{name} test": examples for name, examples in predict_sets.items()}})
    train_seqs = [data.encode_train(tok, ex, args.max_len) for ex in train_set]
    folder = rundir.RunDir(args, rank, world)  # where the run writes: checked before the model is loaded
    folder.check()
    if args.export:
        rundir.check_export(args.export)
    if rank == 0:
        folder.warn_if_short_of_space(margs, dtype)
    folder.prepare()
    lora = None  # LoRA's adapters, the same on every rank
    if args.lora_rank:
        lora = LoRA(margs, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets.split(","),
                    seed=args.seed).to(device)
    model = build_model(args, margs, rank, world, device, dtype, lora)
    global_batch = args.batch_size * world
    steps_per_epoch = -(-len(train_set) // global_batch)
    opt = Optimizers(args, model, lora, world, max(1, args.epochs * steps_per_epoch))
    step, position = folder.load(model, opt, lora) if args.resume else (0, (0, 0))  # (epoch, examples done)

    def score(examples, desc="eval"):
        if lora is not None:
            lora.eval()  # no dropout
        result = evaluate(model, tok, examples, args, rank, world, device, desc)
        if lora is not None:
            lora.train()
        return result

    def run_eval():
        val_scores = score(val_set)
        if args.task == "jsonl":
            metrics = data.answer_metrics(tok, val_set, val_scores, args.max_len)
        else:
            metrics = superglue.compute_metrics(args.task, val_set, data.predict(val_set, val_scores))
        folder.log({"step": step, "split": "val", "task": args.task, **metrics})
        return metrics

    bar = tqdm(total=args.epochs * steps_per_epoch, initial=step, disable=rank != 0 or not args.epochs, desc="train")
    losses, written = [], {"metrics": folder.metrics_path}
    for epoch in range(position[0], args.epochs):
        batches = data.epoch_batches(len(train_set), args.batch_size, world, rank, args.seed, epoch)
        for b in range(-(-position[1] // global_batch) if epoch == position[0] else 0, len(batches)):
            seqs = [train_seqs[i] for i in batches[b]] or [([tok.bos_id, tok.eos_id], [-100, -100])]  # dropped work
            tokens, labels = data.collate(seqs, tok.pad_id)
            start = time.perf_counter()
            loss, row = train_step(args, model, opt, tokens.to(device), labels.to(device), world)
            n_real = all_reduce(sum(len(train_seqs[i][0]) for i in batches[b]), world)  # padding excluded
            rates = opt.rates()  # the rates this step used
            opt.advance()
            step += 1
            losses.append(loss)
            row = {"step": step, "loss": loss, **rates, **row,
                   "tokens_per_s": n_real / (time.perf_counter() - start), "peak_mem_gib": peak_memory_gib(device)}
            folder.log({k: v for k, v in row.items() if v is not None})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{next(iter(rates.values())):.2e}",
                            tok_s=f"{row['tokens_per_s']:.0f}", mem=f"{row['peak_mem_gib']:.1f}G")
            if args.eval_every and step % args.eval_every == 0:
                run_eval()
            if args.save_every and step % args.save_every == 0:
                done = min(len(train_set), (b + 1) * global_batch)  # examples: the same on any number of ranks
                written["checkpoint"] = folder.save(step, (epoch, done), model, opt, lora)
    bar.close()
    if args.epochs:
        written["checkpoint"] = folder.save(step, (args.epochs, 0), model, opt, lora)
    metrics = run_eval()
    for name, examples in predict_sets.items():
        preds = data.predict(examples, score(examples, desc=f"predict {name}"))
        if rank == 0:
            path = superglue.write_predictions(name, examples, preds, args.save_dir)
            written["predictions"] = ", ".join(filter(None, [written.get("predictions"), path]))
    missing = [f"{superglue.TASK_DIRS[name]}/{superglue.TASK_DIRS[name]}.jsonl" for name in superglue.DIAGNOSTICS
               if args.predict and args.task == "rte" and name not in predict_sets]
    if rank == 0 and missing:
        print(f"no {' or '.join(missing)} in --data-dir {args.data_dir}: a full leaderboard submission needs "
              "their predictions too")
    if args.export:
        rundir.export(args, model, margs, rank, world, lora, tok)
        written["export"] = args.export
    if rank == 0:
        trained = ""
        if losses:
            first, last = sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:])
            trained = f", loss {first:.3f} -> {last:.3f} (mean of the first / last 10 steps)"
        print(f"done: {step} steps{trained}; val " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
              + "; " + ", ".join(f"{what} {path}" for what, path in written.items()))
    return metrics


if __name__ == "__main__":
    main()
