"""train.py's command line: every flag, its default for each task and mode, and the checks on its value, all
made before anything is loaded (a wrong value is one line naming the flag, from argparse)."""
import argparse
import os

import torch

import shard
import superglue
from lomo import CLIP_SCOPES
from lora import parse_targets
from model import MODEL_NAMES

DESCRIPTION = ("Full-parameter fine-tuning of LLaMA with LOMO (Lv et al. 2023) on SuperGLUE, from a laptop CPU "
               "to 8 GPUs.")
OPTIMIZERS = ("lomo", "adalomo", "sgd", "adamw", "lora")
# Defaults of the flags left unset. SuperGLUE: the official LOMO config (OpenLMLab/LOMO config/args_lomo.yaml).
# The demo: what makes the tiny model learn the synthetic task with LOMO in about a minute on a CPU; its batch is
# DEMO_GLOBAL_BATCH split over the ranks, so that any number of ranks dividing it trains the same steps.
# --dry-run: batch 1 x 1024 tokens per rank, the setting of the 65B memory budget in the README.
# --task jsonl (your own data): the SuperGLUE settings, on every row of the files.
SUPERGLUE = dict(lr=0.03, epochs=10, batch_size=16, train_samples=1000, eval_samples=1000, warmup_ratio=0.1,
                 clip_grad_norm=1.0, max_len=1024)
DEFAULTS = {"superglue": SUPERGLUE,
            "dry_run": dict(SUPERGLUE, batch_size=1, clip_grad_norm=0.0),  # shared/design/sharded-step.md
            "synthetic": dict(lr=0.3, epochs=2, train_samples=20000, eval_samples=1000, warmup_ratio=0.0,
                              clip_grad_norm=0.0, max_len=64),
            "jsonl": dict(SUPERGLUE, train_samples=None, eval_samples=None)}
# Over those, for the LoRA baseline (--optimizer lora) and LoRA + LOMO (lomo or adalomo with --lora-rank). SuperGLUE
# and jsonl: the official LoRA runs (config/args_lomo_lora.yaml): the adapters' AdamW at 5e-4 and LOMO beside them at
# 0.005 with clip_grad_norm 1.0, both with 5% warm-up; lora_only (the baseline) clips nothing. The demo: what makes
# the tiny model learn the synthetic task.
LORA_DEFAULTS = {"superglue": {"lora": dict(lora_lr=5e-4, warmup_ratio=0.05, clip_grad_norm=0.0),
                               "lora+lomo": dict(lora_lr=5e-4, lr=0.005, warmup_ratio=0.05, clip_grad_norm=1.0)},
                 "synthetic": {"lora": dict(lora_lr=1e-2), "lora+lomo": dict(lora_lr=1e-3)}}
