"""LoRA (Hu et al. 2021, arXiv 2106.09685): a trainable low-rank update beside a frozen or LOMO-trained weight.

A projection y = W x becomes y = W x + (alpha / r) B A dropout(x) (LoRA Sec. 4.1), with A (r, in) and B (out, r).
The adapters live outside the model, in a `LoRA` module of their own, and join each target projection through a
forward hook on its nn.Linear. So the model keeps exactly Meta's parameters and checkpoint keys, and the sharding
layers (shard.py, FSDP2) never shard an adapter: every rank holds all of them (LLaMA-7B, r 2 on wq and wv: 1.05M
elements, 0.016% of the model), in fp32, and train.py sums their gradients over the ranks before AdamW steps.

    lora = LoRA(model.args, rank=2, alpha=16, dropout=0.05, targets=("wq", "wv"))
    lora.attach(model)                   # model(tokens) now adds the adapters' updates
    opt = torch.optim.AdamW(lora.parameters(), lr=5e-4, eps=1e-6, weight_decay=0.0)
    merged = lora.merged(tensors)        # W + (alpha / r) B A: an export that is a plain LLaMA

Dropout is active in training mode only: call lora.eval() to evaluate, lora.train() to go on training.
"""
import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from model import ModelArgs, param_shapes

# The projections an adapter can sit on, in model order, and the block module that holds each.
TARGETS = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
           "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}


def parse_targets(text: str) -> tuple[str, ...]:
    """'wv,wq' -> ('wq', 'wv'): the projections named, in model order. ValueError names an unknown one."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise ValueError(f"unknown projection(s) {', '.join(unknown) or '(none given)'}: choose from "
                         f"{', '.join(TARGETS)}, comma-separated")
    return tuple(t for t in TARGETS if t in names)


class Adapter(nn.Module):
    """The low-rank update of one projection W (out, in): x (..., in) -> (alpha / r) B A dropout(x) (..., out).

    Computed in the adapter's dtype (fp32, also under 16-bit weights, as peft does), the result cast to x's. A starts
    Kaiming-uniform (nn.Linear's initialisation) and B at zero, so training starts from the model itself."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float,
                 generator: torch.Generator = None):
        super().__init__()
        self.scale, self.dropout = alpha / rank, dropout
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(x.to(self.lora_A.dtype), self.dropout, self.training)   # (..., in)
        return (F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale).to(x.dtype)  # (..., r) -> (..., out)

    def delta(self) -> torch.Tensor:
        """(alpha / r) B A (out, in): what merging adds to W."""
        return (self.lora_B @ self.lora_A) * self.scale


def _add_update(adapter, module, args, out):
    """Forward hook of a target nn.Linear: W x -> W x + adapter(x)."""
    return out + adapter(args[0])


class LoRA(nn.Module):
    """One adapter per target projection of every block. state_dict() keys follow the model's, with the weight's
    name ending replaced: layers.0.attention.wq.weight -> layers.0.attention.wq.lora_A and .lora_B.
    Initialised from `seed` on the CPU, so every rank builds the same adapters."""

    def __init__(self, margs: ModelArgs, rank: int, alpha: float, dropout: float = 0.0,
                 targets=("wq", "wv"), seed: int = 0):
        super().__init__()
        if rank < 1 or not alpha > 0 or not 0 <= dropout < 1:
            raise ValueError(f"LoRA needs rank >= 1, alpha > 0 and 0 <= dropout < 1, got {rank}, {alpha}, {dropout}")
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.targets = parse_targets(",".join(targets))
        shapes, generator = param_shapes(margs), torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList()
        for i in range(margs.n_layers):
            block = nn.Module()
            for part in ("attention", "feed_forward"):
                names = [t for t in self.targets if TARGETS[t] == part]
                if names:
                    setattr(block, part, nn.ModuleDict({t: Adapter(
                        *reversed(shapes[f"layers.{i}.{part}.{t}.weight"]), rank, alpha, dropout, generator)
                        for t in names}))
            self.layers.append(block)
        self._attached = []  # (nn.Linear, its adapter), in attach() order

    def config(self) -> dict:
        """What decides what the adapters compute (dropout aside): a checkpoint must match it to be loaded."""
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    def adapters(self) -> dict:
        """{the projection's module name, e.g. 'layers.0.attention.wq': its Adapter}, in model order."""
        return {name: m for name, m in self.named_modules() if isinstance(m, Adapter)}

    def attach(self, model: nn.Module) -> None:
        """Hook each adapter onto its projection in `model`: a model.Transformer, on the 'meta' device too (the
        sharding layers attach to the model they shard, before sharding it)."""
        for name, adapter in self.adapters().items():
            linear = model.get_submodule(name)
            if any(linear is attached for attached, _ in self._attached):
                raise ValueError(f"{name} already has this LoRA's adapter: attach it once")
            linear.register_forward_hook(partial(_add_update, adapter))
            self._attached.append((linear, adapter))

    def parameters_in(self, module: nn.Module) -> list:
        """The parameters of the adapters attached to `module` or to a submodule of it."""
        inside = {id(m) for m in module.modules()}
        return [p for linear, adapter in self._attached if id(linear) in inside for p in adapter.parameters()]

    @torch.no_grad()
    def merged(self, tensors: dict) -> dict:
        """{name: full tensor} (a unit of an export) with every adapted weight replaced by W + (alpha / r) B A,
        added in fp32 and rounded once to W's dtype."""
        adapters = self.adapters()
        out = {}
        for name, w in tensors.items():
            adapter = adapters.get(name.removesuffix(".weight"))
            out[name] = w if adapter is None else (w.float() + adapter.delta().to(w.device)).to(w.dtype)
        return out
