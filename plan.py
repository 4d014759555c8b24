"""The memory and communication plan of one training step, per rank: what `train.py --dry-run` prints.

These are estimates from the model's shapes (built on the 'meta' device, nothing allocated); bench.py measures.
Memory is in GiB (2^30 bytes), as in the paper's Table 1 (which writes GB for GiB).
"""
from checkpoint import open_checkpoint
from formats import CheckpointError
from lora import TARGETS
from model import ModelArgs, param_shapes

GiB = 2 ** 30
PAPER_TABLE_1 = {"adamw": 102.20, "sgd": 51.99, "lomo": 14.58}  # LLaMA-7B, GiB


def sizes(margs: ModelArgs) -> dict:
    """Element counts: the whole model (a tied weight once), its largest tensor, the largest unit of each sharding
    choice, and the tied weight (0 if untied)."""
    shapes = param_shapes(margs)
    numels = {name: s.numel() for name, s in shapes.items()}
    block = sum(n for name, n in numels.items() if name.startswith("layers.0."))
    embed, head = numels["tok_embeddings.weight"], numels["norm.weight"] + numels.get("output.weight", 0)
    return {"total": sum(numels.values()), "largest": max(numels.values()), "tied": embed * margs.tie_embeddings,
            "unit": {"block": max(block, embed, head), "linear": max(numels.values())},
            "adalomo_state": sum(s[0] + s[1] if len(s) == 2 else s[0] for s in shapes.values())}


def lora_shapes(margs: ModelArgs, targets=("wq", "wv")) -> list:
    """(out, in) of each projection of one block that has an adapter."""
    shapes = param_shapes(margs)
    return [tuple(shapes[f"layers.0.{TARGETS[t]}.{t}.weight"]) for t in targets]


def lora_numel(margs: ModelArgs, rank: int, targets=("wq", "wv")) -> int:
    """Elements of LoRA adapters of rank r on `targets` in every block: A (r, in) and B (out, r) per projection."""
    return margs.n_layers * sum(rank * (out + in_) for out, in_ in lora_shapes(margs, targets))


def activations(margs: ModelArgs, batch: int, seq_len: int, nbytes: int, lora_targets=()) -> float:
    """Bytes of activations with per-block activation checkpointing: every block's saved input, plus the larger
    of one block's recomputed activations during its backward and the logits with their fp32 log-softmax and
    gradient (these two never coexist). An adapter adds to its block what its backward pass needs: its input after
    dropout, in fp32, and the dropout mask (5 bytes per token and input feature)."""
    tokens = batch * seq_len
    kv_dim = margs.kv_heads * margs.head_dim
    saved_inputs = margs.n_layers * tokens * margs.dim * nbytes
    one_block = tokens * (nbytes * (9 * margs.dim + 4 * kv_dim + 4 * margs.hidden_dim) + 4 * (5 * margs.dim + kv_dim))
    one_block += tokens * sum(5 * in_ for _, in_ in lora_shapes(margs, lora_targets))
    logits = tokens * margs.vocab_size * (nbytes + 8)
    return saved_inputs + max(one_block, logits)