LORA_DEFAULTS["jsonl"] = LORA_DEFAULTS["dry_run"] = LORA_DEFAULTS["superglue"]
LORA_FLAGS = dict(lora_alpha=16.0, lora_dropout=0.05, lora_targets="wq,wv")  # the official runs' (peft's LoraConfig)
DEMO_GLOBAL_BATCH = 16
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default; those that depend on the task (None here) are listed in the epilog."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def parse_args(argv=None):
    shown = lambda flags: ", ".join(f"--{k.replace('_', '-')} {'all' if v is None else v}"  # noqa: E731
                                    for k, v in flags.items())
    by_task = "; ".join(f"{kind}: {shown(flags)}" for kind, flags in DEFAULTS.items())
    lora = "; ".join(f"{kind} {mode}: {shown(flags)}" for kind in ("superglue", "synthetic")
                     for mode, flags in LORA_DEFAULTS[kind].items())
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=DefaultsShown,
                                epilog=f"Defaults that depend on the task (the official LOMO config for SuperGLUE "
                                f"and jsonl, the CPU demo for synthetic): {by_task}; the demo's --batch-size is "
                                f"{DEMO_GLOBAL_BATCH} / the number of ranks. With LoRA (the official LoRA runs' "
                                f"settings for SuperGLUE and jsonl), over those: {lora}; and {shown(LORA_FLAGS)}, "
                                "--lora-rank 2 with --optimizer lora.")
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
                   help="sgd and adamw are the paper's unfused baselines (fp32 master weights over 16-bit); lora "
                   "trains LoRA adapters alone (the LoRA baseline); lomo or adalomo with --lora-rank: LoRA + LOMO")
    p.add_argument("--lr", type=float, help="peak learning rate of the model's weights")
    p.add_argument("--lora-rank", type=int, help="r of the LoRA adapters (0: none); with lomo or adalomo, LoRA + "
                   "LOMO")
    p.add_argument("--lora-alpha", type=float, help="the adapters' update is scaled by alpha / r")
    p.add_argument("--lora-dropout", type=float, help="dropout on the adapters' input")
    p.add_argument("--lora-targets", help="the projections with adapters, comma-separated: wq,wk,wv,wo,w1,w2,w3")
    p.add_argument("--lora-lr", type=float, help="the adapters' peak learning rate (AdamW)")
    p.add_argument("--epochs", type=int, help="0 only evaluates (the paper's zero-shot row)")
    p.add_argument("--batch-size", type=int, help="sequences per rank and step")
    p.add_argument("--lr-schedule", default="linear", choices=("linear", "cosine", "constant"), help="after warm-up")
    p.add_argument("--warmup-ratio", type=float, help="fraction of the steps spent warming up")
    p.add_argument("--clip-grad-norm", type=float, help="L2 norm clipping, 0 for none; with the global scope "
                   "LOMO then runs 2 backward passes")
    p.add_argument("--clip-grad-norm-scope", default="global", choices=CLIP_SCOPES, help="global: one norm over "
                   "all gradients; tensor: each parameter clipped by its own norm (grouped clipping, 1 pass)")
    p.add_argument("--clip-grad-value", type=float, help="clamp each gradient element to +-value")
    p.add_argument("--clip-loss-value", type=float, help="clamp each token's loss to at most this value before "
                   "the mean: such a token gives no gradient")
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled")
    p.add_argument("--stochastic-rounding", action="store_true", help="round bf16 updates stochastically")
    p.add_argument("--dtype", choices=DTYPES, help="default: bf16 on GPU (and for --dry-run), fp32 on CPU")
    p.add_argument("--seed", type=int, default=42, help="data sampling and order, random init")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end only)")
    p.add_argument("--save-dir", default="out", help="one run's metrics.jsonl, checkpoints and predictions; new or "
                   "empty unless resuming")
    p.add_argument("--overwrite", action="store_true", help="delete the files an earlier run left in --save-dir, "
                   "or the checkpoints after --resume's")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end only)")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints kept in --save-dir")
    p.add_argument("--resume", help="a checkpoint folder (step_N) to continue from, on any number of ranks")
    p.add_argument("--export", help="write the trained model to this new folder at the end")
    p.add_argument("--export-format", default="meta", choices=("meta", "hf"), help="Meta's or Hugging Face's")
    p.add_argument("--predict", action="store_true", help="write test-split predictions (SuperGLUE format; "
                   "--task rte adds the diagnostics AX-b and AX-g)")
    p.add_argument("--dry-run", action="store_true", help="print the memory and communication plan, then exit")
    p.add_argument("--world-size", type=int, default=1, help="ranks assumed by --dry-run")
    p.add_argument("--gpu-gib", type=float, default=24.0, help="GPU memory that --dry-run checks the plan against")
    p.add_argument("--sharding", default="own", choices=("own", "fsdp2"), help="own: shard.py; fsdp2: PyTorch's")
    p.add_argument("--shard-unit", default="block", choices=shard.SHARD_UNITS, help="what is gathered at once")
    args = p.parse_args(argv)
    args.task = args.task.lower()
    kind = "dry_run" if args.dry_run else args.task if args.task in ("synthetic", "jsonl") else "superglue"
    check_lora(p, args)
    lora_mode = ("lora" if args.optimizer == "lora" else "lora+lomo") if args.lora_rank else None
    for flag, value in {**DEFAULTS[kind], **(LORA_DEFAULTS[kind][lora_mode] if lora_mode else {})}.items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    if args.optimizer == "lora":
        args.lr = None  # no weight of the model is trained
    if args.batch_size is None:  # the demo: a global batch of 16 whatever the number of ranks
        world = int(os.environ.get("WORLD_SIZE", 1))
        if DEMO_GLOBAL_BATCH % world:
            p.error(f"the demo's global batch of {DEMO_GLOBAL_BATCH} does not split over {world} ranks: pass "
                    f"--batch-size (sequences per rank), or run on a number of ranks that divides {DEMO_GLOBAL_BATCH}")
        args.batch_size = DEMO_GLOBAL_BATCH // world
    args.model = args.model or ("tiny" if not args.ckpt else None)
    if args.model is not None and args.model.lower() not in MODEL_NAMES:
        p.error(f"--model {args.model!r} is unknown: choose one of {', '.join(MODEL_NAMES)}")
    if args.task not in ("synthetic", "jsonl") and args.task not in superglue.TASKS:
        p.error(f"--task {args.task!r} is unknown: choose synthetic, jsonl or one of {', '.join(superglue.TASKS)}")
    if args.task != "synthetic" and not args.dry_run and not (args.data_dir and os.path.isdir(args.data_dir)):
        needs = ("train.jsonl and val.jsonl (see the README for their format)" if args.task == "jsonl" else
                 f"{superglue.TASK_DIRS.get(args.task, '')}/ (see the README for the download)")
        p.error(f"--data-dir {args.data_dir!r} is not a folder: --task {args.task} needs the folder that holds "
                + needs)
    if args.predict and args.task in ("synthetic", "jsonl"):
        p.error(f"--predict writes SuperGLUE test predictions; --task {args.task} has no test split")
    check_numbers(p, args)
    args.clip_grad_norm = args.clip_grad_norm or None
    return args


