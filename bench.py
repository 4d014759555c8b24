"""Peak memory and speed of LOMO against the floor, SGD, AdamW and LoRA; hand-written sharding against FSDP2.

    python bench.py                                    # CPU: a 134M-parameter LLaMA, fp32, every method
    python bench.py --model 7b --dtype bf16            # one GPU: the paper's Table 1 setting
    torchrun --nproc_per_node 2 bench.py --sharded     # shard.py against FSDP2: time, memory, collective bytes
    python bench.py --methods eval,eval-hf             # candidate scoring against transformers' LlamaForCausalLM

Every method runs the same batch for a few warm-up steps, then several timed steps (tokens/s is the median).
Peak memory: on GPU torch.cuda.max_memory_allocated; on CPU the live tensor storage bytes counted by
measure.TensorMemoryTracker over the warm-up steps (the timed steps run untracked, so the tracker costs no time).
Each method runs in a fresh process (this file again, with --methods <one>), so no method inherits another's
leftovers. A method that does not fit is reported as OOM and the others still run: on GPU when CUDA runs out of
memory, on CPU when the plan's estimate (plan.py) exceeds --mem-limit-gib, so the shared machine never swaps.
The floor is forward + backward with every gradient dropped as it arrives: no method that updates the weights
can be faster, nor use less memory. lora is the LoRA baseline (AdamW on adapters, the weights frozen), lora-lomo
LoRA + LOMO (the same adapters beside LOMO on every weight, in one backward pass); both with the official
adapters: r 2 on wq and wv, alpha 16, dropout 0.05.
The eval methods score candidate answers as train.py's evaluation does (eval), and as a plain transformers loop
does (eval-hf), in this process: after a warm-up pass each (memory), they take turns for the timed passes
(bench_eval.py).
"""
import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys

import torch
import torch.distributed as dist

import shard
from bench_eval import EVAL_METHODS, print_eval, run_evals
from lomo import LOMO, AdaLomo
from lora import LoRA
from flags import DTYPES
from measure import BENCH_MODELS, device_name, memory_how, model_args, peak_memory, random_batch, random_model, timed
from model import MODEL_NAMES, cross_entropy
from optimizers import LORA_ADAMW, MasterAdamW, MasterSGD
from plan import GiB, plan, sizes
from train import RandomWeights, close_distributed

METHODS = ("floor", "lomo", "lomo-clip", "lomo-clip-tensor", "adalomo", "sgd", "sgd-mixed", "adamw", "adamw-mixed",
           "lora", "lora-lomo")
LORA = dict(rank=2, alpha=16.0, dropout=0.05, targets=("wq", "wv"))  # the official LoRA runs' adapters
REALDATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "realdata")


# ------------------------------------------------------------------------------------------ one method

def estimate_gib(method, margs, batch, seq_len, nbytes):
    """plan.py's estimate of a method's peak (one rank). sgd / adamw without master weights keep every gradient
    (and AdamW's two moments) in the weights' dtype."""
    base = plan(margs, "lomo", 1, batch, seq_len, nbytes)["total"]
    P = sizes(margs)["total"]
    if method in ("sgd", "adamw"):
        return base + P * nbytes * (1 if method == "sgd" else 3) / GiB
    if method.startswith("lora"):
        return plan(margs, "lora" if method == "lora" else "lomo", 1, batch, seq_len, nbytes,
                    lora_rank=LORA["rank"], lora_targets=LORA["targets"])["total"]
    optimizer = {"adalomo": "adalomo", "sgd-mixed": "sgd", "adamw-mixed": "adamw"}.get(method, "lomo")
    return plan(margs, optimizer, 1, batch, seq_len, nbytes, check_pass=method == "lomo-clip")["total"]