def plan(margs, optimizer="lomo", world=1, batch=1, seq_len=1024, nbytes=2, unit="block", sharding="own",
         check_pass=False, lora_rank=0, lora_targets=("wq", "wv")) -> dict:
    """Per-rank GiB of parameters, gradients, optimizer state, activations and gathered units; collective bytes.

    world == 1: no sharding. LOMO keeps one gradient alive (the largest tensor's). sgd / adamw keep every
    gradient, plus fp32 master weights (4 bytes / param) and, for AdamW, two fp32 moments (8 more), over 16-bit
    weights. A tied weight's gradient waits from the output layer's backward to the embedding's, where the two
    are summed: one more gradient of its size (its shard, with the hand-written sharding). Sharded: everything
    persistent is divided by the world size; a rank also holds the full weights of the unit being computed (and
    the prefetched next one, with block units) and that unit's full gradients.
    LoRA (lora_rank > 0; optimizer "lora": the model's weights frozen, with no gradient at all): every rank holds
    all the adapters in fp32, their gradients until AdamW steps, and AdamW's two fp32 moments: 16 bytes each.
    Collectives per rank and step (ring algorithms send (W-1)/W of the data): block units are gathered in the
    forward and again in each backward pass, and reduce-scattered in each backward pass; linear units are
    gathered once more per backward pass, for the block's recompute. clip_grad_norm and fp16 add a pass. LoRA
    adds one all-reduce of the adapters' gradients (a ring sends twice the data); "lora" reduce-scatters nothing.
    """
    s, W = sizes(margs), world
    P = s["total"]
    master = 4 if nbytes < 4 else 0
    state = {"lomo": 0, "adalomo": 4 * s["adalomo_state"], "sgd": master * P, "adamw": (master + 8) * P,
             "lora": 0}[optimizer]
    fused, trained = optimizer in ("lomo", "adalomo"), optimizer != "lora"
    lora = lora_numel(margs, lora_rank, lora_targets)
    unit_numel = s["unit"]["block" if sharding == "fsdp2" else unit]
    if W == 1:
        grads, gathered = ((s["largest"] if fused else P) + s["tied"]) * nbytes * trained, 0
    else:  # FSDP2 holds the tied gradient in its root unit's, which unit_numel counts
        grads = (unit_numel + (0 if fused else P / W) + (s["tied"] / W if sharding == "own" else 0)) * nbytes * trained
        gathered = (2 if unit == "block" or sharding == "fsdp2" else 1) * unit_numel * nbytes
    passes = 2 if check_pass and fused else 1
    gathers_per_pass = 2 if unit == "linear" and sharding == "own" else 1
    sends = 0 if W == 1 else ((1 + passes * (gathers_per_pass + trained)) * P * nbytes + 2 * 4 * lora) * (W - 1) / W
    targets = lora_targets if lora_rank else ()
    row = {"params": P * nbytes / W + 4 * lora, "grads": grads + 4 * lora, "optimizer_state": state / W + 8 * lora,
           "activations": activations(margs, batch, seq_len, nbytes, targets), "gathered": gathered}
    row = {k: v / GiB for k, v in row.items()}
    row["total"] = sum(row.values())
    row["sent_gib_per_step"] = sends / GiB
    return row


def print_plan(args):
    """The --dry-run report for train.py's arguments."""
    try:
        margs = ModelArgs.from_name(args.model) if args.model else open_checkpoint(args.ckpt).args
    except (CheckpointError, FileNotFoundError) as e:
        raise SystemExit(f"--ckpt: {e}") from None
    nbytes = {"bf16": 2, "fp16": 2, "fp32": 4}[args.dtype or "bf16"]
    check = bool(args.clip_grad_norm) and args.clip_grad_norm_scope == "global" or args.dtype == "fp16"
    common = dict(batch=args.batch_size, seq_len=args.max_len, nbytes=nbytes, check_pass=check)
    print(f"model {args.model or args.ckpt}: {sizes(margs)['total']:,} parameters; {args.dtype or 'bf16'}, batch {args.batch_size}"
          f" x {args.max_len} tokens per rank, {args.world_size} rank(s). Estimates per rank, GiB:")
    cols = ("params", "grads", "optimizer_state", "activations", "gathered", "total", "sent_gib_per_step")
    header = f"{'':>16}" + "".join(f"{c.replace('_gib_per_step', '/step').replace('optimizer_', 'opt '):>12}" for c in cols)
    lora = dict(lora_rank=args.lora_rank or 2, lora_targets=tuple((args.lora_targets or "wq,wv").split(",")))
    adapters = f"LoRA r {lora['lora_rank']} on {','.join(lora['lora_targets'])}"
    if args.world_size == 1:
        print(header)
        for name, opt in (("adamw", "adamw"), ("sgd", "sgd"), ("lomo", "lomo"), ("adalomo", "adalomo"),
                          ("lora", "lora"), ("lora+lomo", "lomo")):
            row = plan(margs, opt, 1, **common, **(lora if name.startswith("lora") else {}))
            paper = f"   paper: {PAPER_TABLE_1[opt]}" if args.model == "7b" and name in PAPER_TABLE_1 else ""
            print(f"{name:>16}" + "".join(f"{row[c]:>12.2f}" for c in cols) + paper)
        print(f"lora, lora+lomo: {adapters}, in fp32, trained by AdamW (16 bytes per adapter parameter)")
        return
    print(f"optimizer {args.optimizer}{' with ' + adapters if args.lora_rank else ''}; 'fits' means total <= "
          f"--gpu-gib {args.gpu_gib}\n" + header)
    for sharding, unit in (("own", "block"), ("own", "linear"), ("fsdp2", "block")):
        row = plan(margs, args.optimizer, args.world_size, unit=unit, sharding=sharding, **common,
                   **(lora if args.lora_rank else {}))
        fits = "fits" if row["total"] <= args.gpu_gib else "does NOT fit"
        print(f"{sharding + ' / ' + unit:>16}" + "".join(f"{row[c]:>12.2f}" for c in cols) + f"   {fits}")

