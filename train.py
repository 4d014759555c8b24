"""Full-parameter fine-tuning of LLaMA with LOMO (Lv et al. 2023) on SuperGLUE, from a laptop CPU to 8 GPUs.

    python train.py                                   # CPU demo: tiny model, synthetic task, LOMO
    torchrun --nproc_per_node 8 train.py --model 65b --ckpt <dir> --tokenizer <tokenizer.model> \\
        --task boolq --data-dir <SuperGLUE dir>       # the paper's 65B setting
    python train.py --model 7b --dry-run              # memory plan, as the paper's Table 1

Fused updates leave no gradient to accumulate, so there is no gradient accumulation: the effective batch is
--batch-size x the number of ranks. The loss of a step is the mean over the answer tokens of the whole global
batch, so 1 rank and N ranks compute the same step.
"""
import argparse
import dataclasses
import gc
import json
import math
import os
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import shard
import superglue
from lomo import LOMO, AdaLomo
from checkpoint import HFWriter, MetaWriter, open_checkpoint
from formats import CheckpointError, meta_params
from model import MODEL_NAMES, ModelArgs, Transformer, cross_entropy, param_shapes, random_weights
from plan import print_plan
from tokenizer import find_tokenizer, open_tokenizer, train_tokenizer

OPTIMIZERS = ("lomo", "adalomo", "sgd", "adamw")
# Defaults of the flags left unset. SuperGLUE: the official LOMO config (OpenLMLab/LOMO config/args_lomo.yaml).
# The demo: what makes the tiny model learn the synthetic task with LOMO in about a minute on a CPU.
# --dry-run: batch 1 x 1024 tokens per rank, the setting of the 65B memory budget in the README.
# --task jsonl (your own data): the SuperGLUE settings, on every row of the files.
DEFAULTS = {"superglue": dict(lr=0.03, epochs=10, batch_size=16, train_samples=1000, eval_samples=1000,
                              warmup_ratio=0.1, clip_grad_norm=1.0, max_len=1024),
            "dry_run": dict(lr=0.03, epochs=10, batch_size=1, train_samples=1000, eval_samples=1000,
                            warmup_ratio=0.1, clip_grad_norm=0.0, max_len=1024),  # shared/design/sharded-step.md
            "synthetic": dict(lr=0.3, epochs=2, batch_size=16, train_samples=20000, eval_samples=1000,
                              warmup_ratio=0.0, clip_grad_norm=0.0, max_len=64)}
