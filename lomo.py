"""LOMO and AdaLomo: optimizers whose update is fused into the backward pass.

LOMO ("Full Parameter Fine-tuning for Large Language Models with Limited Resources", Lv et al. 2023,
arXiv 2306.09782) trains with plain SGD, which has no optimizer state, and fuses the update into the backward
pass (Sec. 3.2, Algorithm 1): each parameter is updated the moment its gradient is ready, and that gradient is
freed at once. At most one parameter's gradient is alive at any time, instead of a full copy of the model.
AdaLomo (Lv et al. 2023, arXiv 2310.10195) keeps the same fused update but adds an Adafactor-style factored
second moment and grouped update normalisation (Sec. 3, Algorithm 1).

Use:
    opt = LOMO(model.parameters(), lr=1e-2)
    info = opt.fused_backward(loss)    # backward + update; no .grad remains afterwards
    scheduler.step()                   # stock torch.optim.lr_scheduler classes work as usual

This file stands alone (torch and the standard library only), so it can be copied into other projects.
"""
import math
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["LOMO", "AdaLomo", "StepInfo", "stochastic_round_"]


@dataclass
class StepInfo:
    """What one `fused_backward` call did, for logging."""
    skipped: bool                      # True: no parameter was updated (or, see `reason`, the update stopped)
    reason: Optional[str] = None       # why the step was skipped
    grad_norm: Optional[float] = None  # global L2 norm of the gradients, when a check pass computed it
    loss_scale: Optional[float] = None  # the fp16 loss scale used for this step


