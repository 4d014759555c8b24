"""Peak memory and speed of LOMO against the floor, SGD, AdamW and LoRA; hand-written sharding against FSDP2.

    python bench.py                                    # CPU: a 134M-parameter LLaMA, fp32, every method
    python bench.py --model 7b --dtype bf16            # one GPU: the paper's Table 1 setting
    torchrun --nproc_per_node 2 bench.py --sharded     # shard.py against FSDP2: time, memory, collective bytes
    python bench.py --methods eval,eval-hf             # candidate scoring against transformers' LlamaForCausalLM

Every method runs the same batch for a few warm-up steps, then several timed steps (tokens/s is the median).
Peak memory: on GPU torch.cuda.max_memory_allocated; on CPU the live tensor storage bytes counted by
`TensorMemoryTracker` over the warm-up steps (the timed steps run untracked, so the tracker costs no time).
Each method runs in a fresh process (this file again, with --methods <one>), so no method inherits another's
leftovers. A method that does not fit is reported as OOM and the others still run: on GPU when CUDA runs out of
memory, on CPU when the plan's estimate (plan.py) exceeds --mem-limit-gib, so the shared machine never swaps.
The floor is forward + backward with every gradient dropped as it arrives: no method that updates the weights
can be faster, nor use less memory. lora is the LoRA baseline (AdamW on adapters, the weights frozen), lora-lomo
LoRA + LOMO (the same adapters beside LOMO on every weight, in one backward pass); both with the official
adapters: r 2 on wq and wv, alpha 16, dropout 0.05.
The eval methods score candidate answers as train.py's evaluation does (eval), and as a plain transformers loop
does (eval-hf), in this process: after a warm-up pass each (memory), they take turns for the timed passes.
"""
import argparse
import contextlib
import inspect
import json
import os
import random
import statistics
import subprocess
import sys
import time
import weakref

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

import data
import shard
import superglue
from formats import hf_config
from lomo import LOMO, AdaLomo
from lora import LoRA
from model import MODEL_NAMES, ModelArgs, Transformer, cross_entropy
from optimizers import LORA_ADAMW, MasterAdamW, MasterSGD
from plan import GiB, plan, sizes
from tokenizer import open_tokenizer
from train import RandomWeights, close_distributed

METHODS = ("floor", "lomo", "lomo-clip", "lomo-clip-tensor", "adalomo", "sgd", "sgd-mixed", "adamw", "adamw-mixed",
           "lora", "lora-lomo")
LORA = dict(rank=2, alpha=16.0, dropout=0.05, targets=("wq", "wv"))  # the official LoRA runs' adapters
EVAL_METHODS = ("eval", "eval-hf")  # candidate scoring: this project's, and transformers' written plainly
REALDATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "realdata")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The CPU default: GPT-2-small-sized LLaMA, 134M parameters. fp32, because this project's CPU (AMD EPYC, no
# AVX512-BF16) runs bf16 matmuls 7 to 100 times slower than fp32 ones.
BENCH_MODELS = {"small": dict(dim=768, n_layers=12, n_heads=12, vocab_size=32000, max_seq_len=2048),
                "mini": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32)}


def model_args(name: str) -> ModelArgs:
    return ModelArgs(**BENCH_MODELS[name]) if name in BENCH_MODELS else ModelArgs.from_name(name)


# ------------------------------------------------------------------------------------ memory measurement

