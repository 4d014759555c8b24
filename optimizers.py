"""The optimizers that train.py steps, and their learning-rate schedules.

    --optimizer lomo / adalomo    every weight updated inside the backward pass (lomo.py)
    --optimizer sgd / adamw       the paper's unfused baselines: torch's optimizers over fp32 master weights
    --optimizer lora              the LoRA baseline: AdamW on the adapters, the model's weights frozen
    lomo / adalomo + --lora-rank  LoRA + LOMO: LOMO updates every base weight inside the backward pass, then AdamW
                                  steps the adapters with the gradients that pass left them

The adapters' AdamW is the official LoRA runs' (transformers' AdamW: eps 1e-6, weight decay 0; torch's defaults
differ). The adapters are whole on every rank: their gradients, each rank's part of the global-mean loss, are summed
over the ranks in one all-reduce before AdamW steps, so every rank takes the same step.
"""
import math

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from lomo import LOMO, AdaLomo

LORA_ADAMW = dict(betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)


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

    def _fp32_masters(self):
        """The masters of 16-bit weights (those of fp32 weights are the weights themselves)."""
        masters = [m for group in self.param_groups for m in group["params"]]
        return [m for m, p in zip(masters, self.model_params) if m.dtype != p.dtype]

    def state_dict(self):
        """The torch optimizer's state plus the fp32 masters, which the 16-bit weights only round."""
        return {**super().state_dict(), "masters": self._fp32_masters()}

    @torch.no_grad()
    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        for m, saved in zip(self._fp32_masters(), state_dict.pop("masters")):
            m.copy_(saved)
        super().load_state_dict(state_dict)


class MasterSGD(_MasterWeights, torch.optim.SGD):
    """SGD with fp32 master weights: 4 extra bytes per parameter (the paper's SGD row)."""


class MasterAdamW(_MasterWeights, torch.optim.AdamW):
    """AdamW with fp32 master weights and states: 12 extra bytes per parameter (the paper's AdamW row)."""


def build_base(args, model, world):
    """The optimizer of the model's own weights, for --optimizer lomo, adalomo, sgd or adamw."""
    if args.optimizer in ("sgd", "adamw"):
        if world > 1 and args.sharding == "own":
            raise SystemExit(f"--optimizer {args.optimizer} keeps full gradients and is not supported with "
                             "--sharding own; use --sharding fsdp2, or lomo / adalomo")
        cls = MasterSGD if args.optimizer == "sgd" else MasterAdamW
        return cls(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    cls = LOMO if args.optimizer == "lomo" else AdaLomo
    return cls(model.parameters(), lr=args.lr, clip_grad_norm=args.clip_grad_norm,
               clip_grad_norm_scope=args.clip_grad_norm_scope, clip_grad_value=args.clip_grad_value,
               weight_decay=args.weight_decay, stochastic_rounding=args.stochastic_rounding,
               process_group=dist.group.WORLD if world > 1 else None)  # FSDP2's mesh is the whole world too


def lr_lambda(args, total_steps):
    """The factor of the peak rate at each step: linear warm-up over --warmup-ratio of the steps, then
    --lr-schedule."""
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


def clip_grads(params, args) -> dict:
    """--clip-grad-value, then --clip-grad-norm (global or per tensor) on the gradients of `params`; the global
    norm before clipping, for metrics.jsonl."""
    if args.clip_grad_value:
        torch.nn.utils.clip_grad_value_(params, args.clip_grad_value)
    if not args.clip_grad_norm:
        return {}
    groups = [[p] for p in params] if args.clip_grad_norm_scope == "tensor" else [params]
    norms = [torch.nn.utils.clip_grad_norm_(ps, args.clip_grad_norm) for ps in groups]
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]  # FSDP2: DTensor
    return {"grad_norm": float(torch.stack(norms).norm())}


