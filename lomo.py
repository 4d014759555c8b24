"""LOMO and AdaLomo: optimizers whose update is fused into the backward pass.

LOMO ("Full Parameter Fine-tuning for Large Language Models with Limited Resources", Lv et al. 2023,
arXiv 2306.09782) is plain SGD, which has no optimizer state, fused into the backward pass (Sec. 3.2,
Algorithm 1): each parameter is updated the moment its gradient is ready, and that gradient is freed at once,
so at most one parameter's gradient is alive at a time. AdaLomo (arXiv 2310.10195) adds an Adafactor-style
factored second moment and grouped update normalisation (Sec. 3, Algorithm 1).

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
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["LOMO", "AdaLomo", "StepInfo", "stochastic_round_", "CLIP_SCOPES"]

CLIP_SCOPES = ("global", "tensor")
_OWNERS = WeakIdKeyDictionary()  # parameter -> weak reference to the optimizer whose hook updates it


@dataclass
class StepInfo:
    """What one `fused_backward` call did, for logging. Equal on every rank of the process group."""
    skipped: bool                      # True: no parameter was updated (or, see `reason`, the update stopped)
    reason: Optional[str] = None       # why the step was skipped
    grad_norm: Optional[float] = None  # global L2 norm of the (unscaled, value-clipped) gradients before norm
    #                                    clipping, if computed (check pass, tensor-scope clipping, AdaLomo)
    loss_scale: Optional[float] = None  # the fp16 loss scale used for this step


def _local(t):
    """The local shard of an FSDP2 DTensor, or the tensor itself: no implicit collective runs on it."""
    return t.to_local() if hasattr(t, "to_local") else t


def _require(valid, name, value, rule):  # argument checks
    if not valid:
        raise ValueError(f"{name} must be {rule}, got {value!r}")


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Write fp32 `src` into bf16 `dst`, rounding stochastically so that E[dst] == src: bf16 is the top 16 bits
    of fp32, and uniform noise added to the 16 low bits before truncating them rounds up with probability equal
    to the dropped fraction, so updates below half a bf16 ulp survive on average. A NaN is copied as it is (the
    noise could carry into its sign, or clear the only set bits of its payload)."""
    bits = src.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device)
    rounded = (bits + noise) & -65536  # clear the low 16 bits (0xFFFF0000); the bf16 cast below is then exact
    rounded = torch.where(torch.isnan(src), bits, rounded)
    return dst.copy_(rounded.view(torch.float32))


CPU_CHUNK = 1 << 20  # elements per chunk of an fp32 tensor on the CPU: 4 MiB, which stays in its caches


def _chunk_elements(t: torch.Tensor) -> int:
    """Elements of `t` per chunk of an update, which bounds its fp32 temporaries. On the CPU, sizes that stay in
    cache; a quarter for 16-bit `t`, whose chunk is converted to fp32 in several temporaries at once."""
    if t.device.type != "cpu":
        return 1 << 24
    return CPU_CHUNK if t.dtype == torch.float32 else CPU_CHUNK // 4