def make_step(method, params, lr=1e-4, process_group=None, adapters=()):
    """step(loss) for `method`: backward plus update (none for the floor). adapters: LoRA's parameters, for lora
    and lora-lomo."""
    if method.startswith("lora"):
        adamw = torch.optim.AdamW(adapters, lr=lr, **LORA_ADAMW)
        if method == "lora":
            backward = torch.autograd.backward  # the weights are frozen
        else:
            lomo = LOMO(params, lr=lr, process_group=process_group)
            lomo.add_external_params(adapters)
            backward = lomo.fused_backward

        def lora_step(loss):
            backward(loss)
            adamw.step()
            adamw.zero_grad()
        return lora_step
    if method == "floor":
        for p in params:  # drop each gradient as it arrives
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        return lambda loss: loss.backward()
    if method in ("lomo", "lomo-clip", "lomo-clip-tensor", "adalomo"):
        cls = AdaLomo if method == "adalomo" else LOMO
        clip = 1.0 if method.startswith("lomo-clip") else None
        scope = "tensor" if method == "lomo-clip-tensor" else "global"  # tensor: grouped clipping, one pass
        opt = cls(params, lr=lr, clip_grad_norm=clip, clip_grad_norm_scope=scope, process_group=process_group)
        return opt.fused_backward
    cls = {"sgd": torch.optim.SGD, "sgd-mixed": MasterSGD, "adamw": torch.optim.AdamW, "adamw-mixed": MasterAdamW}
    opt = cls[method](params, lr=lr)

    def step(loss):
        loss.backward()
        opt.step()
        opt.zero_grad()  # MasterSGD / MasterAdamW already freed them; torch's optimizers free them here
    return step


def run_method(method, margs, dtype, device, batch, seq_len, warmup, steps, seed=0) -> dict:
    """Build the model, run `warmup` tracked steps (memory) and `steps` timed ones (speed), in this process."""
    model = random_model(margs, dtype, device)
    tokens = random_batch(margs, batch, seq_len, device, seed)
    params, adapters = list(model.parameters()), []
    if method.startswith("lora"):
        lora = LoRA(margs, **LORA).to(device)
        lora.attach(model)
        adapters = list(lora.parameters())
        if method == "lora":
            model.requires_grad_(False)

    def one_step():
        step(cross_entropy(model(tokens), tokens))

    with peak_memory(device, params + adapters + [tokens]) as mem:
        step = make_step(method, params, adapters=adapters)
        for _ in range(max(1, warmup)):
            one_step()
    times = [timed(one_step, device) for _ in range(steps)]
    return {"method": method, "peak_gib": mem["gib"], "step_s": statistics.median(times),
            "tokens_per_s": batch * seq_len / statistics.median(times)}


def run_isolated(method, args) -> dict:
    """This file again, in a fresh process, for one method; its JSON row, or an error row."""
    cmd = [sys.executable, os.path.abspath(__file__), "--methods", method, "--isolate", "none", "--json",
           "--model", args.model, "--dtype", args.dtype, "--batch-size", str(args.batch_size), "--seq-len",
           str(args.seq_len), "--warmup", str(args.warmup), "--steps", str(args.steps), "--mem-limit-gib",
           str(args.mem_limit_gib)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"method": method, "error": f"exit {proc.returncode}: " + proc.stderr.strip()[-300:]}
    return json.loads(proc.stdout)["results"][0]


def bench_methods(args, device) -> list:
    margs, dtype = model_args(args.model), DTYPES[args.dtype]
    rows = []
    train_methods = [m for m in args.methods if m not in EVAL_METHODS]
    for method in train_methods:
        estimate = estimate_gib(method, margs, args.batch_size, args.seq_len, dtype.itemsize)
        if device.type == "cpu" and estimate > args.mem_limit_gib:
            row = {"method": method, "oom": f"plan estimate {estimate:.2f} GiB > --mem-limit-gib {args.mem_limit_gib}"}
        elif args.isolate == "process" and len(train_methods) > 1:
            row = run_isolated(method, args)
        else:
            try:
                row = run_method(method, margs, dtype, device, args.batch_size, args.seq_len, args.warmup, args.steps)
            except torch.OutOfMemoryError as e:
                row = {"method": method, "oom": str(e).split("\n")[0][:200]}
        rows.append({**row, "estimate_gib": estimate})
        print(f"[bench] {json.dumps(rows[-1])}", file=sys.stderr, flush=True)  # progress, in case of a timeout
    if eval_methods := [m for m in args.methods if m in EVAL_METHODS]:  # in this process: they take turns
        rows += run_evals(eval_methods, args, device)
    return rows