class TensorMemoryTracker(TorchDispatchMode):
    """Live tensor bytes and their peak, counted by storage, for devices without an allocator's statistics.

    Every tensor that an op takes or returns is counted once per storage (views share it), from the moment it is
    first seen until its storage is freed (weakref.finalize on the UntypedStorage). Tensors made before entering
    the mode count when first used, so pass the ones that must count from the start (the model's parameters).
    Wrapper subclasses (FSDP2's DTensor) count their inner tensors; storage.resize_ (FSDP2 frees and refills its
    unsharded parameters so) is followed. Not seen: scratch memory inside one kernel, and buffers that C++ code
    allocates outside the dispatcher (gloo's). On CPU autograd runs backward on the calling thread, so the mode
    sees the backward ops too.
    """

    def __init__(self, tensors=()):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0  # live: storage id -> bytes
        self.track(list(tensors))

    def track(self, obj):
        for t in tree_leaves(obj):
            if isinstance(t, torch.Tensor):
                self._see(t)

    def _see(self, t):
        if is_traceable_wrapper_subclass(t):
            self.track([getattr(t, name) for name in t.__tensor_flatten__()[0]])
            return
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.live:
            self.live[key] = 0
            weakref.finalize(storage, self._resize, key, None)
        self._resize(key, storage.nbytes())

    def _resize(self, key, nbytes):
        """Set storage `key` to `nbytes` (None: freed)."""
        old = self.live.pop(key, 0) if nbytes is None else self.live.get(key, 0)
        if nbytes is not None:
            self.live[key] = nbytes
        self.current += (nbytes or 0) - old
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.track((args, kwargs))
        out = func(*args, **(kwargs or {}))
        self.track(out)
        return out

    def __enter__(self):
        original, tracker = torch.UntypedStorage.resize_, self

        def resize_(storage, size):
            result = original(storage, size)
            if storage._cdata in tracker.live:
                tracker._resize(storage._cdata, storage.nbytes())
            return result
        torch.UntypedStorage.resize_, self._original_resize = resize_, original
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._original_resize
        return super().__exit__(*exc)


@contextlib.contextmanager
def peak_memory(device, tensors=()):
    """Yields a dict whose 'gib' is set on exit: the peak tensor memory inside the block."""
    result = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        result["gib"] = torch.cuda.max_memory_allocated(device) / GiB
    else:
        with TensorMemoryTracker(tensors) as tracker:
            yield result
        result["gib"] = tracker.peak / GiB


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