def _local(t):
    """The local shard of an FSDP2 DTensor, or the tensor itself: no implicit collective runs on it."""
    return t.to_local() if hasattr(t, "to_local") else t


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Write fp32 `src` into bf16 `dst`, rounding stochastically so that E[dst] == src.

    bf16 is the top 16 bits of fp32. Adding uniform noise to the 16 low bits and truncating them rounds up with
    probability equal to the dropped fraction, so updates smaller than half a bf16 ulp survive on average.
    """
    bits = src.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device)
    rounded = (bits + noise) & -65536  # clear the low 16 bits (0xFFFF0000); the bf16 cast below is then exact
    return dst.copy_(rounded.view(torch.float32))


def _remove_all(handles):
    for handle in handles:
        handle.remove()


def _call_owner(owner, p, index):
    """The hook body: forward to the optimizer if it still exists. A tensor's hooks live in C++, where Python's
    garbage collector cannot see a cycle through them, so the hooks hold the optimizer by a weak reference."""
    opt = owner()
    if opt is not None:
        opt._on_grad(p, opt.param_groups[index])


class _FusedOptimizer(torch.optim.Optimizer):
    """The machinery shared by LOMO and AdaLomo: hooks, check pass, loss scaling, finiteness, state.

    A post-accumulate-grad hook on every trainable parameter does the work (LOMO Sec. 3.2). The hook receives
    its own parameter and group, so each call costs O(1), not a scan of all parameters.

    Passes over ONE forward graph:
      - check pass (retain_graph=True), run when `clip_grad_norm` is set, for fp16 parameters (loss scaling), or
        with `check_finite=True`: each hook adds the gradient's squared norm and frees the gradient. Then the
        global norm is known, and a non-finite one skips the whole step before any parameter changes.
      - update pass: each hook updates its parameter and frees the gradient.
    Without a check pass, a non-finite gradient found part-way cannot undo the updates already made to the
    parameters whose gradients came earlier: the remaining updates are stopped and the step is reported as
    skipped. Pass `check_finite=True` for full protection at the cost of a second backward pass.

    `process_group`: the parameters are dim-0 (row) shards of larger tensors spread over this group (as in
    ZeRO-3 or FSDP2). Quantities spanning a whole tensor are then reduced over it. None: nothing distributed.
    """

    def __init__(self, params, defaults, clip_grad_norm, clip_grad_value, check_finite, loss_scale,
                 loss_scale_window, stochastic_rounding, process_group):
        for name, value in (("clip_grad_norm", clip_grad_norm), ("clip_grad_value", clip_grad_value)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None, got {value}")
        if defaults["lr"] is None or not defaults["lr"] > 0:
            raise ValueError(f"lr must be > 0, got {defaults['lr']}")
        if defaults["weight_decay"] < 0:
            raise ValueError(f"weight_decay must be >= 0, got {defaults['weight_decay']}")
        if not loss_scale > 0 or loss_scale_window < 1:
            raise ValueError(f"loss_scale must be > 0 and loss_scale_window >= 1, got {loss_scale}, "
                             f"{loss_scale_window}")
        self.clip_grad_norm, self.clip_grad_value = clip_grad_norm, clip_grad_value
        self.stochastic_rounding, self.process_group = stochastic_rounding, process_group
        self.loss_scale_window = loss_scale_window
        self.steps = 0                 # update passes run so far
        self._clean_steps = 0          # fp16 steps since the last overflow
        self._phase = "idle"           # idle | check | update | discard
        self._hooks, self._global_size = [], {}
        weakref.finalize(self, _remove_all, self._hooks)  # a freed optimizer leaves no hook behind
        super().__init__(params, defaults)
        self.fp16 = any(p.dtype == torch.float16 for g in self.param_groups for p in g["params"])
        self.loss_scale = float(loss_scale) if self.fp16 else None
        self.check_pass = clip_grad_norm is not None or check_finite or self.fp16

    def add_param_group(self, param_group):
        """Add a group (torch.optim API) and hook each of its trainable parameters."""
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1  # by index: load_state_dict() replaces the group dicts
        group = self.param_groups[index]
        for p in group["params"]:
            if not p.is_floating_point():
                raise ValueError(f"params: got a {p.dtype} parameter; only floating-point parameters can be "
                                 "trained (pass only model.parameters() that are float)")
        trainable = [p for p in group["params"] if p.requires_grad]
        owner = weakref.ref(self)  # a hook must not keep its optimizer (and its process group) alive
        for p in trainable:
            self._hooks.append(p.register_post_accumulate_grad_hook(
                lambda p, index=index: _call_owner(owner, p, index)))
        # Rows and elements of each whole tensor, summed over the shards of the group: one collective.
        sizes = torch.tensor([[_local(p).shape[0] if p.dim() else 1, _local(p).numel()] for p in trainable],
                             dtype=torch.float64, device=_local(trainable[0]).device if trainable else "cpu")
        self._all_reduce(sizes)
        self._global_size.update({p: (int(r), int(n)) for p, (r, n) in zip(trainable, sizes.tolist())})

    def step(self, closure=None):
        """A no-op: the update already happened inside `fused_backward`, which calls this method so that the
        stock learning-rate schedulers see an optimizer step and raise no warning."""
        return None

    def _all_reduce(self, tensor, op=dist.ReduceOp.SUM):
        if self.process_group is not None:
            dist.all_reduce(tensor, op=op, group=self.process_group)
        return tensor

    def fused_backward(self, loss: torch.Tensor) -> StepInfo:
        """Run the backward pass of `loss` and update every parameter as soon as its gradient is ready
        (LOMO Sec. 3.2, Algorithm 1). Returns a `StepInfo`. No parameter holds a `.grad` afterwards."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise ValueError("loss must be a scalar tensor that requires grad (did you compute it under "
                             "torch.no_grad(), or with every parameter frozen?)")
        scale = self.loss_scale or 1.0
        info = StepInfo(skipped=False, loss_scale=self.loss_scale)
        finite = self._all_reduce(torch.isfinite(loss.detach()).float().reshape(1), dist.ReduceOp.MIN)
        if not finite.item():
            info.skipped, info.reason = True, "non-finite loss"
            return self._finish(info)
        self._clip_coef = 1.0
        if self.check_pass:
            self._squares = []
            self._backward("check", loss * scale, retain_graph=True)
            sq = torch.stack(self._squares).sum() if self._squares else loss.new_zeros((), dtype=torch.float32)
            info.grad_norm = self._all_reduce(sq.float()).sqrt().item()
            if not math.isfinite(info.grad_norm):
                self._backward("discard", loss * scale)  # frees the retained graph at once
                if self.fp16:
                    self.loss_scale, self._clean_steps = max(self.loss_scale / 2, 1.0), 0
                info.skipped, info.reason = True, "non-finite gradient (overflow)"
                return self._finish(info)
            if self.clip_grad_norm is not None:
                self._clip_coef = min(1.0, self.clip_grad_norm / (info.grad_norm + 1e-6))
        self._found_nonfinite = False
        self._backward("update", loss * scale)
        self.steps += 1
        if self._found_nonfinite:
            info.skipped, info.reason = True, "non-finite gradient: updates stopped part-way (use check_finite=True)"
        elif self.fp16:
            self._clean_steps += 1
            if self._clean_steps == self.loss_scale_window:  # grow the scale back after a clean window
                self.loss_scale, self._clean_steps = self.loss_scale * 2, 0
        return self._finish(info)

    def _finish(self, info):
        self.step()
        return info

    def _backward(self, phase, loss, retain_graph=False):
        self._phase = phase
        try:
            torch.autograd.backward(loss, retain_graph=retain_graph)
        finally:
            self._phase = "idle"

    @torch.no_grad()
    def _on_grad(self, p, group):
        """The post-accumulate-grad hook: called once per parameter per backward pass, with its full gradient
        (a tied weight's contributions are already summed)."""
        if self._phase == "idle":  # a plain loss.backward(): leave .grad to the caller
            return
        grad, p.grad = p.grad, None  # free the gradient at once
        if self._phase == "discard":
            return
        g, coef = _local(grad), 1.0 / (self.loss_scale or 1.0)  # coef: what multiplies g in the update
        if self.clip_grad_value is not None:  # clamp the true (unscaled) gradient
            g, coef = (g.float() * coef).clamp_(-self.clip_grad_value, self.clip_grad_value), 1.0
        if self._phase == "check":
            flat = g.reshape(-1).float()  # fp32 gradients: no copy
            self._squares.append(torch.dot(flat, flat) * coef ** 2)
            return
        if not self._update(p, _local(p), g, coef * self._clip_coef, group):
            self._found_nonfinite, self._phase = True, "discard"

    def _update(self, param, p, g, coef, group) -> bool:
        """Update the local tensor `p` of `param` with the gradient coef * g. False: a non-finite value was met."""
        raise NotImplementedError

    def _write_back(self, p, w):
        """Store the fp32 result `w` into `p`: fp32 params were updated in place; 16-bit ones are rounded."""
        if w is p:
            return
        if self.stochastic_rounding and p.dtype == torch.bfloat16:
            stochastic_round_(p, w)
        else:
            p.copy_(w)

    def state_dict(self):
        """torch.optim state plus what exact resumption needs: step count, fp16 loss scale."""
        sd = super().state_dict()
        sd["fused"] = {"steps": self.steps, "loss_scale": self.loss_scale, "clean_steps": self._clean_steps}
        return sd

    def load_state_dict(self, state_dict):
        """Restore `state_dict()`. State tensors keep their saved dtype (fp32 moments over bf16 weights)."""
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            if i in state_dict["state"]:
                device = _local(p).device
                self.state[p] = {k: v.to(device) if torch.is_tensor(v) else v
                                 for k, v in state_dict["state"][i].items()}
        fused = state_dict["fused"]
        self.steps, self.loss_scale, self._clean_steps = fused["steps"], fused["loss_scale"], fused["clean_steps"]