DEFAULTS["jsonl"] = dict(DEFAULTS["superglue"], train_samples=None, eval_samples=None)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Unset flags take the defaults of the official LOMO config for SuperGLUE "
                                "tasks and --task jsonl, and of the CPU demo for --task synthetic: "
                                + json.dumps(DEFAULTS))
    p.add_argument("--model", help=f"preset: {', '.join(MODEL_NAMES)} (default: what --ckpt holds, else tiny)")
    p.add_argument("--ckpt", help="Meta (params.json) or Hugging Face (config.json) checkpoint folder")
    p.add_argument("--tokenizer", help="tokenizer.model (sentencepiece), tokenizer.json (Hugging Face), or their "
                   "folder (default: the one in --ckpt's folder; for the demo, a tiny one trained on the fly)")
    p.add_argument("--task", default="synthetic",
                   help=f"synthetic, jsonl (your own data) or a SuperGLUE task: {', '.join(superglue.TASKS)}")
    p.add_argument("--data-dir", help="SuperGLUE folder holding BoolQ/, CB/, ...; for jsonl the folder holding "
                   "train.jsonl and val.jsonl (not needed for synthetic)")
    p.add_argument("--train-samples", type=int, help="training examples sampled (paper: 1000; jsonl: all)")
    p.add_argument("--eval-samples", type=int, help="validation examples sampled (paper: 1000; jsonl: all)")
    p.add_argument("--sampling", default="paper", choices=("paper", "groups"),
                   help="paper: the paper's subsets (random.sample with seed 0, whatever --seed); groups: whole "
                   "MultiRC questions, drawn with --seed")
    p.add_argument("--max-len", type=int, help="tokens per sequence; the passage is cut to fit")
    p.add_argument("--optimizer", default="lomo", choices=OPTIMIZERS,
                   help="sgd and adamw are the paper's unfused baselines (fp32 master weights over 16-bit)")
    p.add_argument("--lr", type=float)
    p.add_argument("--epochs", type=int, help="0 only evaluates (the paper's zero-shot row)")
    p.add_argument("--batch-size", type=int, help="sequences per rank and step")
    p.add_argument("--lr-schedule", default="linear", choices=("linear", "cosine", "constant"))
    p.add_argument("--warmup-ratio", type=float, help="fraction of the steps spent warming up")
    p.add_argument("--clip-grad-norm", type=float, help="global L2 clipping, 0 for none; LOMO then runs 2 "
                   "backward passes")
    p.add_argument("--clip-grad-value", type=float, help="clamp each gradient element to +-value")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--stochastic-rounding", action="store_true", help="round bf16 updates stochastically")
    p.add_argument("--dtype", choices=DTYPES, help="default: bf16 on GPU (and for --dry-run), fp32 on CPU")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end only)")
    p.add_argument("--save-dir", default="out", help="metrics.jsonl, checkpoints and predictions go here")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end only)")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints kept in --save-dir")
    p.add_argument("--resume", help="a checkpoint folder written by --save-every, to continue from")
    p.add_argument("--export", help="write the trained model to this new folder at the end")
    p.add_argument("--export-format", default="meta", choices=("meta", "hf"))
    p.add_argument("--predict", action="store_true", help="write test-split predictions (SuperGLUE format; "
                   "--task rte adds the diagnostics AX-b and AX-g)")
    p.add_argument("--dry-run", action="store_true", help="print the memory and communication plan, then exit")
    p.add_argument("--world-size", type=int, default=1, help="ranks assumed by --dry-run")
    p.add_argument("--gpu-gib", type=float, default=24.0, help="GPU memory that --dry-run checks the plan against")
    p.add_argument("--sharding", default="own", choices=("own", "fsdp2"), help="own: shard.py; fsdp2: PyTorch's")
    p.add_argument("--shard-unit", default="block", choices=shard.SHARD_UNITS, help="what is gathered at once")
    args = p.parse_args(argv)
    kind = "dry_run" if args.dry_run else args.task if args.task in ("synthetic", "jsonl") else "superglue"
    for flag, value in DEFAULTS[kind].items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    args.clip_grad_norm = args.clip_grad_norm or None
    args.model = args.model or ("tiny" if not args.ckpt else None)
    if args.model is not None and args.model.lower() not in MODEL_NAMES:
        p.error(f"--model {args.model!r} is unknown: choose one of {', '.join(MODEL_NAMES)}")
    if args.task not in ("synthetic", "jsonl") and args.task.lower() not in superglue.TASKS:
        p.error(f"--task {args.task!r} is unknown: choose synthetic, jsonl or one of {', '.join(superglue.TASKS)}")
    if args.task != "synthetic" and not args.dry_run and not (args.data_dir and os.path.isdir(args.data_dir)):
        needs = ("train.jsonl and val.jsonl (see the README for their format)" if args.task == "jsonl" else
                 f"{superglue.TASK_DIRS.get(args.task.lower(), '')}/ (see the README for the download)")
        p.error(f"--data-dir {args.data_dir!r} is not a folder: --task {args.task} needs the folder that holds "
                + needs)
    if args.predict and args.task in ("synthetic", "jsonl"):
        p.error(f"--predict writes SuperGLUE test predictions; --task {args.task} has no test split")
    for flag in ("batch_size", "train_samples", "eval_samples", "max_len", "world_size", "keep_last"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if not args.lr > 0:
        p.error("--lr must be > 0")
    return args


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


def load_tokenizer(args, rank, world):
    """--tokenizer, else the tokenizer in --ckpt's folder, else (the demo) a tiny one trained here."""
    path = args.tokenizer or (find_tokenizer(args.ckpt) if args.ckpt and os.path.isdir(args.ckpt) else None)
    if path:
        return open_tokenizer(path)
    if args.ckpt or args.task != "synthetic":
        raise SystemExit(f"--tokenizer is required for --task {args.task}" + (
            f": --ckpt {args.ckpt} holds no tokenizer.model or tokenizer.json" if args.ckpt else "") +
            " (LLaMA's tokenizer.model, or the tokenizer.json of a Hugging Face release, or its folder)")
    folder = Path(tempfile.gettempdir()) / "lomo-demo-tokenizer"
    if rank == 0:  # sentencepiece training is deterministic, so the demo tokenizer is the same every time
        folder.mkdir(exist_ok=True)
        train_tokenizer(data.synthetic_texts(), str(folder / "synthetic"), vocab_size=320)
    if world > 1:
        dist.barrier()
    return open_tokenizer(str(folder / "synthetic.model"))


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


def build_model(args, margs, rank, world, device, dtype):
    """The model for this run and this rank: plain (1 rank), hand-sharded (own) or FSDP2."""
    if world == 1:
        with torch.device("meta"):
            model = Transformer(margs, checkpointing=True).to(dtype)
        model.to_empty(device=device)
    elif args.sharding == "own":
        model = shard.ShardedTransformer(margs, args.shard_unit, dist.group.WORLD, device, dtype)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        model = shard.fsdp2_transformer(margs, init_device_mesh(device.type, (world,)), device, dtype)
    read = open_checkpoint(args.ckpt).read if args.ckpt else RandomWeights(margs, args.seed).read
    shard.load_rows(model, lambda name, rows: read(name, rows).to(device=device, dtype=dtype))
    return model


class _MasterWeights:
    """fp32 master weights under 16-bit ones, as in the paper's mixed-precision baselines: the inner torch
    optimizer updates fp32 copies, which are then rounded into the model (fp32 models share their tensors).
    step() goes one parameter at a time, so that only one fp32 gradient exists at once: the model keeps 16-bit
    gradients, as the paper counts them."""

    def __init__(self, params, **kwargs):
        self.model_params = [p for p in params if p.requires_grad]
        super().__init__([p.detach().float().requires_grad_() for p in self.model_params], **kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        masters = [m for group in self.param_groups for m in group["params"]]
        for p, m in zip(self.model_params, masters):
            if p.grad is None:
                continue
            m.grad, p.grad = p.grad.float(), None
            super().step()  # updates only the parameters that have a gradient: this one
            m.grad = None
            p.copy_(m)


class MasterSGD(_MasterWeights, torch.optim.SGD):
    """SGD with fp32 master weights: 4 extra bytes per parameter (the paper's SGD row)."""


class MasterAdamW(_MasterWeights, torch.optim.AdamW):
    """AdamW with fp32 master weights and states: 12 extra bytes per parameter (the paper's AdamW row)."""


def build_optimizer(args, model, world):
    if args.optimizer in ("sgd", "adamw"):
        if world > 1 and args.sharding == "own":
            raise SystemExit(f"--optimizer {args.optimizer} keeps full gradients and is not supported with "
                             "--sharding own; use --sharding fsdp2, or lomo / adalomo")
        cls = MasterSGD if args.optimizer == "sgd" else MasterAdamW
        return cls(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    group = None
    if world > 1:
        group = dist.group.WORLD  # FSDP2's mesh is the whole world too
    cls = LOMO if args.optimizer == "lomo" else AdaLomo
    return cls(model.parameters(), lr=args.lr, clip_grad_norm=args.clip_grad_norm,
               clip_grad_value=args.clip_grad_value, weight_decay=args.weight_decay,
               stochastic_rounding=args.stochastic_rounding, process_group=group)


def lr_lambda(args, total_steps):
    warmup = int(args.warmup_ratio * total_steps)

    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if args.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        if args.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return factor


# -------------------------------------------------------------------------------------------- one step

def train_step(args, model, opt, tokens, labels, world):
    """One step on this rank's slice of the global batch: (the global mean loss, a row for metrics.jsonl).
    The loss is the sum over this rank's answer tokens divided by the global count, so that the gradients
    summed over ranks are those of the mean over the global batch."""
    logits = model(tokens)
    local_sum = cross_entropy(logits, labels, reduction="sum")
    n_tokens = max(1, all_reduce((labels[:, 1:] != data.IGNORE_INDEX).sum().item(), world))
    global_loss = all_reduce(local_sum.item(), world) / n_tokens
    if isinstance(opt, (LOMO, AdaLomo)):
        info = opt.fused_backward(local_sum / n_tokens)
        return global_loss, {"skipped": info.skipped, "grad_norm": info.grad_norm, "loss_scale": info.loss_scale}
    if not math.isfinite(global_loss):  # every rank sees the same global loss, so all skip together
        return global_loss, {"skipped": True}
    (local_sum / n_tokens).backward()
    row = {"skipped": False}
    if args.clip_grad_value:
        torch.nn.utils.clip_grad_value_(opt.model_params, args.clip_grad_value)
    if args.clip_grad_norm:
        norm = torch.nn.utils.clip_grad_norm_(opt.model_params, args.clip_grad_norm)
        row["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: DTensor
    opt.step()
    return global_loss, row


@torch.no_grad()
def evaluate(model, tok, examples, args, rank, world, device):
    """Score every candidate of every example (each rank a slice), gather the scores. Every rank runs the same
    number of forward passes: a rank with fewer batches runs dropped one-token passes."""
    mine = list(range(rank, len(examples), world))
    n_batches = data.count_scoring_batches(sum(len(examples[i].candidates) for i in mine), args.batch_size)
    n_forwards = int(all_reduce(n_batches, world, dist.ReduceOp.MAX))
    logits_fn = lambda tokens, logits_at: model(tokens.to(device), logits_at.to(device))  # noqa: E731
    scores = data.score_candidates(logits_fn, tok, [examples[i] for i in mine], args.max_len, args.batch_size)
    for _ in range(n_forwards - n_batches):  # dropped: the other ranks' forward passes need this rank's collectives
        logits_fn(torch.tensor([[tok.bos_id]]), torch.tensor([0]))
    gathered = [(i, s) for i, s in zip(mine, scores)]
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, gathered)
        gathered = [item for part in everyone for item in part]
    by_index = dict(gathered)
    return [by_index[i] for i in range(len(examples))]


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


# ------------------------------------------------------------------------------------------ checkpoints

def save_checkpoint(args, step, position, model, opt, sched, rank, world):
    """<save-dir>/step_N: one file per rank plus meta.json, written in a temporary folder and renamed, so a
    crash during a save never harms the last good checkpoint. Keeps the last --keep-last."""
    root = Path(args.save_dir)
    final, tmp = root / f"step_{step:08d}", root / f".step_{step:08d}.tmp"
    if final.exists():
        return
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(world)
    state = {"model": {n: t.detach().clone() for n, t in shard.local_tensors(model).items()},
             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
             "position": position, "rng": torch.get_rng_state(), "python_rng": random.getstate()}
    torch.save(state, tmp / f"rank{rank}.pt")
    barrier(world)
    if rank == 0:
        meta = {"step": step, "world_size": world, "sharding": args.sharding if world > 1 else "none",
                "shard_unit": args.shard_unit if world > 1 and args.sharding == "own" else None,
                "optimizer": args.optimizer}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        os.replace(tmp, final)
        for old in sorted(root.glob("step_*"))[:-args.keep_last]:
            shutil.rmtree(old)
    barrier(world)


def load_checkpoint(args, path, model, opt, sched, rank, world):
    """Restore a checkpoint of save_checkpoint(); check that it fits this run before touching anything."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--resume {path}: not a checkpoint folder of train.py (meta.json unreadable: {e})")
    sharding = args.sharding if world > 1 else "none"
    unit = args.shard_unit if world > 1 and args.sharding == "own" else None
    if (meta["world_size"], meta["sharding"], meta["shard_unit"]) != (world, sharding, unit):
        raise SystemExit(f"--resume {path} was saved by {meta['world_size']} rank(s) with sharding "
                         f"{meta['sharding']} (unit {meta['shard_unit']}); this run has {world} rank(s) with "
                         f"sharding {sharding} (unit {unit}). Resume with the same --nproc_per_node, --sharding "
                         f"and --shard-unit; the checkpoint is left untouched.")
    if meta["optimizer"] != args.optimizer:
        raise SystemExit(f"--resume {path} was saved with --optimizer {meta['optimizer']}, this run has "
                         f"--optimizer {args.optimizer}")
    try:
        state = torch.load(path / f"rank{rank}.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or corrupt file
        raise SystemExit(f"--resume {path}: cannot read rank{rank}.pt ({e}); the checkpoint is corrupt")
    saved = {n: tuple(t.shape) for n, t in state["model"].items()}
    wanted = {n: tuple(t.shape) for n, t in shard.local_tensors(model).items()}
    if saved != wanted:
        wrong = sorted(n for n in saved.keys() | wanted.keys() if saved.get(n) != wanted.get(n))[:5]
        raise SystemExit(f"--resume {path} holds a different model than --model / --ckpt describe "
                         f"(first differences: {wrong}); pass the flags of the run that saved it")
    with torch.no_grad():
        for name, t in shard.local_tensors(model).items():
            t.copy_(state["model"][name])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    random.setstate(state["python_rng"])
    return state["step"], tuple(state["position"])


def barrier(world):
    if world > 1:
        dist.barrier()


def export(args, model, margs, rank):
    """Stream the model out unit by unit through model.py's writers; only rank 0 writes."""
    names = list(param_shapes(margs))
    units = [[n for n in names if not n.startswith("layers.") and n != "tok_embeddings.weight"]]
    units = [["tok_embeddings.weight"]] + [[n for n in names if n.startswith(f"layers.{i}.")]
                                           for i in range(margs.n_layers)] + units
    writer = (MetaWriter if args.export_format == "meta" else HFWriter)(args.export, margs) if rank == 0 else None
    for tensors in shard.full_units(model, units):
        if writer:
            writer.write(tensors)
    if writer:
        writer.close()


# ------------------------------------------------------------------------------------------------- main

def load_examples(args, split, n):
    if args.task == "synthetic":
        return data.synthetic_task(n, seed=args.seed + (split == "val"))
    if args.task == "jsonl":
        examples = data.load_jsonl(os.path.join(args.data_dir, f"{split}.jsonl"))
        n = n or len(examples)
    else:
        examples = superglue.load_task(args.task, args.data_dir, split)
    if args.sampling == "paper":
        return data.paper_subset(examples, n)
    return data.group_subset(examples, n, args.seed)


def log(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        return print_plan(args)
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
    """Train, evaluate, predict and export, as the flags say; returns the final validation metrics."""
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tok = load_tokenizer(args, rank, world)
    margs = model_args(args, tok)
    if args.max_len > margs.max_seq_len:
        raise SystemExit(f"--max-len {args.max_len} exceeds the model's max_seq_len {margs.max_seq_len}")
    task = args.task.lower()
    train_set = load_examples(args, "train", args.train_samples) if args.epochs else []
    val_set = load_examples(args, "val", args.eval_samples)
    train_seqs = [data.encode_train(tok, ex, args.max_len) for ex in train_set]
    # the test split; RTE's model also predicts the diagnostics AX-b and AX-g. Read now: bad files fail before training
    predict_sets = {task: superglue.load_task(task, args.data_dir, "test")} if args.predict else {}
    if args.predict and task == "rte":
        predict_sets.update(superglue.load_diagnostics(args.data_dir))
    for ex in val_set + [ex for examples in predict_sets.values() for ex in examples]:
        data.fit_prompt(tok, ex, args.max_len)  # an example too long for --max-len fails now, not after training
    model = build_model(args, margs, rank, world, device, dtype)
    opt = build_optimizer(args, model, world)
    steps_per_epoch = -(-len(train_set) // (args.batch_size * world))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args, max(1, args.epochs * steps_per_epoch)))
    step, position = 0, (0, 0)
    if args.resume:
        step, position = load_checkpoint(args, args.resume, model, opt, sched, rank, world)
    os.makedirs(args.save_dir, exist_ok=True)
    metrics_path = os.path.join(args.save_dir, "metrics.jsonl")

    def run_eval():
        scores = evaluate(model, tok, val_set, args, rank, world, device)
        if task == "jsonl":
            metrics = data.answer_metrics(tok, val_set, scores, args.max_len)
        else:
            metrics = superglue.compute_metrics(task, val_set, data.predict(val_set, scores))
        if rank == 0:
            log(metrics_path, {"step": step, "split": "val", "task": task, **metrics})
        return metrics

    bar = tqdm(total=args.epochs * steps_per_epoch, initial=step, disable=rank != 0, desc="train")
    losses = []
    for epoch in range(position[0], args.epochs):
        batches = data.epoch_batches(len(train_set), args.batch_size, world, rank, args.seed, epoch)
        for b in range(position[1] if epoch == position[0] else 0, len(batches)):
            seqs = [train_seqs[i] for i in batches[b]] or [([tok.bos_id, tok.eos_id], [-100, -100])]  # dropped work
            tokens, labels = data.collate(seqs, tok.pad_id)
            start = time.perf_counter()
            loss, row = train_step(args, model, opt, tokens.to(device), labels.to(device), world)
            n_real = all_reduce(sum(len(train_seqs[i][0]) for i in batches[b]), world)  # padding excluded
            lr = opt.param_groups[0]["lr"]  # the rate this step used
            sched.step()
            step += 1
            losses.append(loss)
            row = {"step": step, "loss": loss, "lr": lr, **row,
                   "tokens_per_s": n_real / (time.perf_counter() - start), "peak_mem_gib": peak_memory_gib(device)}
            if rank == 0:
                log(metrics_path, {k: v for k, v in row.items() if v is not None})
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}",
                                mem=f"{row['peak_mem_gib']:.1f}G")
            if args.eval_every and step % args.eval_every == 0:
                run_eval()
            if args.save_every and step % args.save_every == 0:
                save_checkpoint(args, step, (epoch, b + 1), model, opt, sched, rank, world)
    bar.close()
    if args.epochs:
        save_checkpoint(args, step, (args.epochs, 0), model, opt, sched, rank, world)
    metrics = run_eval()
    for name, examples in predict_sets.items():
        preds = data.predict(examples, evaluate(model, tok, examples, args, rank, world, device))
        if rank == 0:
            print("predictions:", superglue.write_predictions(name, examples, preds, args.save_dir))
    missing = [f"{superglue.TASK_DIRS[name]}/{superglue.TASK_DIRS[name]}.jsonl" for name in superglue.DIAGNOSTICS
               if args.predict and task == "rte" and name not in predict_sets]
    if rank == 0 and missing:
        print(f"no {' or '.join(missing)} in --data-dir {args.data_dir}: a full leaderboard submission needs "
              "their predictions too")
    if args.export:
        export(args, model, margs, rank)
    if rank == 0:
        trained = ""
        if losses:
            first, last = sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:])
            trained = f", loss {first:.3f} -> {last:.3f} (mean of the first / last 10 steps)"
        print(f"done: {step} steps{trained}; val " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
              + f"; metrics in {metrics_path}")
    return metrics


if __name__ == "__main__":
    main()
