"""ZeRO-3-style parameter sharding with plain torch.distributed collectives, and an FSDP2 alternative.

Every parameter is cut by rows (dim 0) over the ranks, unpadded (`tensor_split` sizes): a rank's piece is an
ordinary 2-D (or 1-D) leaf tensor, so lomo.py sees a row shard and reduces over the group where it must.
Parameters are gathered in units (a whole transformer block, or each weight on its own) through one padded
flat buffer per unit: one all-gather and one reduce-scatter serve the whole unit.

One unit in one training step (see the README for the picture):
    forward:  all-gather the unit -> compute -> free the full weights, keep only the unit's input
    backward: all-gather again -> recompute with grad -> backward -> reduce-scatter the gradients (summed over
              ranks) into this rank's rows -> autograd accumulates them into the shard -> lomo.py's hook updates
              the shard and frees its gradient -> free the full weights and gradients
The autograd Function `_GatherRun` does all of this, so lomo.py never learns that the model is sharded. The
recompute replays the forward pass's RNG state (as torch.utils.checkpoint does), so dropout draws the same masks.
Parameters that are not sharded (LoRA adapters, replicated on every rank) can take part in a unit's computation:
their gradients are this rank's part, left to the caller to sum over the ranks.
`NonFiniteGuard` (both backends) makes a non-finite gradient that any rank saw in a unit visible to every rank.
"""
import contextlib
import math
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from lomo import _fp32_sum
from model import Transformer, precompute_freqs_cis

SHARD_UNITS = ("block", "linear")