# ---------------------------------------------------------------------------------------------- sharded

class CollectiveCounter:
    """Bytes a rank sends per all-gather / reduce-scatter, counted by wrapping both names of each collective on
    torch.distributed. A ring sends (W-1)/W of the gathered (or reduced) buffer, as plan.py counts."""
    NAMES = ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single", "reduce_scatter_tensor")

    def __init__(self):
        self.bytes, self.calls, self._saved = 0, 0, {}

    def __enter__(self):
        for name in self.NAMES:
            if hasattr(dist, name):
                self._saved[name] = fn = getattr(dist, name)
                big = 0 if name.startswith("all_gather") else 1  # the full buffer: output, or reduced input
                setattr(dist, name, self._wrap(fn, big))
        return self

    def _wrap(self, fn, big):
        signature = inspect.signature(fn)

        def counted(*args, **kwargs):
            bound = signature.bind(*args, **kwargs).arguments
            world = dist.get_world_size(bound.get("group"))
            full = list(bound.values())[big]
            self.bytes += full.numel() * full.element_size() * (world - 1) / world
            self.calls += 1
            return fn(*args, **kwargs)
        return counted

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def predicted_sent_bytes(model, nbytes, passes=1) -> float:
    """Exact bytes per step for shard.py's block units: per unit, an all-gather in forward, and per backward
    pass an all-gather and a reduce-scatter, each of the padded flat buffer (world x chunk elements)."""
    return sum((1 + 2 * passes) * u.chunk * (u.world - 1) * nbytes for u in model.units())