def _rows_per_chunk(t: torch.Tensor) -> int:
    return max(1, _chunk_elements(t) // max(1, math.prod(t.shape[1:])))


def _chunks(t: torch.Tensor, rows: int):
    """Views of `t`, `rows` rows (dim 0) at a time; a 0-dim tensor counts as one row."""
    return (t if t.dim() else t.unsqueeze(0)).split(rows)


def _fp32_sum(t: torch.Tensor, squares=False) -> torch.Tensor:
    """sum(t), or sum(t * t), accumulated in fp32 without an fp32 copy of a 16-bit `t`. The CPU's reductions
    convert a 16-bit tensor to fp32 whole first, and its one-kernel norm loses digits on large tensors (2.7e-3
    relative at 2.5e7 elements): there, chunk by chunk (a BLAS dot each for the squares)."""
    if t.device.type != "cpu" or not (squares or t.dtype.itemsize == 2):
        return torch.linalg.vector_norm(t, dtype=torch.float32).square() if squares else t.sum(dtype=torch.float32)
    total = torch.zeros((), dtype=torch.float32)
    for c in t.reshape(-1).split(_chunk_elements(t)):
        c = c.float()
        total += torch.dot(c, c) if squares else c.sum()
    return total


def _guard(ok, dtype, t2, decay):
    """The operands of `_apply_` selected by the step's 0-dim bool flag `ok` (None: unguarded), with no host sync:
    the bit mask that keeps t1 (all ones) or zeroes it, inf and NaN included (all zeros); t2, or 0; decay, or 1.
    A selection, never a product with the flag: 0 * inf is NaN. (The CPU's torch.where with a 0-dim condition is
    not vectorised: ten times slower than the AND.)"""
    if ok is None:
        return None, t2, decay
    keep = -ok.to({2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize])
    t2 = torch.where(ok, t2, 0.0) if torch.is_tensor(t2) else t2
    return keep, t2, None if decay is None else torch.where(ok, decay, 1.0)


def _apply_(p, t1, t2, decay, keep, stochastic):
    """p <- p * decay + t1 * t2, in place, computed in fp32 and rounded once into p's dtype.

    t2: a float, or an fp32 tensor (one element, or a row of column factors) so that type promotion computes in
    fp32 for 16-bit p and t1 too: in the kernel on CUDA, through chunk-sized temporaries on the CPU (whose add_
    rounds a float alpha to p's dtype: 1e-3 / 65536 is 0 in fp16). decay: None, a number or a 1-element tensor.
    keep: None, or `_guard`'s bit mask, ANDed into t1 (a gradient chunk or a temporary, overwritten)."""
    if keep is not None:
        t1.view(keep.dtype).bitwise_and_(keep)
    if decay is None and not (stochastic and p.dtype == torch.bfloat16):
        if isinstance(t2, float) and (p.dtype == torch.float32 or p.device.type != "cpu"):
            p.add_(t1, alpha=t2)  # one kernel; CUDA keeps alpha in fp32 for 16-bit p
        else:
            p.addcmul_(t1, t2 if torch.is_tensor(t2) else torch.full((1,), t2, device=p.device))
        return
    w = p.float()  # fp32 p: p itself; 16-bit p: an fp32 copy of this chunk only
    if decay is not None:
        w.mul_(decay)
    w.add_(t1, alpha=t2) if isinstance(t2, float) else w.addcmul_(t1, t2)
    if w is not p:
        stochastic_round_(p, w) if stochastic and p.dtype == torch.bfloat16 else p.copy_(w)


def _remove_all(handles):
    """Remove an optimizer's hooks ({parameter: handle}) and its ownership of their parameters."""
    for p, handle in list(handles.items()):
        handle.remove()
        _OWNERS.pop(p, None)
    handles.clear()


def _call_owner(owner, p, index):
    """The hook body: forward to the optimizer if it still exists. A tensor's hooks live in C++, where Python's
    garbage collector cannot see a cycle through them, so the hooks hold the optimizer by a weak reference."""
    opt = owner()
    if opt is not None:
        opt._on_grad(p, opt.param_groups[index])


class _FusedOptimizer(torch.optim.Optimizer):
    """The machinery shared by LOMO and AdaLomo: hooks, check pass, loss scaling, finiteness, state.

    A post-accumulate-grad hook on every trainable parameter does the work (LOMO Sec. 3.2): autograd calls it once
    per backward pass, when the parameter's `.grad` is complete. The newest optimizer built over a parameter owns
    it: an older one's hook is removed, so nothing is updated twice. Passes over ONE forward graph:
      - check pass (retain_graph=True), for global-scope `clip_grad_norm`, fp16 parameters (loss scaling) and
        `check_finite=True`: each hook adds its gradient's squared norm and frees it. The host reads the sum (the
        step's one sync); a non-finite one skips the whole step before any parameter changes.
      - update pass: each hook updates its parameter (the subclass's `_update`) and frees the gradient.
    Without a check pass, a device flag records whether the loss and every gradient so far were finite and selects
    each update: updates stop at the first non-finite gradient, with no host sync per parameter. The flag is read
    after the pass; earlier updates cannot be undone, and the step is reported as skipped.

    `process_group`: the parameters are dim-0 (row) shards of tensors spread over this group (ZeRO-3, FSDP2).
    Whole-tensor quantities and the step's flags are reduced over it (StepInfo is equal on every rank). For LOMO's
    single pass to stop at the same parameter on every rank, the sharding layer must make a non-finite gradient
    visible to all (shard.NonFiniteGuard); AdaLomo and tensor-scope clipping reduce per-tensor statistics anyway.
    """

    def __init__(self, params, defaults, clip_grad_norm, clip_grad_value, check_finite, loss_scale,
                 loss_scale_window, stochastic_rounding, process_group, clip_grad_norm_scope):
        lr, weight_decay = defaults["lr"], defaults["weight_decay"]
        _require(lr is not None and lr > 0, "lr", lr, "> 0")
        _require(weight_decay >= 0, "weight_decay", weight_decay, ">= 0")
        for name, value in (("clip_grad_norm", clip_grad_norm), ("clip_grad_value", clip_grad_value)):
            _require(value is None or value > 0, name, value, "> 0 or None")
        _require(clip_grad_norm_scope in CLIP_SCOPES, "clip_grad_norm_scope", clip_grad_norm_scope,
                 f"one of {CLIP_SCOPES}")
        _require(loss_scale > 0, "loss_scale", loss_scale, "> 0")
        _require(loss_scale_window >= 1, "loss_scale_window", loss_scale_window, ">= 1")
        self.clip_grad_norm, self.clip_grad_value = clip_grad_norm, clip_grad_value
        self.clip_grad_norm_scope, self.check_finite = clip_grad_norm_scope, check_finite
        self.stochastic_rounding, self.process_group = stochastic_rounding, process_group
        self.initial_loss_scale, self.loss_scale_window = float(loss_scale), loss_scale_window
        self.fp16, self.loss_scale = False, None  # set by add_param_group when an fp16 parameter arrives
        self.steps, self._clean_steps = 0, 0  # update passes run so far; fp16 steps since the last overflow
        self._phase, self._seen = "idle", set()  # idle | check | update | discard; parameters hooked this pass
        self._handles, self._taken, self._removed, self._global_size = {}, 0, False, {}
        self._external = []            # parameters that another optimizer trains beside this one
        weakref.finalize(self, _remove_all, self._handles)  # a freed optimizer leaves no hook behind
        super().__init__(params, defaults)

    @property
    def check_pass(self) -> bool:
        """Whether a step runs the check pass (see the class docstring)."""
        return self.check_finite or self.fp16 or (self.clip_grad_norm is not None
                                                  and self.clip_grad_norm_scope == "global")

    def add_param_group(self, param_group):
        """Add a group (torch.optim API) and hook each of its trainable parameters."""
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1  # by index: load_state_dict() replaces the group dicts
        params = self.param_groups[index]["params"]
        for p in params:
            if not p.is_floating_point():
                raise ValueError(f"params: got a {p.dtype} parameter; only floating-point parameters can be "
                                 "trained (pass only model.parameters() that are float)")
        if not self.fp16 and any(p.dtype == torch.float16 for p in params):  # loss scaling and overflow checks
            self.fp16, self.loss_scale = True, self.initial_loss_scale
        for p in params:
            if p.requires_grad:
                self._hook(p, index)
        # Rows and elements of each whole tensor, summed over the shards of the group: one collective. Frozen
        # parameters too, in case they are unfrozen later.
        sizes = torch.tensor([[_local(p).shape[0] if p.dim() else 1, _local(p).numel()] for p in params],
                             dtype=torch.float64, device=_local(params[0]).device if params else "cpu")
        self._all_reduce(sizes)
        self._global_size.update({p: (int(r), int(n)) for p, (r, n) in zip(params, sizes.tolist())})

    def _hook(self, p, index):
        """Register this optimizer's hook on `p`, taking `p` over from an older optimizer that still hooks it."""
        previous = _OWNERS.get(p)
        previous = previous() if previous is not None else None
        if previous is not None and previous is not self:
            previous._handles.pop(p).remove()
            previous._taken += 1
        owner = weakref.ref(self)  # a hook must not keep its optimizer (and its process group) alive
        self._handles[p] = p.register_post_accumulate_grad_hook(lambda p, index=index: _call_owner(owner, p, index))
        _OWNERS[p] = owner

    def add_external_params(self, params):
        """Declare parameters that another optimizer trains beside this one, from the `.grad` that `fused_backward`
        leaves them: LoRA adapters stepped by AdamW after the pass in which LOMO updates every base weight (the
        paper's LoRA + LOMO experiment). Their `.grad` is the update pass's alone (of the scaled loss with fp16:
        divide by StepInfo.loss_scale); they must hold none when a step starts, and take no part in this
        optimizer's norm, clipping or finiteness checks."""
        self._external.extend(params)

    def remove_hooks(self):
        """Detach from the parameters (a later backward leaves their `.grad` to the caller); no more steps."""
        _remove_all(self._handles)
        self._removed = True

    def _name(self, p) -> str:
        """How an error message names `p`: its name if the optimizer got named parameters, else its position."""
        for gi, group in enumerate(self.param_groups):
            for i, q in enumerate(group["params"]):
                if q is p:
                    names = group.get("param_names")
                    return repr(names[i]) if names else f"parameter {i} of param group {gi} (shape {tuple(q.shape)})"
        return f"a parameter of shape {tuple(p.shape)}"

    def _prepare(self):
        """Before a step: refuse a retired optimizer and stale gradients; hook parameters unfrozen since the last
        step (torch.optim.SGD trains a parameter of its groups as soon as it gets a gradient; so does this)."""
        if self._removed:
            raise RuntimeError("this optimizer can no longer step: remove_hooks() was called; build a new one")
        if self._taken:
            raise RuntimeError(f"this optimizer can no longer step: {self._taken} of its parameters now belong to "
                               "a newer LOMO / AdaLomo built over them; step with that one")
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is not None:
                    raise RuntimeError(
                        f"{self._name(p)} already has a .grad (from a plain loss.backward()?); fused_backward "
                        "applies each gradient as it is computed and cannot use it: call "
                        "optimizer.zero_grad() (or model.zero_grad()) before fused_backward")
                if p.requires_grad and p not in self._handles:
                    self._hook(p, index)
        if any(p.grad is not None for p in self._external):
            raise RuntimeError("a parameter given to add_external_params() already has a .grad: zero its optimizer's "
                               "gradients (optimizer.zero_grad()) after each step, before fused_backward")

    def step(self, closure=None):
        """A no-op: the update happened in `fused_backward`, which calls this so that lr schedulers see a step."""
        return None

    def _all_reduce(self, tensor):
        """Sum `tensor` over the process group, in place."""
        if self.process_group is not None:
            dist.all_reduce(tensor, group=self.process_group)
        return tensor

    def fused_backward(self, loss: torch.Tensor) -> StepInfo:
        """Run the backward pass of `loss` and update every parameter as soon as its gradient is ready
        (LOMO Sec. 3.2, Algorithm 1). Returns a `StepInfo`. No parameter holds a `.grad` afterwards.
        The host waits for the device once per step (reading the step's flags back), never per parameter."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise ValueError("loss must be a scalar tensor that requires grad (did you compute it under "
                             "torch.no_grad(), or with every parameter frozen?)")
        self._prepare()
        scale = self.loss_scale or 1.0
        self._coef = 1.0 / scale  # what multiplies a gradient in the update: unscaling, then norm clipping
        info = StepInfo(skipped=False, loss_scale=self.loss_scale)
        # Device flags: the loss is finite on every rank; every gradient so far was finite. And the squared norm.
        loss_ok = self._all_reduce((~torch.isfinite(loss.detach())).float().reshape(1))[0] == 0
        self._ok, self._norm_known = loss_ok.clone(), True
        self._sq = torch.zeros((), dtype=torch.float32, device=loss.device)
        self._guarded = not self.check_pass
        if self.check_pass:
            self._backward("check", loss * scale, retain_graph=True)
            finite, bad, sq = self._read_back(loss_ok)
            info.grad_norm = math.sqrt(sq) * self._coef
            bad = bad or not math.isfinite(info.grad_norm)
            if finite and not bad and self.clip_grad_norm is not None and self.clip_grad_norm_scope == "global":
                self._coef *= min(1.0, self.clip_grad_norm / (info.grad_norm + 1e-6))
            self._backward("update" if finite and not bad else "discard", loss * scale)  # discard: frees the graph only
        else:
            self._backward("update", loss * scale)
            finite, bad, sq = self._read_back(loss_ok)
            info.grad_norm = math.sqrt(sq) / scale if finite and self._norm_known else None
        if not finite:  # nothing changed (single pass: every update was deselected)
            info.reason = "non-finite loss"
        elif bad and self.check_pass:  # found by the check pass: nothing changed
            info.reason = "non-finite gradient (overflow)"
            if self.fp16:
                self.loss_scale, self._clean_steps = max(self.loss_scale / 2, 1.0), 0
        else:
            self.steps += 1
            if bad:
                info.reason = "non-finite gradient: updates stopped part-way (use check_finite=True)"
            elif self.fp16:
                self._clean_steps += 1
                if self._clean_steps == self.loss_scale_window:  # grow the scale back after a clean window
                    self.loss_scale, self._clean_steps = self.loss_scale * 2, 0
        info.skipped = info.reason is not None
        self._ok = self._sq = None
        self.step()
        return info

    def _read_back(self, loss_ok):
        """(loss finite, some gradient non-finite, squared norm), over every rank: the step's one host sync."""
        flags = self._all_reduce(torch.stack([(~self._ok).float(), self._sq]))
        finite, bad, sq = torch.cat([loss_ok.float().reshape(1), flags]).tolist()
        return finite == 1, bad > 0, sq

    def _backward(self, phase, loss, retain_graph=False):
        self._phase, self._seen = phase, set()
        try:
            torch.autograd.backward(loss, retain_graph=retain_graph)
        except RuntimeError as error:
            if retain_graph and "donated buffer" in str(error):
                raise RuntimeError(
                    "torch.compile: this model's compiled backward frees its buffers (donated buffers) and cannot "
                    "run twice, but the check pass (global-scope clip_grad_norm, fp16 loss scaling, check_finite) "
                    "needs a second backward over the same graph. No parameter was changed. Set torch._functorch."
                    "config.donated_buffer = False before the model's first compiled step, or train without a check "
                    "pass (e.g. clip_grad_norm_scope='tensor')") from error
            raise
        finally:
            self._phase, self._seen = "idle", set()
        if phase != "update":  # add_external_params: their gradient comes from the update pass alone
            for p in self._external:
                p.grad = None

    def _record(self, sq, finite):
        """Note a local gradient's squared norm (for StepInfo.grad_norm; None: not computed) and its finiteness."""
        if sq is None:
            self._norm_known = False
        else:
            self._sq.add_(sq)
        self._ok.logical_and_(finite)

    @torch.no_grad()
    def _on_grad(self, p, group):
        """The post-accumulate-grad hook: called once per parameter per backward pass, with its full gradient
        (a tied weight's contributions are already summed)."""
        if self._phase == "idle":  # a plain loss.backward(): leave .grad to the caller
            return
        if p in self._seen:
            raise RuntimeError(
                f"{self._name(p)} received its gradient in two parts in one backward pass, so its update would use "
                "half a gradient. This happens with reentrant activation checkpointing of a weight that is also "
                "used outside the checkpointed region: use torch.utils.checkpoint.checkpoint(..., "
                "use_reentrant=False)")
        self._seen.add(p)
        grad, p.grad = p.grad, None  # free the gradient at once
        if self._phase == "discard":
            return
        g, coef = _local(grad), self._coef
        if self.clip_grad_value is not None:  # clamp the true (unscaled) gradient, in place
            self._ok.logical_and_(torch.isfinite(_fp32_sum(g)))  # first: clamping turns inf finite
            bound = min(self.clip_grad_value * (self.loss_scale or 1.0), torch.finfo(g.dtype).max)
            g = g.clamp_(-bound, bound)
        if self._phase == "check":
            self._sq.add_(_fp32_sum(g, squares=True))
            return
        sq = None
        if self.clip_grad_norm is not None and self.clip_grad_norm_scope == "tensor":
            sq = _fp32_sum(g, squares=True)  # this rank's rows; the clip uses the whole tensor's norm
            whole = self._all_reduce(sq.reshape(1).clone())[0] if self.process_group is not None else sq
            norm = whole.sqrt() * coef
            self._record(sq, torch.isfinite(norm))
            coef = coef * (self.clip_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        self._update(p, _local(p), g, coef, group, sq)

    def _update(self, param, p, g, coef, group, sq):
        """Update the local tensor `p` of `param` with the gradient coef * g (coef: a float or a 0-dim tensor).
        sq: g's squared norm if already recorded, else None."""
        raise NotImplementedError

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
                self.state[p] = {k: v.to(_local(p).device) if torch.is_tensor(v) else v
                                 for k, v in state_dict["state"][i].items()}
        fused = state_dict["fused"]
        self.steps, self.loss_scale, self._clean_steps = fused["steps"], fused["loss_scale"], fused["clean_steps"]


class LOMO(_FusedOptimizer):
    """LOMO: SGD fused into the backward pass (Lv et al. 2023, Sec. 3.2, Algorithm 1).

    Per parameter:  p <- p * (1 - lr * weight_decay) - lr * g  (decoupled weight decay: for SGD without momentum,
    the same as torch.optim.SGD's), where g is the gradient unscaled (fp16), clamped to +-clip_grad_value, then
    scaled by min(1, clip_grad_norm / (||g|| + 1e-6)) (Sec. 3.3.1), ||g|| being the global norm of all gradients
    (clip_grad_norm_scope="global": a check pass) or the parameter's own ("tensor": grouped norm clipping, one
    pass; the paper's Sec. 3.3.1 discussion). 16-bit parameters are updated in fp32 arithmetic and rounded once,
    without an fp32 copy of the weight on the GPU; bf16 can round stochastically (`stochastic_rounding=True`).
    fp16 parameters use dynamic loss scaling (Sec. 3.3.2): an overflow skips the whole step and halves
    `loss_scale`; `loss_scale_window` clean steps double it again.
    """

    def __init__(self, params, lr, clip_grad_norm=None, clip_grad_value=None, weight_decay=0.0,
                 check_finite=False, loss_scale=2.0 ** 16, loss_scale_window=1000, stochastic_rounding=False,
                 process_group=None, clip_grad_norm_scope="global"):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay), clip_grad_norm, clip_grad_value,
                         check_finite, loss_scale, loss_scale_window, stochastic_rounding, process_group,
                         clip_grad_norm_scope)

    def _update(self, param, p, g, coef, group, sq):
        if self._guarded and sq is None:  # one read of g: a sum is non-finite if any element is
            self._record(None, torch.isfinite(_fp32_sum(g)))
        lr, weight_decay = group["lr"], group["weight_decay"]
        alpha = -lr * coef  # a float, or (tensor-scope clipping) a 0-dim tensor: made 1-dim for type promotion
        alpha = alpha.reshape(1) if torch.is_tensor(alpha) else alpha
        keep, alpha, decay = _guard(self._ok if self._guarded else None, g.dtype, alpha,
                                    1 - lr * weight_decay if weight_decay else None)
        rows = _rows_per_chunk(p)
        for pc, gc in zip(_chunks(p, rows), _chunks(g, rows)):
            _apply_(pc, gc, alpha, decay, keep, self.stochastic_rounding)


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

    Two reads of g, in chunks of rows: the first gathers R, the column sums of g^2 and of g^2 / R (which give
    sum(u^2) = mean(R) sum_j (sum_i g_ij^2 / R_i) / C_j without forming u) and sum(W^2); the second applies
    W <- W * decay - (g * a_i) * b_j (per-row a, per-column b). With `process_group`, W is a row shard: the column
    statistics, sum(R), sum(u^2) and sum(W^2) are all-reduced in one collective per parameter, so sharded training
    gives the unsharded result. Clipping, fp16 loss scaling and the check pass work as in `LOMO`.
    """

    def __init__(self, params, lr, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, weight_decay=0.0,
                 clip_grad_norm=None, clip_grad_value=None, check_finite=False, loss_scale=2.0 ** 16,
                 loss_scale_window=1000, stochastic_rounding=False, process_group=None,
                 clip_grad_norm_scope="global"):
        _require(clip_threshold > 0, "clip_threshold", clip_threshold, "> 0")
        _require(decay_rate < 0, "decay_rate", decay_rate, "< 0 (beta_t = 1 - t ** decay_rate)")
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate,
                        weight_decay=weight_decay)
        super().__init__(params, defaults, clip_grad_norm, clip_grad_value, check_finite, loss_scale,
                         loss_scale_window, stochastic_rounding, process_group, clip_grad_norm_scope)

    def _update(self, param, p, g, coef, group, sq):
        eps1, eps2 = group["eps"]
        beta = 1.0 - (self.steps + 1) ** group["decay_rate"]
        rows, numel = self._global_size[param]
        state, coef2, f32 = self.state[param], coef * coef, dict(dtype=torch.float32, device=g.device)
        if p.dim() >= 2:  # factored: g as (rows, cols); statistics of the true gradient coef * g
            n_rows, cols = p.shape[0], math.prod(p.shape[1:])
            g, p = g.reshape(n_rows, cols), p.view(n_rows, cols)
            if not state:
                state["row"], state["col"] = torch.zeros(n_rows, **f32), torch.zeros(cols, **f32)
            stats = torch.zeros(2 * cols + 2, **f32)  # column sums of g^2 and of g^2 / R, sum(R), sum(W^2)
            col_sq, col_c = stats[:cols], stats[cols:2 * cols]
            row = beta * state["row"] + (1 - beta) * eps1  # R, whose gradient term is added chunk by chunk
            row_scale = (1 - beta) * coef2 / cols
            chunk = _rows_per_chunk(g)
            for gc, r in zip(g.split(chunk), row.split(chunk)):  # read 1 of g
                g2 = gc * gc if gc.dtype == torch.float32 else gc.float().square_()  # a chunk: stays in cache
                r.add_(g2.sum(1).mul_(row_scale))  # + (1 - beta) coef^2 mean_j g_ij^2
                col_sq += g2.sum(0)
                col_c.addmv_(g2.t(), r.reciprocal())  # sum_i g_ij^2 / R_i
            g_sq = col_sq.sum()
            stats[-2], stats[-1] = row.sum(), _fp32_sum(p, squares=True)
            self._all_reduce(stats)
            col = beta * state["col"] + (1 - beta) * (coef2 * col_sq / rows + eps1)
            row_mean = stats[-2] / rows
            sum_u2, w_sq, new_state = coef2 * row_mean * (col_c / col).sum(), stats[-1], {"row": row, "col": col}
        else:  # a vector: an unfactored second moment; small, in one piece
            g, p = g.reshape(-1), p.view(-1)
            if not state:
                state["sq"] = torch.zeros(g.shape, **f32)
            gf = g.float()
            v = beta * state["sq"] + (1 - beta) * (coef2 * gf * gf + eps1)
            t = gf * v.rsqrt()  # u / coef
            g_sq = gf.square().sum()
            stats = self._all_reduce(torch.stack([coef2 * t.square().sum(), _fp32_sum(p, squares=True)]))
            sum_u2, w_sq, new_state = stats[0], stats[1], {"sq": v}
        finite = torch.isfinite(sum_u2) & torch.isfinite(w_sq)
        self._record(g_sq, finite) if sq is None else self._ok.logical_and_(finite)  # sq: already recorded
        step = group["lr"] * (w_sq / numel).sqrt().clamp(min=eps2)
        factor = -coef * step / ((sum_u2 / numel).sqrt() / group["clip_threshold"]).clamp(min=1.0)
        decay = 1 - step * group["weight_decay"] if group["weight_decay"] else None
        ok = self._ok if self._guarded else None  # the flag that selects the update, if one is needed
        if p.dim() == 2:
            a = (factor * (row_mean / row).sqrt())[:, None]  # u * factor = (g * a_i) * b_j
            keep, b, decay = _guard(ok, torch.float32, col.rsqrt(), decay)
            for gc, pc, ac in zip(g.split(chunk), p.split(chunk), a.split(chunk)):  # read 2 of g
                _apply_(pc, gc * ac, b, decay, keep, self.stochastic_rounding)
        else:
            keep, factor, decay = _guard(ok, torch.float32, factor.reshape(1), decay)
            _apply_(p, t, factor, decay, keep, self.stochastic_rounding)
        for key, value in new_state.items():  # the moments advance only with the parameter
            state[key] = value if ok is None else torch.where(ok, value, state[key])