def check_lora(p, args):
    """LoRA's flags: only in a LoRA mode, and in range; the official runs' settings for those left unset."""
    if args.lora_rank is None:
        args.lora_rank = 2 if args.optimizer == "lora" else 0
    if args.optimizer in ("sgd", "adamw") and args.lora_rank:
        p.error(f"--lora-rank: LoRA trains with --optimizer lora (the adapters alone) or lomo / adalomo (LoRA + "
                f"LOMO), not with {args.optimizer}")
    if not args.lora_rank >= (1 if args.optimizer == "lora" else 0):
        p.error(f"--lora-rank must be at least {1 if args.optimizer == 'lora' else 0}, not {args.lora_rank}")
    given = [flag for flag in ("lora_lr", *LORA_FLAGS) if getattr(args, flag) is not None]
    if not args.lora_rank:
        if given:
            p.error(f"--{given[0].replace('_', '-')} needs LoRA: pass --lora-rank (LoRA + LOMO) or --optimizer lora")
        return
    if args.optimizer == "lora" and (args.lr is not None or args.weight_decay):
        p.error(f"--{'lr' if args.lr is not None else 'weight-decay'} is for the model's weights, which --optimizer "
                "lora freezes: the adapters' rate is --lora-lr (their AdamW has no weight decay, as the official runs)")
    for flag, value in LORA_FLAGS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    try:
        args.lora_targets = ",".join(parse_targets(args.lora_targets))
    except ValueError as e:
        p.error(f"--lora-targets {args.lora_targets!r}: {e}")
    if not 0 <= args.lora_dropout < 1:
        p.error(f"--lora-dropout is a probability, from 0 to less than 1, not {args.lora_dropout}")


def check_numbers(p, args):
    """Every numeric flag in its range (written so that NaN fails too)."""
    at_least = {"batch_size": 1, "train_samples": 1, "eval_samples": 1, "max_len": 1, "world_size": 1,
                "keep_last": 1, "epochs": 0, "save_every": 0, "eval_every": 0, "weight_decay": 0,
                "clip_grad_norm": 0}
    for flag, low in at_least.items():
        if getattr(args, flag) is not None and not getattr(args, flag) >= low:  # None: all (--task jsonl)
            p.error(f"--{flag.replace('_', '-')} must be at least {low}, not {getattr(args, flag)}")
    positive = ("lr", "gpu_gib", "clip_grad_value", "clip_loss_value", "lora_alpha", "lora_lr")
    for flag in positive:  # None: unset, or not used in this mode
        if getattr(args, flag) is not None and not getattr(args, flag) > 0:
            p.error(f"--{flag.replace('_', '-')} must be greater than 0, not {getattr(args, flag)}")
    if not 0 <= args.warmup_ratio <= 1:
        p.error(f"--warmup-ratio is a fraction of the steps, from 0 to 1, not {args.warmup_ratio}")