def random_batch(margs, batch, seq_len, device, seed=0):
    tokens = torch.randint(margs.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    return tokens.to(device)


def random_model(margs, dtype, device) -> Transformer:
    """Per-block activation checkpointing, as train.py; N(0, 0.02) weights and norms 1, as model.init_weights."""
    with torch.device("meta"):
        model = Transformer(margs, checkpointing=True)
    model.to(dtype).to_empty(device=device)  # straight in the benchmark's dtype: no fp32 copy on the device
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    return model


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
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        one_step()
        sync(device)
        times.append(time.perf_counter() - start)
    return {"method": method, "peak_gib": mem["gib"], "step_s": statistics.median(times),
            "tokens_per_s": batch * seq_len / statistics.median(times)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


# ------------------------------------------------------------------------------------- candidate scoring

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
    """Each scorer scores every candidate `warmup` times (its peak memory measured), then the scorers take turns
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
            for _ in range(max(1, args.warmup)):
                score()
        # on GPU the scorers built before are resident too; the CPU tracker counts only this one's tensors
        peak = mem["gib"] - (resident / GiB if device.type == "cuda" else 0)
        resident += sum(p.numel() * p.element_size() for p in model.parameters())
        scorers[method] = score
        rows.append({"method": method, "peak_gib": peak, "padding": padding_share(batches), "times": []})
    for _ in range(args.steps):
        for row in rows:
            if row["method"] in scorers:
                sync(device)
                start = time.perf_counter()
                scorers[row["method"]]()
                sync(device)
                row["times"].append(time.perf_counter() - start)
    for row in rows:
        if "times" in row:
            times = row.pop("times")
            row.update(pass_s=statistics.median(times), spread=max(times) / min(times),
                       tokens_per_s=n_tokens / statistics.median(times))
        row.update(sequences=sum(map(len, encoded)), tokens=n_tokens, candidates=what)
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
            sync(device)
            start = time.perf_counter()
            one_step()
            sync(device)
            times.append(time.perf_counter() - start)
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
        worst = max(every, key=lambda r: r['peak_gib'])
        rows.append({**mine, "rank": None, "peak_gib": worst["peak_gib"],
                     "step_s": max(r["step_s"] for r in every)})
    return rows


# ------------------------------------------------------------------------------------------------ report

def print_methods(rows, args, device, memory_how):
    margs = model_args(args.model)
    P = sizes(margs)["total"]
    print(f"model {args.model}: {P / 1e6:.0f}M parameters, {args.dtype}, batch {args.batch_size} x {args.seq_len} "
          f"tokens, {args.warmup} warm-up + {args.steps} timed steps, on {device_name(device)}")
    print(f"peak memory: {memory_how}; tokens/s: median of the timed steps\n")
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


def print_sharded(rows, args, device, memory_how):
    margs = model_args(args.model)
    print(f"model {args.model}: {sizes(margs)['total'] / 1e6:.1f}M parameters, {args.dtype}, LOMO, batch "
          f"{args.batch_size} x {args.seq_len} tokens per rank, {dist.get_world_size()} ranks on {device_name(device)}")
    print(f"peak memory per rank (the largest): {memory_how}; step time: median of the timed steps (slowest rank)\n")
    print(f"{'sharding':>10} {'step s':>8} {'peak GiB':>9} {'sent GiB/step':>14} {'exact':>10} {'plan':>10}")
    for r in rows:
        exact = f"{r['exact_sent_gib_per_step']:>10.5f}" if "exact_sent_gib_per_step" in r else f"{'-':>10}"
        print(f"{r['sharding']:>10} {r['step_s']:>8.3f} {r['peak_gib']:>9.4f} {r['sent_gib_per_step']:>14.5f} "
              f"{exact} {r['plan_sent_gib_per_step']:>10.5f}")
    own, fsdp = rows
    print(f"\nown / fsdp2 step time = {own['step_s'] / fsdp['step_s']:.2f} (target <= 1.2); own / fsdp2 peak memory "
          f"= {own['peak_gib'] / fsdp['peak_gib']:.2f} (target <= 1)")


def print_eval(rows, args, device, memory_how):
    margs = model_args(args.model)
    what = next((r["candidates"] for r in rows if "candidates" in r), "")
    print(f"candidate scoring, model {args.model}: {sizes(margs)['total'] / 1e6:.3g}M parameters, {args.dtype}, "
          f"{args.eval_batch_size} sequences per batch, {args.warmup} warm-up + {args.steps} timed passes over "
          f"{what}, on {device_name(device)}")
    print(f"peak memory: {memory_how}; tokens/s: the candidates' tokens (not the padding) / the median pass; the "
          f"scorers take turns; spread: slowest / fastest pass\n")
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


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help=f"{', '.join(BENCH_MODELS)} or a preset: {', '.join(MODEL_NAMES)} "
                   "(default: small on CPU, 7b on GPU)")
    p.add_argument("--dtype", choices=DTYPES, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per step (per rank with --sharded)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: 512 on GPU, 64 on CPU)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps, during which memory is measured")
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


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
        torch.device("cpu")
    memory_how = "torch.cuda.max_memory_allocated" if device.type == "cuda" else \
        "live tensor storage counted by bench.TensorMemoryTracker"
    if args.sharded:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        ok = False
        try:
            rows = bench_sharded(args, device)
            if dist.get_rank() == 0 and args.json:
                print(json.dumps({"device": device_name(device), "memory": memory_how, "results": rows}))
            elif dist.get_rank() == 0:
                print_sharded(rows, args, device, memory_how)
            ok = True
        finally:
            close_distributed(ok)
        return rows
    rows = bench_methods(args, device)
    if args.json:
        print(json.dumps({"device": device_name(device), "memory": memory_how, "results": rows}))
        return rows
    train_rows = [r for r in rows if r["method"] not in EVAL_METHODS]
    if train_rows:
        print_methods(train_rows, args, device, memory_how)
    if len(train_rows) < len(rows):
        print("\n" if train_rows else "", end="")
        print_eval([r for r in rows if r["method"] in EVAL_METHODS], args, device, memory_how)
    return rows


if __name__ == "__main__":
    main()