class LOMO(_FusedOptimizer):
    """LOMO: SGD fused into the backward pass (Lv et al. 2023, Sec. 3.2, Algorithm 1).

    Per parameter:  p <- p * (1 - lr * weight_decay) - lr * g   (decoupled weight decay; for plain SGD without
    momentum this equals torch.optim.SGD's weight_decay), where g is the gradient after unscaling (fp16),
    clamping to +-clip_grad_value, then scaling by min(1, clip_grad_norm / (||g|| + 1e-6)) (Sec. 3.3.1).

    16-bit parameters are updated in fp32 and rounded back; bf16 can round stochastically
    (`stochastic_rounding=True`). fp16 parameters use dynamic loss scaling (Sec. 3.3.2): an overflow skips the
    whole step and halves `loss_scale`; after `loss_scale_window` clean steps it doubles again.
    """

    def __init__(self, params, lr, clip_grad_norm=None, clip_grad_value=None, weight_decay=0.0,
                 check_finite=False, loss_scale=2.0 ** 16, loss_scale_window=1000, stochastic_rounding=False,
                 process_group=None):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay), clip_grad_norm, clip_grad_value,
                         check_finite, loss_scale, loss_scale_window, stochastic_rounding, process_group)

    def _update(self, param, p, g, coef, group):
        if not self.check_pass and not torch.isfinite(g.sum()):  # a sum is non-finite if any element is
            return False
        lr, weight_decay = group["lr"], group["weight_decay"]
        if weight_decay or (self.stochastic_rounding and p.dtype == torch.bfloat16):
            w = p.float()  # fp32 params: p itself, updated in place; 16-bit: an fp32 copy
            w.mul_(1 - lr * weight_decay).add_(g, alpha=-lr * coef)
            self._write_back(p, w)
        else:  # one kernel; for 16-bit p the arithmetic is done in fp32 and rounded once, without copies
            p.add_(g, alpha=-lr * coef)
        return True