def run_sharded(sharding, margs, dtype, device, batch, seq_len, warmup, steps, seed=0) -> dict:
    """One rank's numbers for LOMO on `sharding` ("own": shard.py with block units, or "fsdp2")."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if sharding == "own":
        model = shard.ShardedTransformer(margs, "block", dist.group.WORLD, device, dtype)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        model = shard.fsdp2_transformer(margs, init_device_mesh(device.type, (world,)), device, dtype)
    read = RandomWeights(margs, seed).read
    shard.load_rows(model, lambda name, rows: read(name, rows).to(device=device, dtype=dtype))
    tokens = random_batch(margs, batch, seq_len, device, seed + rank)
    n_tokens = world * batch * (seq_len - 1)  # the global token count: the loss is the mean over all ranks

    def one_step():
        step(cross_entropy(model(tokens), tokens, reduction="sum") / n_tokens)

    with peak_memory(device, list(model.parameters()) + [tokens]) as mem:
        step = make_step("lomo", list(model.parameters()), process_group=dist.group.WORLD)
        for _ in range(max(1, warmup)):
            one_step()
    times = []
    with CollectiveCounter() as counter:
        for _ in range(steps):
            dist.barrier()
            times.append(timed(one_step, device))
    row = {"sharding": sharding, "rank": rank, "peak_gib": mem["gib"], "step_s": statistics.median(times),
           "sent_gib_per_step": counter.bytes / steps / GiB, "collectives_per_step": counter.calls / steps,
           "plan_sent_gib_per_step": plan(margs, "lomo", world, batch, seq_len, dtype.itemsize, "block",
                                          sharding)["sent_gib_per_step"]}
    if sharding == "own":
        row["exact_sent_gib_per_step"] = predicted_sent_bytes(model, dtype.itemsize) / GiB
    return row


def bench_sharded(args, device) -> list:
    margs, dtype = model_args(args.model), DTYPES[args.dtype]
    rows = []
    for sharding in ("own", "fsdp2"):
        mine = run_sharded(sharding, margs, dtype, device, args.batch_size, args.seq_len, args.warmup, args.steps)
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        rows.append({**mine, "rank": None, "peak_gib": max(r["peak_gib"] for r in every),
                     "step_s": max(r["step_s"] for r in every)})
    return rows


# ------------------------------------------------------------------------------------------------ report

def print_methods(rows, args, device):
    margs = model_args(args.model)
    P = sizes(margs)["total"]
    print(f"model {args.model}: {P / 1e6:.0f}M parameters, {args.dtype}, batch {args.batch_size} x {args.seq_len} "
          f"tokens, {args.warmup} warm-up + {args.steps} timed steps, on {device_name(device)}")
    print(f"peak memory: {memory_how(device)}; tokens/s: median of the timed steps\n")
    floor = next((r for r in rows if r["method"] == "floor" and "peak_gib" in r), None)
    print(f"{'method':>16} {'peak GiB':>9} {'plan GiB':>9} {'tokens/s':>9} {'vs floor':>9}")
    for r in rows:
        if "peak_gib" not in r:
            print(f"{r['method']:>16} {'OOM' if 'oom' in r else 'ERROR':>9} {r['estimate_gib']:>9.4g}   "
                  + r.get("oom", r.get("error", "")))
            continue
        speed = f"{r['tokens_per_s'] / floor['tokens_per_s']:>9.2f}" if floor else f"{'':>9}"
        print(f"{r['method']:>16} {r['peak_gib']:>9.4g} {r['estimate_gib']:>9.4g} {r['tokens_per_s']:>9.1f} {speed}")
    if args.dtype == "fp32":
        print("\nfp32 weights: the -mixed methods' master weights are the weights themselves (no extra copy)")
    by = {r["method"]: r for r in rows if "peak_gib" in r}
    checks = []
    if "lomo" in by and "adamw-mixed" in by:
        checks.append(f"lomo / adamw-mixed peak memory = {by['lomo']['peak_gib'] / by['adamw-mixed']['peak_gib']:.3f}"
                      " (target <= 0.25; paper 0.14 at 7B)")
    if "lomo" in by and floor:
        checks.append(f"lomo peak / floor peak (params + activations) = {by['lomo']['peak_gib'] / floor['peak_gib']:.3f}"
                      " (target <= 1.15)")
        for name, target in (("lomo", 0.95), ("lomo-clip", 0.6)):
            if name in by:
                checks.append(f"{name} tokens/s / floor = {by[name]['tokens_per_s'] / floor['tokens_per_s']:.3f} "
                              f"(target >= {target})")
    print("\n".join(checks))


def print_sharded(rows, args, device):
    margs = model_args(args.model)
    print(f"model {args.model}: {sizes(margs)['total'] / 1e6:.1f}M parameters, {args.dtype}, LOMO, batch "
          f"{args.batch_size} x {args.seq_len} tokens per rank, {dist.get_world_size()} ranks on {device_name(device)}")
    print(f"peak memory per rank (the largest): {memory_how(device)}; step time: median of the timed steps "
          "(slowest rank)\n")
    print(f"{'sharding':>10} {'step s':>8} {'peak GiB':>9} {'sent GiB/step':>14} {'exact':>10} {'plan':>10}")
    for r in rows:
        exact = f"{r['exact_sent_gib_per_step']:>10.5f}" if "exact_sent_gib_per_step" in r else f"{'-':>10}"
        print(f"{r['sharding']:>10} {r['step_s']:>8.3f} {r['peak_gib']:>9.4f} {r['sent_gib_per_step']:>14.5f} "
              f"{exact} {r['plan_sent_gib_per_step']:>10.5f}")
    own, fsdp = rows
    print(f"\nown / fsdp2 step time = {own['step_s'] / fsdp['step_s']:.2f} (target <= 1.2); own / fsdp2 peak memory "
          f"= {own['peak_gib'] / fsdp['peak_gib']:.2f} (target <= 1)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help=f"{', '.join(BENCH_MODELS)} or a preset: {', '.join(MODEL_NAMES)} "
                   "(default: small on CPU, 7b on GPU)")
    p.add_argument("--dtype", choices=DTYPES, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per step (per rank with --sharded)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: 512 on GPU, 64 on CPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps, during which memory is measured (the "
                   "second holds the optimizer state that the first made)")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}; "
                   f"and candidate scoring: {', '.join(EVAL_METHODS)} (this project's; transformers', if installed)")
    p.add_argument("--mem-limit-gib", type=float, help="CPU only: methods whose plan estimate exceeds this are "
                   "reported as OOM without running (default: half the machine's memory)")
    p.add_argument("--isolate", default="process", choices=("process", "none"),
                   help="process: each training method in a fresh process; none: one after another in this one "
                   "(eval methods always run in this one, taking turns)")
    p.add_argument("--sharded", action="store_true", help="under torchrun: shard.py (block units) against FSDP2")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    superglue_dir = os.path.join(REALDATA, "superglue")
    real_tokenizer = os.path.join(REALDATA, "llama_tokenizer.model")
    has_realdata = os.path.isdir(superglue_dir) and os.path.isfile(real_tokenizer)
    p.add_argument("--data-dir", default=superglue_dir if has_realdata else "synthetic",
                   help="eval: SuperGLUE folder whose <Task>/val.jsonl are scored, or 'synthetic' (random tokens of "
                   "SuperGLUE's lengths); default: ../shared/realdata/superglue when present, else synthetic")
    p.add_argument("--tokenizer", default=real_tokenizer if has_realdata else None,
                   help="eval: the tokenizer for --data-dir (default: ../shared/realdata/llama_tokenizer.model)")
    p.add_argument("--eval-examples", type=int, help="eval: the first N examples of each task (default 8), or N "
                   "synthetic examples (default 64)")
    p.add_argument("--eval-batch-size", type=int, default=16, help="eval: sequences per batch (default 16: "
                   "train.py's for SuperGLUE, which its evaluation uses)")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    args.model = args.model or ("7b" if gpu else "small")
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.seq_len = args.seq_len or (512 if gpu else 64)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.mem_limit_gib is None:
        args.mem_limit_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB / 2
    if args.model not in BENCH_MODELS and args.model.lower() not in MODEL_NAMES:
        p.error(f"--model {args.model!r} is unknown: choose one of {', '.join([*BENCH_MODELS, *MODEL_NAMES])}")
    if unknown := [m for m in args.methods if m not in METHODS + EVAL_METHODS]:
        p.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS + EVAL_METHODS)}")
    if any(m in EVAL_METHODS for m in args.methods) and args.data_dir != "synthetic":
        if not os.path.isdir(args.data_dir):
            p.error(f"--data-dir {args.data_dir} is not a folder: give a SuperGLUE folder, or 'synthetic'")
        if not args.tokenizer or not os.path.isfile(args.tokenizer):
            p.error(f"--tokenizer {args.tokenizer} not found: --data-dir {args.data_dir} needs one (or use "
                    "--data-dir synthetic)")
    for flag in ("batch_size", "seq_len", "steps", "eval_batch_size", "eval_examples"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.seq_len < 2 or args.seq_len > model_args(args.model).max_seq_len:
        p.error(f"--seq-len must be in 2..{model_args(args.model).max_seq_len} (the model's max_seq_len)")
    if args.sharded and int(os.environ.get("WORLD_SIZE", 1)) < 2:
        p.error("--sharded needs at least 2 ranks: torchrun --nproc_per_node 2 bench.py --sharded")
    return args


def report(rows, args, device):
    """The results as JSON (--json), or as tables with the targets they are checked against."""
    if args.json:
        print(json.dumps({"device": device_name(device), "memory": memory_how(device), "results": rows}))
    elif args.sharded:
        print_sharded(rows, args, device)
    else:
        train_rows = [r for r in rows if r["method"] not in EVAL_METHODS]
        if train_rows:
            print_methods(train_rows, args, device)
        if len(train_rows) < len(rows):
            print("\n" if train_rows else "", end="")
            print_eval([r for r in rows if r["method"] in EVAL_METHODS], args, device)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
        torch.device("cpu")
    if not args.sharded:
        rows = bench_methods(args, device)
        report(rows, args, device)
        return rows
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    ok = False
    try:
        rows = bench_sharded(args, device)
        if dist.get_rank() == 0:
            report(rows, args, device)
        ok = True
    finally:
        close_distributed(ok)
    return rows


if __name__ == "__main__":
    main()