def all_gather(output, input, group=None, async_op=False):
    """dist.all_gather_single on torch >= 2.13 (which deprecates the old name), all_gather_into_tensor before.
    Looked up at call time, so that a byte counter (bench.py) can wrap either name."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output, input, group=group, async_op=async_op)


def reduce_scatter(output, input, group=None):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, input, op=dist.ReduceOp.SUM, group=group)


def row_range(rows: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, stop) of rank `rank`, as torch.tensor_split cuts them (the first rows % world ranks get one
    more row)."""
    base, extra = divmod(rows, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class NonFiniteGuard:
    """Makes every rank stop LOMO's single-pass updates at the same unit (lomo.py stops at the first non-finite
    gradient its hooks see, and each rank sees only its own rows).

    Called on each unit's reduce-scattered gradient buffer (this rank's rows of every parameter of the unit)
    before the optimizer's hooks see it: one all-reduce of the buffer's sum (4 bytes) per unit; when that sum is
    non-finite, here or on any rank, or was at an earlier unit of this backward pass, NaN is added to the whole
    buffer on every rank, otherwise 0.0 (one pass over this rank's gradient rows). So updates stop at the first
    unit in which any rank saw a non-finite gradient, on every rank, whatever the order of the hooks within it.
    reset() at each forward pass."""

    def __init__(self, group=None):
        self.group, self.poison = group, None

    def reset(self):
        self.poison = None

    @torch.no_grad()
    def __call__(self, flat: torch.Tensor):
        total = _fp32_sum(flat).reshape(1)  # lomo.py's sum: no fp32 copy of a 16-bit buffer on the CPU
        dist.all_reduce(total, group=self.group)  # non-finite on every rank if it is on any
        poison = torch.where(torch.isfinite(total), 0.0, math.nan)  # NaN stays NaN when added: sticky
        self.poison = poison if self.poison is None else self.poison + poison
        flat.add_(self.poison.to(flat.dtype))


class ShardedUnit(nn.Module):
    """The row shards of one module's parameters. The full tensors exist only while the module runs.

    `module` (usually on the 'meta' device) supplies the computation through torch.func.functional_call; it is
    not registered as a child, so `parameters()` yields only the shards.

    tied_to: another unit whose shards this one uses, with its own computation (a tied output head: the
    embedding's matrix as a Linear). The two units are two uses of the same parameters, so autograd sums their
    reduce-scattered gradients into the one shard before its post-accumulate-grad hook fires, once per pass.
    """

    def __init__(self, module: nn.Module, prefix: str, group=None, device="cpu", dtype=torch.float32,
                 tied_to: "ShardedUnit" = None):
        super().__init__()
        object.__setattr__(self, "module", module)
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        named = list(module.named_parameters())
        self.local_names = [n for n, _ in named]
        self.names = [prefix + n for n in self.local_names]  # Meta checkpoint keys
        self.shapes = [p.shape for _, p in named]
        # ranges[r][i]: rows of parameter i held by rank r; numels[r][i]: its elements
        self.ranges = [[row_range(s[0], r, self.world) for s in self.shapes] for r in range(self.world)]
        numels = [[(b - a) * (s[1:].numel()) for (a, b), s in zip(rr, self.shapes)] for rr in self.ranges]
        self.offsets = [[sum(n[:i]) for i in range(len(n))] for n in numels]
        self.numels = numels
        self.chunk = max(sum(n) for n in numels)  # per-rank size of the padded flat buffer
        object.__setattr__(self, "tied_to", tied_to)  # not a child module: the shards are what is shared
        if tied_to is not None:
            assert tied_to.shapes == self.shapes, f"{prefix} cannot be tied to {tied_to.names}: shapes differ"
            self.shards = tied_to.shards
        else:
            self.shards = nn.ParameterList(
                nn.Parameter(torch.empty((b - a,) + tuple(s[1:]), device=device, dtype=dtype))
                for (a, b), s in zip(self.ranges[self.rank], self.shapes))
        self.replicated = []  # parameters, whole on every rank, that the module's computation also uses (LoRA)
        self.next_unit = self.prev_unit = None  # prefetch order, set by ShardedTransformer
        self.guard = None  # a NonFiniteGuard shared by the model's units, set by ShardedTransformer
        self._pending = None

    def prefetch(self):
        """Start this unit's all-gather without waiting for it."""
        if self._pending is None:
            flat = self._flat_shards()
            out = flat.new_empty(self.world * self.chunk)
            self._pending = (out, all_gather(out, flat, self.group, async_op=True))

    def _flat_shards(self):
        flat = self.shards[0].new_zeros(self.chunk)
        for shard, offset in zip(self.shards, self.offsets[self.rank]):
            flat[offset:offset + shard.numel()] = shard.detach().reshape(-1)
        return flat

    def gather(self) -> dict:
        """The full parameters {local name: tensor}, from a prefetched all-gather if one is pending."""
        self.prefetch()
        out, work = self._pending
        self._pending = None
        work.wait()
        out = out.view(self.world, self.chunk)
        full = {}
        for i, (name, shape) in enumerate(zip(self.local_names, self.shapes)):
            pieces = [out[r, self.offsets[r][i]:self.offsets[r][i] + self.numels[r][i]] for r in range(self.world)]
            full[name] = torch.cat(pieces).view(shape)
        return full

    def reduce_scatter(self, grads: list) -> list:
        """Sum the full gradients over ranks; return this rank's rows of each, shaped like its shards."""
        flat = grads[0].new_zeros(self.world, self.chunk)
        for i, grad in enumerate(grads):
            for r in range(self.world):
                start, stop = self.ranges[r][i]
                flat[r, self.offsets[r][i]:self.offsets[r][i] + self.numels[r][i]] = grad[start:stop].reshape(-1)
        out = flat.new_empty(self.chunk)
        reduce_scatter(out, flat.view(-1), self.group)
        if self.guard is not None:
            self.guard(out)
        return [out[o:o + s.numel()].view(s.shape) for o, s in zip(self.offsets[self.rank], self.shards)]

    def forward(self, *inputs):
        return _GatherRun.apply(self, len(inputs), *inputs, *self.shards, *self.replicated)


def _rng_state(device) -> tuple:
    """The RNG state that dropout draws from: the CPU's, and the GPU's for a unit on a GPU."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextlib.contextmanager
def _replayed_rng(state, device):
    """Run the block with the RNG at `state`; the RNG continues afterwards as if the block had not run."""
    cpu, gpu = state
    with torch.random.fork_rng(devices=[device] if gpu is not None else []):
        torch.set_rng_state(cpu)
        if gpu is not None:
            torch.cuda.set_rng_state(gpu, device)
        yield


class _GatherRun(torch.autograd.Function):
    """Run a unit on its gathered weights, saving only its inputs (and the RNG state); in backward gather again,
    recompute with that RNG state, and reduce-scatter the weight gradients into the shards (the design of
    shared/design/sharded-step.md). Frozen shards (the LoRA baseline) get no gradient: none is computed."""

    @staticmethod
    def forward(ctx, unit, n_inputs, *args):
        inputs = args[:n_inputs]
        ctx.unit, ctx.rng = unit, _rng_state(inputs[0].device)
        ctx.save_for_backward(*inputs)
        full = unit.gather()
        if unit.next_unit is not None:
            unit.next_unit.prefetch()
        return functional_call(unit.module, full, inputs)

    @staticmethod
    def backward(ctx, grad_out):
        unit = ctx.unit
        needs = ctx.needs_input_grad[2:]  # inputs, shards, replicated parameters
        inputs = [x.detach().requires_grad_(need) for x, need in zip(ctx.saved_tensors, needs)]
        train_shards = any(needs[len(inputs):len(inputs) + len(unit.shards)])
        full = {name: t.requires_grad_(train_shards) for name, t in unit.gather().items()}
        if unit.prev_unit is not None:
            unit.prev_unit.prefetch()
        with torch.enable_grad(), _replayed_rng(ctx.rng, grad_out.device):
            out = functional_call(unit.module, full, tuple(inputs))
        wrt = [t for t in (*inputs, *full.values(), *unit.replicated) if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wrt, grad_out))  # in the order of wrt
        del out, full, wrt  # the full weights: freed before the reduce-scatter
        input_grads = [next(grads) if x.requires_grad else None for x in inputs]
        full_grads = [next(grads) for _ in unit.shards] if train_shards else None
        replicated_grads = [next(grads) if p.requires_grad else None for p in unit.replicated]
        shard_grads = unit.reduce_scatter(full_grads) if train_shards else [None] * len(unit.shards)
        return (None, None, *input_grads, *shard_grads, *replicated_grads)


class Head(nn.Module):
    """The final norm and the output projection, as one unit: h (..., dim) -> logits (..., vocab) in fp32."""

    def __init__(self, norm, output):
        super().__init__()
        self.norm, self.output = norm, output

    def forward(self, h):
        return self.output(self.norm(h)).float()


class ShardedTransformer(nn.Module):
    """The LLaMA of model.py with every parameter row-sharded over `group`.

    unit="block": each transformer block is one unit (gathered twice per step: forward, backward) and the
    next unit's all-gather is prefetched. unit="linear": each weight is its own unit, and each block runs under
    activation checkpointing, so a weight is gathered three times per step (forward, recompute, backward),
    with no prefetch. The embedding, and the final norm with the output head, are units in both cases.
    """

    def __init__(self, args, unit="block", group=None, device="cpu", dtype=torch.float32, lora=None):
        super().__init__()
        if unit not in SHARD_UNITS:
            raise ValueError(f"--shard-unit must be one of {SHARD_UNITS}, got {unit!r}")
        self.args, self.unit = args, unit
        with torch.device("meta"):
            model = Transformer(args)
        if lora is not None:  # lora.LoRA: its hooks run inside the units, which pass on its parameters' gradients
            lora.attach(model)
        shard = lambda module, prefix: ShardedUnit(module, prefix, group, device, dtype)  # noqa: E731
        self.embed = shard(model.tok_embeddings, "tok_embeddings.")
        if unit == "block":
            self.layers = nn.ModuleList(shard(layer, f"layers.{i}.") for i, layer in enumerate(model.layers))
        else:
            for i, layer in enumerate(model.layers):
                for name, module in list(layer.named_modules()):
                    if isinstance(module, nn.Linear) or name.endswith("norm"):
                        parent, _, attr = name.rpartition(".")
                        setattr(layer.get_submodule(parent), attr, shard(module, f"layers.{i}.{name}."))
            self.layers = model.layers
        if args.tie_embeddings:  # the final norm, then the embedding's shards used as the output layer
            self.head = shard(model.norm, "norm.")
            with torch.device("meta"):
                logits = nn.Linear(args.dim, args.vocab_size, bias=False)
            self.output = ShardedUnit(logits, "tok_embeddings.", group, device, dtype, tied_to=self.embed)
        else:
            self.head, self.output = shard(Head(model.norm, model.output), ""), None
        self.guard = NonFiniteGuard(group)
        for module in self.modules():  # every unit that reduce-scatters, a tied output head included
            if isinstance(module, ShardedUnit):
                module.guard = self.guard
                module.replicated = lora.parameters_in(module.module) if lora is not None else []
        if unit == "block":
            chain = [self.embed, *self.layers, self.head] + ([self.output] if self.output else [])
            for a, b in zip(chain, chain[1:]):  # plain attributes, not child modules (that would be a cycle)
                object.__setattr__(a, "next_unit", b)
                object.__setattr__(b, "prev_unit", a)

    def units(self) -> list:
        """The units that own their shards, in model order (a tied output head is not one of them)."""
        return [m for m in self.modules() if isinstance(m, ShardedUnit) and m.tied_to is None]

    def forward(self, tokens, logits_at=None):
        """tokens (B, T) -> logits (B, T, vocab) in fp32; with logits_at (N,), as model.Transformer, (N, vocab)."""
        self.guard.reset()
        a = self.args
        freqs_cis = precompute_freqs_cis(a.head_dim, tokens.shape[1], a.rope_theta, tokens.device, a.rope_scaling)
        h = self.embed(tokens)
        for layer in self.layers:
            if self.unit == "linear" and torch.is_grad_enabled():
                h = checkpoint(layer, h, freqs_cis, use_reentrant=False)
            else:
                h = layer(h, freqs_cis)
        if logits_at is not None:
            h = h.flatten(0, 1)[logits_at]  # (N, dim)
        if self.output is None:
            return self.head(h)  # norm and output layer in one unit
        return self.output(self.head(h)).float()


# ---------------------------------------------------------------------------------------- FSDP2 backend

def fsdp2_transformer(args, mesh, device="cpu", dtype=torch.float32, lora=None):
    """The reference backend: PyTorch's fully_shard on each block and on the root, with per-block activation
    checkpointing. Parameters are DTensors sharded by rows (torch.chunk sizes); lomo.py works on their local
    tensors. Gradients are summed over ranks, as in the hand-written backend. A NonFiniteGuard runs on each
    unit's reduce-scattered gradients (FSDP2's all-reduce hook, which fires after the reduce-scatter). LoRA
    adapters (lora.LoRA) are hooked on before sharding; not being the model's parameters, they stay whole."""
    from torch.distributed.fsdp import fully_shard

    with torch.device("meta"):
        model = Transformer(args, checkpointing=True).to(dtype)
    if lora is not None:
        lora.attach(model)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=device)
    for module in [model, *model.layers]:
        module.set_gradient_divide_factor(1.0)  # sum over ranks: the loss is already a global mean
        module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    guard = NonFiniteGuard(mesh.get_group())
    if hasattr(model, "set_all_reduce_hook"):
        for module in [model, *model.layers]:
            module.set_all_reduce_hook(guard)
        model.register_forward_pre_hook(lambda module, args: guard.reset())
    else:
        warnings.warn("this torch has no FSDPModule.set_all_reduce_hook: with --sharding fsdp2, LOMO's single-pass "
                      "updates after a non-finite gradient may stop at different units on different ranks")
    return model