class AdaLomo(_FusedOptimizer):
    """AdaLomo: LOMO with an adaptive, factored second moment (Lv et al. 2023b, arXiv 2310.10195, Sec. 3, Alg. 1).

    For the gradient g of a matrix W (any tensor with 2 or more dims, seen as (rows, -1)), at step t:
        beta_t = 1 - t ** decay_rate                                      (Adafactor Sec. 7)
        R <- beta_t R + (1 - beta_t) mean_cols(g^2 + eps1)   (rows)       (Adafactor Sec. 3, factored moment)
        C <- beta_t C + (1 - beta_t) mean_rows(g^2 + eps1)   (cols)
        u = g / sqrt(R C / mean(R))          (a vector v <- beta_t v + (1 - beta_t)(g^2 + eps1), u = g / sqrt(v))
        u <- u / max(1, RMS(u) / clip_threshold)                          (grouped update normalisation)
        step = lr * max(eps2, RMS(W))                                     (relative step size, Adafactor Sec. 8)
        W <- W * (1 - step * weight_decay) - step * u
    As in the official code, weight decay is scaled by the relative step size, not by lr alone.

    With `process_group`, W is a row shard: the column statistics, mean(R), RMS(u) and RMS(W) are reduced over
    the group (two all-reduces per parameter), so sharded training gives the unsharded result. Gradient
    clipping, fp16 loss scaling and the check pass work as in `LOMO`.
    """

    def __init__(self, params, lr, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, weight_decay=0.0,
                 clip_grad_norm=None, clip_grad_value=None, check_finite=False, loss_scale=2.0 ** 16,
                 loss_scale_window=1000, stochastic_rounding=False, process_group=None):
        if not clip_threshold > 0:
            raise ValueError(f"clip_threshold must be > 0, got {clip_threshold}")
        if not decay_rate < 0:
            raise ValueError(f"decay_rate must be < 0 (beta_t = 1 - t ** decay_rate), got {decay_rate}")
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate,
                        weight_decay=weight_decay)
        super().__init__(params, defaults, clip_grad_norm, clip_grad_value, check_finite, loss_scale,
                         loss_scale_window, stochastic_rounding, process_group)

    def _update(self, param, p, g, coef, group):
        g = g.float() if coef == 1.0 else g.float() * coef
        eps1, eps2 = group["eps"]
        beta = 1.0 - (self.steps + 1) ** group["decay_rate"]
        rows, numel = self._global_size[param]
        state = self.state[param]
        g2 = g.pow(2).add_(eps1)
        if p.dim() >= 2:
            g, g2 = g.reshape(p.shape[0], -1), g2.reshape(p.shape[0], -1)  # (rows, cols)
            if not state:
                state["row"] = g.new_zeros(g.shape[0])
                state["col"] = g.new_zeros(g.shape[1])
            row = beta * state["row"] + (1 - beta) * g2.mean(dim=1)
            sums = self._all_reduce(torch.cat([g2.sum(dim=0), row.sum().reshape(1)]))
            col = beta * state["col"] + (1 - beta) * sums[:-1] / rows
            row_mean = sums[-1] / rows
            u = g * (row / row_mean).rsqrt()[:, None] * col.rsqrt()[None, :]
            new_state = {"row": row, "col": col}
        else:
            if not state:
                state["sq"] = torch.zeros_like(g)
            sq = beta * state["sq"] + (1 - beta) * g2
            u = g * sq.rsqrt()
            new_state = {"sq": sq}
        w = p.float()
        sums = self._all_reduce(torch.stack([u.pow(2).sum(), w.pow(2).sum()]))
        if not torch.isfinite(sums).all():
            return False
        rms_update, rms_param = (sums / numel).sqrt()
        u.div_((rms_update / group["clip_threshold"]).clamp(min=1.0))
        step_size = group["lr"] * rms_param.clamp(min=eps2)
        if group["weight_decay"]:
            w.mul_(1 - step_size * group["weight_decay"])
        w.sub_(u.reshape(p.shape) * step_size)
        self._write_back(p, w)
        state.update(new_state)
        return True