class Optimizers:
    """One run's optimizers, each with its schedule (the same shape, from its own peak rate): `base` for the
    model's weights (None for --optimizer lora) and `adapters`, AdamW on the LoRA adapters (None without LoRA)."""

    def __init__(self, args, model, lora, world, total_steps):
        self.args, self.world = args, world
        self.base = None if args.optimizer == "lora" else build_base(args, model, world)
        self.adapter_params = list(lora.parameters()) if lora is not None else []
        self.adapters = None
        if lora is not None:
            self.adapters = torch.optim.AdamW(self.adapter_params, lr=args.lora_lr, **LORA_ADAMW)
        if self.fused and self.adapters:  # LoRA + LOMO
            self.base.add_external_params(self.adapter_params)
        factor = lr_lambda(args, total_steps)
        self.schedules = {name: LambdaLR(opt, factor) for name, opt in self.named() if opt is not None}

    @property
    def fused(self) -> bool:
        return isinstance(self.base, (LOMO, AdaLomo))

    def named(self):
        return (("base", self.base), ("adapters", self.adapters))

    def update(self, loss: torch.Tensor, loss_is_finite: bool) -> dict:
        """The backward pass of `loss` (this rank's part of the global mean) and every update. Returns a row for
        metrics.jsonl. The clipping flags act on the base weights' gradients (as the official LoRA + LOMO code:
        the adapters' are not clipped), or, for --optimizer lora, on the adapters'."""
        if self.fused:
            info = self.base.fused_backward(loss)
            row = {"skipped": info.skipped, "skip_reason": info.reason, "grad_norm": info.grad_norm,
                   "loss_scale": info.loss_scale}
            if self.adapters:
                row["skipped"] = self._step_adapters(info.skipped, info.loss_scale, clip=False)["skipped"]
            return row
        if not loss_is_finite:  # every rank sees the same global loss, so all skip together
            return {"skipped": True}
        loss.backward()
        if self.adapters:
            return self._step_adapters(False, None, clip=True)
        row = {"skipped": False, **clip_grads(self.base.model_params, self.args)}
        self.base.step()
        return row

    def _step_adapters(self, skip: bool, loss_scale, clip: bool) -> dict:
        """Sum the adapters' gradients over the ranks (one all-reduce), unscale them, clip them if `clip`, and step
        AdamW, unless `skip` or a gradient is not finite (one host sync). A row for metrics.jsonl."""
        params, row = self.adapter_params, {"skipped": skip}
        if not skip:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            if self.world > 1:
                dist.all_reduce(flat)  # a sum: the loss is already the mean over the global batch
            if loss_scale:
                flat.div_(loss_scale)
            row["skipped"] = not bool(torch.isfinite(flat).all())
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                p.grad = g.view_as(p)
        if not row["skipped"]:
            row.update(clip_grads(params, self.args) if clip else {})
            self.adapters.step()
        self.adapters.zero_grad()
        return row

    def rates(self) -> dict:
        """The learning rates now: lr (the base weights') and lora_lr (the adapters')."""
        return {key: opt.param_groups[0]["lr"] for key, opt in (("lr", self.base), ("lora_lr", self.adapters))
                if opt is not None}

    def advance(self) -> None:
        """One scheduler step for each optimizer."""
        for schedule in self.schedules.values():
            schedule.step()

    def state_dict(self, which: str) -> dict:
        """{optimizer, scheduler} of `which`: "base" (this rank's: its state holds this rank's rows) or "adapters"
        (the same on every rank); None for an optimizer this run does not have."""
        opt = dict(self.named())[which]
        if opt is None:
            return {"optimizer": None, "scheduler": None}
        return {"optimizer": opt.state_dict(), "scheduler": self.schedules[which].state_dict()}

    def load_state_dict(self, which: str, state: dict) -> None:
        opt = dict(self.named())[which]
        if opt is not None:
            opt.load_state_dict(state["optimizer"])
            self.schedules[which].load_state_dict(state["scheduler"])