# ------------------------------------------------------------------------------- loading and saving

def named_params(model) -> dict:
    """{Meta name: parameter} for any of the three model kinds: a plain model's, the own backend's row shards,
    FSDP2's DTensors. A tied embedding is named once, tok_embeddings.weight."""
    if isinstance(model, ShardedTransformer):
        return {n: s for u in model.units() for n, s in zip(u.names, u.shards)}
    return dict(model.named_parameters())


def local_tensors(model) -> dict:
    """{Meta name: this rank's rows} for any of the three model kinds."""
    return {n: p.to_local() if hasattr(p, "to_local") else p for n, p in named_params(model).items()}


def full_shapes(model) -> dict:
    """{Meta name: the full (unsharded) shape} for any of the three model kinds."""
    if isinstance(model, ShardedTransformer):
        return {n: tuple(s) for u in model.units() for n, s in zip(u.names, u.shapes)}
    return {n: tuple(p.shape) for n, p in model.named_parameters()}  # a DTensor's shape is the full one


def local_rows(model) -> dict:
    """{Meta name: (start, stop)}: the rows of each full tensor that this rank holds."""
    if isinstance(model, ShardedTransformer):
        return {n: u.ranges[u.rank][i] for u in model.units() for i, n in enumerate(u.names)}
    rows = {}
    for name, p in model.named_parameters():
        if hasattr(p, "to_local"):  # FSDP2: torch.chunk sizes, ceil(rows / world) per rank
            size = -(-p.shape[0] // p.device_mesh.size())
            start = min(p.device_mesh.get_local_rank() * size, p.shape[0])
            rows[name] = (start, start + p.to_local().shape[0])
        else:
            rows[name] = (0, p.shape[0])
    return rows


@torch.no_grad()
def load_rows(model, read):
    """Fill every local tensor with its rows: read(name, slice) -> tensor, e.g. a CheckpointReader's read, which
    memory-maps the checkpoint. No rank holds more than one full tensor at a time."""
    rows = local_rows(model)
    for name, tensor in local_tensors(model).items():
        start, stop = rows[name]
        tensor.copy_(read(name, slice(start, stop)))


@torch.no_grad()
def full_units(model, names_per_unit):
    """Yield {name: full tensor} for each unit in turn (all ranks must iterate together; each collective
    gathers one unit). Used to stream an export: no rank holds more than one unit at once."""
    if isinstance(model, ShardedTransformer):
        for unit in model.units():
            yield {n: t for n, t in zip(unit.names, unit.gather().values())}
        return
    params = dict(model.named_parameters())
    for names in names_per_unit:
        yield {n: params[n].full_tensor() if hasattr(params[n], "full_tensor") else params[n].detach()
               for n in names}
