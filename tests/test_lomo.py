"""lomo.py against independent references: torch.optim.SGD, an unfused AdaLomo, single-process runs."""
import copy
import math
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from conftest import ROOT
from dist_utils import run_workers
from lomo import LOMO, AdaLomo, stochastic_round_


class TiedNet(nn.Module):
    """A small net with 1-D and 2-D parameters, a tied weight (used twice) and a frozen one."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.inp = nn.Linear(6, 10)
        self.hidden = nn.Linear(10, 10)
        self.norm = nn.Parameter(torch.ones(10))
        self.frozen = nn.Parameter(torch.randn(10), requires_grad=False)
        self.out = nn.Linear(10, 3, bias=False)
        self.to(dtype)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.hidden(h)) * self.norm + self.frozen
        h = torch.tanh(self.hidden(h))  # tied: the same weight a second time
        return self.out(h)


def make_data(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)


def loss_fn(model, x, y):
    return (model(x).float() - y).pow(2).mean()


def backward_both(opt, model, ref, seed=1):
    """One fused step of `opt` on `model`, and a plain backward pass of the same batch on its copy `ref`, whose
    reference optimizer the caller then steps. Returns the StepInfo."""
    x, y = make_data(seed=seed)
    info = opt.fused_backward(loss_fn(model, x, y))
    loss_fn(ref, x, y).backward()
    return info


def assert_params_close(a, b, atol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("kw", [{}, {"clip_grad_norm": 0.05}, {"clip_grad_value": 0.01}, {"weight_decay": 0.1},
                                {"clip_grad_value": 0.02, "clip_grad_norm": 0.05, "weight_decay": 0.1}])
def test_lomo_equals_sgd(kw):
    torch.manual_seed(0)
    model = TiedNet()
    ref = copy.deepcopy(model)
    opt = LOMO(model.parameters(), lr=0.1, **kw)
    sgd = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.1,
                          weight_decay=kw.get("weight_decay", 0.0))
    for step in range(5):
        info = backward_both(opt, model, ref, step)
        if "clip_grad_value" in kw:
            torch.nn.utils.clip_grad_value_(ref.parameters(), kw["clip_grad_value"])
        if "clip_grad_norm" in kw:
            norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), kw["clip_grad_norm"])
            assert info.grad_norm == pytest.approx(norm.item(), rel=1e-5)
        sgd.step()
        sgd.zero_grad()
        assert not info.skipped
    assert_params_close(model, ref, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_scheduler_drives_lr_without_warning():
    torch.manual_seed(0)
    model = TiedNet()
    ref = copy.deepcopy(model)
    opt = LOMO(model.parameters(), lr=0.2)
    sgd = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.2)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.1, total_iters=4)
    ref_sched = torch.optim.lr_scheduler.LinearLR(sgd, start_factor=1.0, end_factor=0.1, total_iters=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(4):
            backward_both(opt, model, ref, step)
            sgd.step()
            sgd.zero_grad()
            sched.step()
            ref_sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * 0.1)
    assert_params_close(model, ref, atol=1e-6)


def adalomo_reference(params, grads, states, step, lr, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8,
                      weight_decay=0.0):
    """AdaLomo written out unfused on whole tensors, following the paper's Algorithm 1 / the official code."""
    beta = 1.0 - step ** decay_rate
    for p, g, st in zip(params, grads, states):
        g = g.double()
        g2 = g * g + eps[0]
        if g.dim() == 2:
            st["r"] = beta * st.get("r", 0) + (1 - beta) * g2.mean(1)
            st["c"] = beta * st.get("c", 0) + (1 - beta) * g2.mean(0)
            v = torch.outer(st["r"], st["c"]) / st["r"].mean()
        else:
            st["v"] = beta * st.get("v", 0) + (1 - beta) * g2
            v = st["v"]
        u = g / v.sqrt()
        u = u / max(1.0, (u.norm() / math.sqrt(u.numel())).item() / clip_threshold)
        alpha = lr * max(eps[1], (p.double().norm() / math.sqrt(p.numel())).item())
        p.copy_(p.double() * (1 - alpha * weight_decay) - alpha * u)


@pytest.mark.parametrize("kw", [{}, {"weight_decay": 0.1, "clip_grad_norm": 0.05}])
def test_adalomo_equals_unfused_reference(kw):
    torch.manual_seed(0)
    model = TiedNet()
    ref = copy.deepcopy(model)
    opt = AdaLomo(model.parameters(), lr=0.05, **kw)
    params = [p for p in ref.parameters() if p.requires_grad]
    states = [{} for _ in params]
    for step in range(1, 5):
        info = backward_both(opt, model, ref, step)
        norm = torch.stack([p.grad.norm() for p in params]).norm().item()
        assert info.grad_norm == pytest.approx(norm, rel=1e-5)  # single pass: from AdaLomo's own statistics
        if "clip_grad_norm" in kw:
            torch.nn.utils.clip_grad_norm_(params, kw["clip_grad_norm"])
        with torch.no_grad():
            adalomo_reference(params, [p.grad for p in params], states, step, lr=0.05,
                              weight_decay=kw.get("weight_decay", 0.0))
        for p in params:
            p.grad = None
    assert_params_close(model, ref, atol=1e-6)


@pytest.mark.parametrize("make_opt", [lambda ps: LOMO(ps, lr=0.1), lambda ps: LOMO(ps, lr=0.1, clip_grad_norm=1.0),
                                      lambda ps: AdaLomo(ps, lr=0.1)])
def test_at_most_one_gradient_alive(make_opt):
    model = TiedNet()
    params = [p for p in model.parameters() if p.requires_grad]
    live_counts = []
    # Registered before the optimizer's hooks, so it runs first: the current gradient is still alive here.
    for p in params:
        p.register_post_accumulate_grad_hook(
            lambda p: live_counts.append(sum(q.grad is not None for q in params)))
    opt = make_opt(model.parameters())
    x, y = make_data()
    opt.fused_backward(loss_fn(model, x, y))
    assert live_counts and max(live_counts) == 1
    assert all(p.grad is None for p in model.parameters())
    # One hook call per parameter and pass (the tied weight's two uses give one call with the summed gradient).
    assert len(live_counts) == len(params) * (2 if opt.check_pass else 1)


def test_frozen_parameter_untouched():
    model = TiedNet()
    before = model.frozen.clone()
    opt = LOMO(model.parameters(), lr=0.1)
    opt.fused_backward(loss_fn(model, *make_data()))
    assert torch.equal(model.frozen, before) and model.frozen.grad is None


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def inject_inf(model):
    """Make the gradient flowing out of model.out into the layers below infinite; model.out's own is finite."""
    return model.out.register_full_backward_hook(lambda m, grad_in, grad_out: (torch.full_like(grad_in[0], math.inf),))


def test_fp16_overflow_skips_whole_step_and_scale_recovers():
    torch.manual_seed(0)
    model = TiedNet(torch.float16)
    opt = LOMO(model.parameters(), lr=0.01, loss_scale=1024.0, loss_scale_window=2)
    x, y = make_data()
    before = snapshot(model)
    handle = inject_inf(model)
    info = opt.fused_backward(loss_fn(model, x.half(), y))
    handle.remove()
    assert info.skipped and info.loss_scale == 1024.0
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(model)))  # bit-identical
    assert all(p.grad is None for p in model.parameters())
    assert opt.loss_scale == 512.0
    for _ in range(2):
        assert not opt.fused_backward(loss_fn(model, x.half(), y)).skipped
    assert opt.loss_scale == 1024.0
    assert not all(torch.equal(a, b) for a, b in zip(before, snapshot(model)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_clip_grad_value_does_not_hide_an_infinite_gradient(dtype):
    """Clamping turns inf into the bound: finiteness is judged before it (fp16: an overflow, so the whole step is
    skipped and the scale halves; bf16, single pass: the updates stop)."""
    torch.manual_seed(0)
    model = TiedNet(dtype)
    before = snapshot(model)
    opt = LOMO(model.parameters(), lr=0.01, clip_grad_value=0.01, loss_scale=1024.0)
    first = model.inp.weight.detach().clone()
    handle = model.inp.weight.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), math.inf))  # no NaN
    x, y = make_data()
    info = opt.fused_backward(loss_fn(model, x.to(dtype), y))
    handle.remove()
    assert info.skipped and "non-finite gradient" in info.reason
    after = snapshot(model)
    assert torch.equal(model.inp.weight, first)  # the first layer's (infinite) gradient is never applied
    if dtype == torch.float16:
        assert opt.loss_scale == 512.0 and all(torch.equal(a, b) for a, b in zip(before, after))


def test_nonfinite_loss_skips_step():
    model = TiedNet()
    before = snapshot(model)
    opt = AdaLomo(model.parameters(), lr=0.1)
    info = opt.fused_backward(loss_fn(model, *make_data()) * math.nan)
    assert info.skipped and "loss" in info.reason
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(model)))


@pytest.mark.parametrize("check_finite", [False, True])
def test_nonfinite_gradient_single_pass_stops_and_check_pass_protects(check_finite):
    model = TiedNet(torch.bfloat16)
    before = snapshot(model)
    opt = LOMO(model.parameters(), lr=0.1, check_finite=check_finite)
    handle = inject_inf(model)  # model.out's own gradient is finite: it comes first and is applied
    x, y = make_data()
    info = opt.fused_backward(loss_fn(model, x.bfloat16(), y))
    handle.remove()
    assert info.skipped and "non-finite gradient" in info.reason
    assert all(p.grad is None for p in model.parameters())
    after = snapshot(model)
    assert all(torch.isfinite(p).all() for p in after)
    out_changed = not torch.equal(before[-1], after[-1])
    assert out_changed == (not check_finite)
    assert torch.equal(before[0], after[0])  # the first layer's gradient comes last: never applied


def test_stochastic_rounding_is_unbiased():
    ulp = 2.0 ** -7  # bf16 spacing in [1, 2)
    for target in (1.0 + 0.3 * ulp, -(1.0 + 0.8 * ulp)):
        src = torch.full((200_000,), target)
        dst = stochastic_round_(torch.empty(200_000, dtype=torch.bfloat16), src)
        assert set(dst.float().abs().unique().tolist()) == {1.0, 1.0 + ulp}
        assert dst.double().mean().item() == pytest.approx(target, abs=0.01 * ulp)


@pytest.mark.parametrize("stochastic", [False, True])
def test_bf16_tiny_updates_need_stochastic_rounding(stochastic):
    torch.manual_seed(0)
    w = nn.Parameter(torch.ones(1000, dtype=torch.bfloat16))
    opt = LOMO([w], lr=1e-3, stochastic_rounding=stochastic)  # update 1e-3 < half an ulp (3.9e-3)
    for _ in range(100):
        opt.fused_backward(w.float().pow(2).sum() / 2)  # gradient = w, target 0
    moved = 1.0 - w.float().mean().item()
    if stochastic:
        assert moved == pytest.approx(1 - (1 - 1e-3) ** 100, rel=0.1)  # about 0.095, as in exact arithmetic
    else:
        assert moved == 0.0


def test_state_dict_resumes_exactly():
    def run(steps, resume_at=None):
        torch.manual_seed(0)
        model = TiedNet(torch.float16)
        opt = AdaLomo(model.parameters(), lr=0.05, loss_scale_window=2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step))
        for step in range(steps):
            if step == resume_at:
                state, sched_state = copy.deepcopy(opt.state_dict()), sched.state_dict()
                opt = AdaLomo(model.parameters(), lr=0.05, loss_scale_window=2)
                sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step))
                opt.load_state_dict(state)
                sched.load_state_dict(sched_state)
            x, y = make_data(seed=step)
            opt.fused_backward(loss_fn(model, x.half(), y))
            sched.step()
        return model, opt

    (a, opt_a), (b, opt_b) = run(5), run(5, resume_at=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert opt_a.loss_scale == opt_b.loss_scale == 2.0 ** 18
    assert all(v.dtype == torch.float32 for s in opt_b.state.values() for v in s.values())


def test_unreferenced_optimizer_is_freed_and_leaves_no_hook():
    """The hooks hold the optimizer weakly: a tensor's hooks live in C++, where the garbage collector cannot break
    a cycle, so a strong reference kept every optimizer (and its process group) alive for the life of the process."""
    import gc
    import weakref

    w = nn.Parameter(torch.ones(3))
    opt = LOMO([w], lr=0.1)
    alive = weakref.ref(opt)
    del opt
    gc.collect()
    assert alive() is None
    (w * 2).sum().backward()  # no optimizer any more: a plain backward keeps its gradient, w is untouched
    assert torch.equal(w.grad, torch.full((3,), 2.0)) and torch.equal(w.detach(), torch.ones(3))


def test_bad_arguments_name_the_argument():
    model = TiedNet()
    with pytest.raises(ValueError, match="lr"):
        LOMO(model.parameters(), lr=0)
    with pytest.raises(ValueError, match="clip_grad_norm"):
        LOMO(model.parameters(), lr=0.1, clip_grad_norm=0)
    with pytest.raises(ValueError, match="clip_grad_value"):
        AdaLomo(model.parameters(), lr=0.1, clip_grad_value=-1)
    with pytest.raises(ValueError, match="params"):
        LOMO([nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False)], lr=0.1)
    opt = LOMO(model.parameters(), lr=0.1)
    with torch.no_grad():
        loss = loss_fn(model, *make_data())
    with pytest.raises(ValueError, match="loss"):
        opt.fused_backward(loss)


def test_import_from_a_lone_copy(tmp_path):
    shutil.copy(os.path.join(ROOT, "lomo.py"), tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", "import lomo; lomo.LOMO; lomo.AdaLomo"], cwd=tmp_path, env=env,
                   check=True)


# ---- distributed: row shards over 2 gloo processes -------------------------------------------------------

def _row_shards(model, rank, world):
    """This rank's rows (dim 0, uneven, unpadded) of every trainable parameter, as new leaf tensors."""
    return [nn.Parameter(p.detach().tensor_split(world, dim=0)[rank].clone())
            for p in model.parameters() if p.requires_grad]


def _gather_rows(shard, world):
    """All ranks' rows of a parameter (gloo needs equal sizes: pad to the largest piece, then trim)."""
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([shard.shape[0]]))
    longest = max(int(n) for n in sizes)
    padded = torch.cat([shard.detach(), shard.new_zeros((longest - shard.shape[0],) + shard.shape[1:])])
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded)
    return [piece[:int(n)] for piece, n in zip(pieces, sizes)]


def _sharded_worker(rank, world, opt_name, kw):
    torch.manual_seed(0)
    model = TiedNet()
    ref = copy.deepcopy(model)
    Opt = {"lomo": LOMO, "adalomo": AdaLomo}[opt_name]
    ref_opt = Opt(ref.parameters(), lr=0.05, **kw)
    shards = _row_shards(model, rank, world)
    opt = Opt(shards, lr=0.05, process_group=dist.group.WORLD, **kw)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for step in range(4):
        x, y = make_data(seed=step)
        ref_opt.fused_backward(loss_fn(ref, x, y))
        # Build the full weights: other ranks' rows as constants, ours as the leaf, so autograd routes
        # exactly our rows of the full gradient into our shard.
        full = {}
        for name, shard in zip(names, shards):
            pieces = _gather_rows(shard, world)
            pieces[rank] = shard
            full[name] = torch.cat(pieces)
        loss = loss_fn(lambda inp: torch.func.functional_call(model, full, (inp,)), x, y)
        opt.fused_backward(loss)
    for name, shard, p in zip(names, shards, [p for p in ref.parameters() if p.requires_grad]):
        torch.testing.assert_close(torch.cat(_gather_rows(shard, world)), p, atol=1e-6, rtol=0, msg=name)


def _sharded_configs(rank, world):
    # One set of processes for all configurations: starting them is the slow part.
    for opt_name, kw in [("adalomo", {}), ("adalomo", {"clip_grad_norm": 0.05, "weight_decay": 0.1}),
                         ("lomo", {"clip_grad_norm": 0.05, "clip_grad_value": 0.02}),
                         ("lomo", {"clip_grad_norm": 0.05, "clip_grad_norm_scope": "tensor"}),  # grouped clipping:
                         ("adalomo", {"clip_grad_norm": 0.05, "clip_grad_norm_scope": "tensor"})]:  # whole tensors
        _sharded_worker(rank, world, opt_name, kw)


def test_row_sharded_equals_unsharded():
    run_workers(_sharded_configs)


def _fsdp2_worker(rank, world, opt_name):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 2), nn.Tanh(), nn.Linear(2, 3))
    ref = copy.deepcopy(model)
    Opt = {"lomo": LOMO, "adalomo": AdaLomo}[opt_name]
    ref_opt = Opt(ref.parameters(), lr=0.05)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = Opt(model.parameters(), lr=0.05, process_group=mesh.get_group())
    for step in range(3):
        x, y = make_data(n=4 * world, seed=step)
        ref_opt.fused_backward((ref(x) - y).pow(2).mean())
        local = slice(rank * 4, rank * 4 + 4)  # FSDP2 averages gradients over ranks: equal parts of the batch
        info = opt.fused_backward((model(x[local]) - y[local]).pow(2).mean())
        assert not info.skipped
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is None
        torch.testing.assert_close(p.full_tensor(), q, atol=1e-6, rtol=0, msg=name)


def _fsdp2_both(rank, world):
    for opt_name in ("lomo", "adalomo"):
        _fsdp2_worker(rank, world, opt_name)


def test_fsdp2_equals_single_process():
    run_workers(_fsdp2_both)


# ---- 16-bit parameters on the CPU (issue 9.1) --------------------------------------------------------------

def _ulps(a, b):
    """Distance between two tensors of one 16-bit dtype, in units in the last place (monotone integer view)."""
    ia, ib = (t.view(torch.int16).int() for t in (a, b))
    ia, ib = (torch.where(i < 0, -32768 - i, i) for i in (ia, ib))
    return (ia - ib).abs()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kw", [{"lr": 1e-3}, {"lr": 1e-2}, {"lr": 1e-2, "clip_grad_norm": 0.5},
                                {"lr": 1e-2, "weight_decay": 0.1}, {"lr": 1e-2, "clip_grad_norm": 0.5,
                                                                     "clip_grad_norm_scope": "tensor"}])
def test_16bit_step_on_cpu_is_rounded_once_from_fp32(dtype, kw):
    """One step equals (p.float() - lr * coef * g.float()).to(dtype) from the same 16-bit gradient: the CPU's
    add_ rounds alpha to the parameter's dtype (lr / 65536 is a subnormal fp16 number, or 0)."""
    torch.manual_seed(0)
    w = nn.Parameter((torch.randn(4096) * 0.05).to(dtype))
    c = torch.randn(4096) * 0.1  # x 2^16 (the loss scale) stays below fp16's largest value, 65504
    seen = []
    w.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))  # before the optimizer's hook
    before = w.detach().clone()
    opt = LOMO([w], **kw)
    info = opt.fused_backward((w.float() * c).sum())
    assert not info.skipped
    g = seen[-1].float()  # the update pass's 16-bit gradient (scaled by the loss scale for fp16)
    coef = 1.0 / (opt.loss_scale or 1.0)
    if "clip_grad_norm" in kw:
        norm = g.norm().item() * coef if kw.get("clip_grad_norm_scope") == "tensor" else info.grad_norm
        coef *= min(1.0, kw["clip_grad_norm"] / (norm + 1e-6))
    lr, wd = kw["lr"], kw.get("weight_decay", 0.0)
    expected = (before.float() * (1 - lr * wd) - lr * coef * g).to(dtype)
    ulps = _ulps(w.detach(), expected)
    assert ulps.max() <= 1 and (ulps > 0).float().mean() < 0.01
    assert (w.detach() != before).float().mean() > 0.2  # the step moved the weights (bf16: not all of them)


def test_fp16_repro_moves_by_lr_times_gradient():
    w = nn.Parameter(torch.full((8,), 0.01, dtype=torch.float16))
    LOMO([w], lr=1e-3).fused_backward((w.float() * 0.1).sum())
    torch.testing.assert_close(w.detach().float(), torch.full((8,), 0.01 - 1e-4), atol=1e-5, rtol=0)


def test_bounded_temporaries_and_no_fp32_copy_of_a_16bit_gradient():
    """The check pass takes each gradient's squared norm with fp32 accumulation, without an fp32 copy of it, and
    16-bit updates add no fp32 copy of the weight (issue 10.3)."""
    from measure import TensorMemoryTracker

    torch.manual_seed(0)
    w = nn.Parameter((torch.randn(2048, 1024) * 0.02).bfloat16())
    x = torch.randn(4, 1024).bfloat16()
    nbytes = w.numel() * 2
    for kw in ({"clip_grad_norm": 1.0}, {"clip_grad_norm": 1.0, "clip_grad_norm_scope": "tensor"}, {}):
        opt = LOMO([w], lr=1e-3, **kw)
        loss = (x @ w.t()).float().pow(2).mean()
        with TensorMemoryTracker([w, x, loss]) as tracker:
            opt.fused_backward(loss)
        # the weight, its 16-bit gradient, small activations; an fp32 copy of either would add 2 * nbytes
        assert tracker.peak < 2 * nbytes + nbytes // 2, kw


# ---- no host synchronisation per parameter (issue 10.1) ----------------------------------------------------

class _SyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts aten._local_scalar_dense: .item(), bool(tensor), float(tensor): the host waiting for the device."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.syncs += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def _deep_net(n_layers):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), *[m for _ in range(n_layers) for m in (nn.Tanh(), nn.Linear(8, 8))],
                         nn.Linear(8, 3))


OPTIMIZERS = {"lomo": lambda ps: LOMO(ps, lr=0.1),
              "lomo-clip": lambda ps: LOMO(ps, lr=0.1, clip_grad_norm=1.0),
              "lomo-clip-tensor": lambda ps: LOMO(ps, lr=0.1, clip_grad_norm=1.0, clip_grad_norm_scope="tensor"),
              "lomo-check-wd": lambda ps: LOMO(ps, lr=0.1, check_finite=True, weight_decay=0.1),
              "adalomo": lambda ps: AdaLomo(ps, lr=0.1),
              "adalomo-clip-wd": lambda ps: AdaLomo(ps, lr=0.1, clip_grad_norm=1.0, weight_decay=0.1)}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_one_host_sync_per_step_whatever_the_depth(name):
    counts = []
    for n_layers in (1, 6):
        model = _deep_net(n_layers)
        opt = OPTIMIZERS[name](model.parameters())
        x, y = make_data()
        loss = (model(x) - y).pow(2).mean()
        with _SyncCounter() as counter:
            info = opt.fused_backward(loss)
        assert not info.skipped and (info.grad_norm is None) == (name == "lomo")
        counts.append(counter.syncs)
    assert counts[0] == counts[1] <= 1, counts


@pytest.mark.parametrize("name", ["lomo", "lomo-clip-tensor", "adalomo"])
def test_single_pass_stops_at_first_nonfinite_gradient_without_syncs(name):
    """The device flag stops the updates exactly where the old per-parameter check did: the output layer's own
    gradient is finite and comes first, every gradient after it is infinite; nothing non-finite is written."""
    model = _deep_net(3)
    before = snapshot(model)
    opt = OPTIMIZERS[name](model.parameters())
    handle = model[-1].register_full_backward_hook(lambda m, gi, go: (torch.full_like(gi[0], math.inf),))
    x, y = make_data()
    with _SyncCounter() as counter:
        info = opt.fused_backward((model(x) - y).pow(2).mean())
    handle.remove()
    assert counter.syncs <= 1
    assert info.skipped and "part-way" in info.reason
    after = snapshot(model)
    assert all(torch.isfinite(p).all() for p in after)
    changed = [not torch.equal(a, b) for a, b in zip(before, after)]
    assert changed == [False] * (len(changed) - 2) + [True, True]  # only the last Linear (weight, bias)
    assert all(p.grad is None for p in model.parameters())


# ---- grouped (per-tensor) norm clipping (issue 12.2) -------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"weight_decay": 0.1, "clip_grad_value": 0.02}])
def test_tensor_scope_clipping_equals_clip_grad_norm_per_parameter_then_sgd(kw):
    torch.manual_seed(0)
    model = TiedNet()
    ref = copy.deepcopy(model)
    opt = LOMO(model.parameters(), lr=0.1, clip_grad_norm=0.05, clip_grad_norm_scope="tensor", **kw)
    assert not opt.check_pass  # one backward pass
    params = [p for p in ref.parameters() if p.requires_grad]
    sgd = torch.optim.SGD(params, lr=0.1, weight_decay=kw.get("weight_decay", 0.0))
    for step in range(5):
        info = backward_both(opt, model, ref, step)
        if "clip_grad_value" in kw:
            torch.nn.utils.clip_grad_value_(params, kw["clip_grad_value"])
        assert info.grad_norm == pytest.approx(torch.stack([p.grad.norm() for p in params]).norm().item(), rel=1e-5)
        clipped = [torch.nn.utils.clip_grad_norm_([p], 0.05) for p in params]
        assert max(clipped) > 0.05  # the clip bites
        sgd.step()
        sgd.zero_grad()
    assert_params_close(model, ref, atol=1e-6)


def test_adalomo_tensor_scope_clipping_equals_unfused_reference():
    torch.manual_seed(0)
    model = TiedNet()
    ref = copy.deepcopy(model)
    opt = AdaLomo(model.parameters(), lr=0.05, clip_grad_norm=0.05, clip_grad_norm_scope="tensor")
    params = [p for p in ref.parameters() if p.requires_grad]
    states = [{} for _ in params]
    for step in range(1, 5):
        backward_both(opt, model, ref, step)
        for p in params:
            torch.nn.utils.clip_grad_norm_([p], 0.05)
        with torch.no_grad():
            adalomo_reference(params, [p.grad for p in params], states, step, lr=0.05)
        for p in params:
            p.grad = None
    assert_params_close(model, ref, atol=1e-6)


# ---- hooks: unfrozen parameters, stale gradients, reentrant checkpointing, ownership (issue 9.5-9.8) ---------

def test_parameter_unfrozen_after_construction_is_trained_like_sgd():
    torch.manual_seed(0)
    model = TiedNet()
    ref = copy.deepcopy(model)
    opt = LOMO(model.parameters(), lr=0.1)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    model.frozen.requires_grad_(True)
    ref.frozen.requires_grad_(True)
    for step in range(3):
        backward_both(opt, model, ref, step)
        sgd.step()
        sgd.zero_grad()
    assert model.frozen.grad is None and not torch.equal(model.frozen, TiedNet().frozen)
    assert_params_close(model, ref, atol=1e-6)


@pytest.mark.parametrize("kw", [{}, {"clip_grad_norm": 1.0}])
def test_stale_grad_is_refused_with_the_parameter_name_before_any_change(kw):
    model = TiedNet()
    opt = LOMO(model.named_parameters(), lr=0.1, **kw)
    x, y = make_data()
    loss_fn(model, x, y).backward()  # a plain backward: every .grad is left to the caller
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"'norm' already has a .grad.*zero_grad"):
        opt.fused_backward(loss_fn(model, x, y))
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(model)))
    opt.zero_grad()
    assert not opt.fused_backward(loss_fn(model, x, y)).skipped


class ReentrantNet(nn.Module):
    """`shared` is used inside a reentrant checkpoint and again outside it."""

    def __init__(self):
        super().__init__()
        self.inp, self.shared = nn.Linear(6, 8), nn.Linear(8, 8)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        h = checkpoint(lambda h: torch.tanh(self.shared(h)), self.inp(x), use_reentrant=True)
        return self.shared(h)[:, :3]


@pytest.mark.parametrize("make_opt", [lambda ps: AdaLomo(ps, lr=0.1), lambda ps: LOMO(ps, lr=0.1, check_finite=True)])
def test_reentrant_checkpointing_that_splits_a_gradient_is_refused(make_opt):
    torch.manual_seed(0)
    model = ReentrantNet()
    opt = make_opt(model.named_parameters())
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"'shared.(weight|bias)' received its gradient in two parts.*use_reentrant=False"):
        opt.fused_backward(loss_fn(model, *make_data()))
    if opt.check_pass:  # found in the check pass: nothing changed
        assert all(torch.equal(a, b) for a, b in zip(before, snapshot(model)))


def test_second_optimizer_over_the_same_parameters_takes_them_over():
    torch.manual_seed(0)
    model = TiedNet()
    ref = copy.deepcopy(model)
    old = LOMO(model.parameters(), lr=0.1)
    new = LOMO(model.parameters(), lr=0.1)  # e.g. rebuilt to resume; `old` is still referenced
    sgd = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.1)
    backward_both(new, model, ref)
    sgd.step()
    assert_params_close(model, ref, atol=1e-6)  # updated once, not twice
    with pytest.raises(RuntimeError, match="newer"):
        old.fused_backward(loss_fn(model, *make_data()))


def test_remove_hooks_detaches_the_optimizer():
    model = TiedNet()
    opt = AdaLomo(model.parameters(), lr=0.1)
    opt.remove_hooks()
    before = snapshot(model)
    loss_fn(model, *make_data()).backward()
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(model)))
    assert model.inp.weight.grad is not None  # left to the caller, as without an optimizer
    model.zero_grad()
    with pytest.raises(RuntimeError, match="remove_hooks"):
        opt.fused_backward(loss_fn(model, *make_data()))


# ---- smaller ones (issue 9.9) ------------------------------------------------------------------------------

def test_fp16_parameters_added_later_get_loss_scaling_and_overflow_checks():
    torch.manual_seed(0)
    model = TiedNet()
    model.out.half()
    opt = LOMO([p for n, p in model.named_parameters() if not n.startswith("out.") and p.requires_grad], lr=0.01)
    assert opt.loss_scale is None and not opt.check_pass
    opt.add_param_group({"params": list(model.out.parameters())})
    assert opt.loss_scale == 2.0 ** 16 and opt.check_pass
    before = snapshot(model)
    handle = model.out.register_full_backward_hook(lambda m, gi, go: (torch.full_like(gi[0], math.inf),))
    x, y = make_data()
    info = opt.fused_backward((model.out(torch.tanh(model.hidden(torch.tanh(model.inp(x)))).half()).float() - y)
                              .pow(2).mean())
    handle.remove()
    assert info.skipped and opt.loss_scale == 2.0 ** 15
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(model)))  # the whole step skipped


def test_stochastic_rounding_keeps_every_nan_a_nan():
    bits = torch.tensor([0x7FFFFFFF, -1, 0x7F800001, 0x7FC00000], dtype=torch.int32).repeat(2000)
    out = stochastic_round_(torch.empty(bits.shape, dtype=torch.bfloat16), bits.view(torch.float32))
    assert torch.isnan(out).all()
    inf = torch.tensor([math.inf, -math.inf]).repeat(1000)
    assert torch.equal(stochastic_round_(torch.empty(2000, dtype=torch.bfloat16), inf).float(), inf)


# ---- distributed: the same rule on every rank, empty shards, sync counts (issues 9.2, 9.3, 10.1, 12.2) ---------

class _InfRows(torch.autograd.Function):
    """Identity on a layer's output; adds inf to row 0 of the layer's weight gradient (rank 0's rows only)."""

    @staticmethod
    def forward(ctx, out, weight):
        ctx.shape = weight.shape
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        grad_weight = grad.new_zeros(ctx.shape)
        grad_weight[0] = math.inf
        return grad, grad_weight


def _tiny_llama(**kw):
    from model import ModelArgs
    return ModelArgs(dim=16, n_layers=2, n_heads=2, vocab_size=32, multiple_of=16, max_seq_len=16, **kw)


def _units_agree_worker(rank, world):
    import shard
    from model import cross_entropy, random_weights
    from torch.distributed.device_mesh import init_device_mesh

    tokens = torch.randint(32, (2, 8), generator=torch.Generator().manual_seed(rank))
    for sharding, tied in (("own", False), ("own", True), ("fsdp2", False)):
        args = _tiny_llama(tie_embeddings=tied)  # tied: the output head is a second unit over the embedding
        weights = dict(random_weights(args, seed=0))
        if sharding == "own":
            model = shard.ShardedTransformer(args)
            output = model.output.module if tied else model.head.module.output
        else:
            model = shard.fsdp2_transformer(args, init_device_mesh("cpu", (world,)))
            output = model.output
        shard.load_rows(model, lambda name, rows: weights[name][rows])
        opt = LOMO(model.parameters(), lr=0.1, process_group=dist.group.WORLD)
        before = {n: t.detach().clone() for n, t in shard.local_tensors(model).items()}
        handle = output.register_forward_hook(lambda m, inputs, out: _InfRows.apply(out, m.weight))
        info = opt.fused_backward(cross_entropy(model(tokens), tokens))
        handle.remove()
        infos = [None] * world
        dist.all_gather_object(infos, info)
        assert [repr(i) for i in infos] == [repr(info)] * world and info.skipped, (sharding, infos)  # nan != nan
        after = shard.local_tensors(model)
        assert all(torch.isfinite(t).all() for t in after.values())
        changed = {n for n in after if not torch.equal(after[n], before[n])}
        # own: the head unit comes first in the backward pass, so nothing is updated on any rank. fsdp2: the root
        # unit (embedding, final norm, output) is reduce-scattered last: every block is updated, the root is not.
        root = {"tok_embeddings.weight", "norm.weight", "output.weight"}
        expected = set() if sharding == "own" else {n for n in after if n not in root and after[n].numel()}
        assert changed == expected, (sharding, rank, changed ^ expected)
        assert all(p.grad is None for p in model.parameters())
        opt.remove_hooks()


def _three_ranks(rank, world):
    _fsdp2_both(rank, world)
    _units_agree_worker(rank, world)


def test_three_ranks_empty_shards_and_agreement_on_a_nonfinite_gradient():
    """One set of 3 processes: FSDP2 with a layer of 2 rows (rank 2 holds none; AdaLomo crashed there) against one
    process, then the agreement of _units_agree_worker."""
    run_workers(_three_ranks, world_size=3)


def _sync_count_worker(rank, world):
    import shard
    from model import ModelArgs, cross_entropy

    calls = []
    all_reduce = dist.all_reduce
    dist.all_reduce = lambda *a, **k: calls.append(1) or all_reduce(*a, **k)
    try:
        for make_opt in (lambda ps: LOMO(ps, lr=0.1, process_group=dist.group.WORLD),
                         lambda ps: AdaLomo(ps, lr=0.1, process_group=dist.group.WORLD)):
            counts = []
            for n_layers in (1, 3):
                torch.manual_seed(0)
                model = shard.ShardedTransformer(ModelArgs(dim=16, n_layers=n_layers, n_heads=2, vocab_size=32,
                                                           multiple_of=16))
                for p in model.parameters():
                    nn.init.normal_(p, std=0.02)
                opt = make_opt(model.parameters())
                tokens = torch.randint(32, (2, 8))
                loss = cross_entropy(model(tokens), tokens)
                calls.clear()
                with _SyncCounter() as counter:
                    assert not opt.fused_backward(loss).skipped
                n_params = sum(1 for _ in model.parameters())
                counts.append(counter.syncs)
                assert counter.syncs <= 1, counter.syncs
                # a tiny all-reduce per unit (shard.NonFiniteGuard) and two per step; AdaLomo: one per parameter
                extra = n_params if isinstance(opt, AdaLomo) else 0
                assert len(calls) == len(model.units()) + 2 + extra, (len(calls), len(model.units()), n_params)
                opt.remove_hooks()
            assert counts[0] == counts[1] <= 1, counts
    finally:
        dist.all_reduce = all_reduce


def _two_ranks(rank, world):
    _units_agree_worker(rank, world)
    _sync_count_worker(rank, world)


def test_two_ranks_agree_on_a_nonfinite_gradient_and_sync_once_per_step():
    run_workers(_two_ranks)


# ---- torch.compile (issue 9.4) -----------------------------------------------------------------------------

def _compile_case():
    """The issue's tiny LLaMA, its weights, and a batch."""
    from model import ModelArgs, Transformer, init_weights
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden_dim=48, max_seq_len=32)
    torch.manual_seed(0)
    model = Transformer(args)
    init_weights(model)
    return model, [torch.randint(64, (2, 8), generator=torch.Generator().manual_seed(s)) for s in range(2)]


def test_compiled_model_with_donated_buffers_refuses_a_check_pass_before_any_change():
    """A compiled backward first run with retain_graph=False keeps donated buffers (so does one loaded from the
    compile cache) and cannot run twice: the check pass fails on it. aot_eager: the same AOTAutograd, no C++."""
    import torch._functorch.config as functorch_config
    from model import cross_entropy

    model, batches = _compile_case()
    with functorch_config.patch(enable_autograd_cache=False):
        compiled = torch.compile(model, backend="aot_eager")
        LOMO(model.parameters(), lr=0.1).fused_backward(cross_entropy(compiled(batches[0]), batches[0]))
        opt = LOMO(model.parameters(), lr=0.1, clip_grad_norm=1.0)
        before = snapshot(model)
        with pytest.raises(RuntimeError, match=r"donated_buffer = False.*clip_grad_norm_scope='tensor'"):
            opt.fused_backward(cross_entropy(compiled(batches[1]), batches[1]))
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(model)))
    assert all(p.grad is None for p in model.parameters())


def test_compiled_model_trains_in_every_mode_like_eager():
    """With torch._functorch.config.donated_buffer = False (the workaround the error names), an inductor-compiled
    model trains in every mode, single pass or two, and matches the eager model."""
    import torch._functorch.config as functorch_config
    from model import cross_entropy

    model, batches = _compile_case()
    eager, init = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    modes = [lambda ps: LOMO(ps, lr=0.1), lambda ps: LOMO(ps, lr=0.1, clip_grad_norm=1.0),
             lambda ps: LOMO(ps, lr=0.1, check_finite=True, weight_decay=0.1),
             lambda ps: LOMO(ps, lr=0.1, clip_grad_norm=0.5, clip_grad_norm_scope="tensor"),
             lambda ps: AdaLomo(ps, lr=0.05), lambda ps: AdaLomo(ps, lr=0.05, clip_grad_norm=1.0)]
    with functorch_config.patch(donated_buffer=False):
        compiled = torch.compile(model)
        for make_opt in modes:
            model.load_state_dict(init)
            eager.load_state_dict(init)
            opt, ref_opt = make_opt(model.parameters()), make_opt(eager.parameters())
            for tokens in batches:
                info = opt.fused_backward(cross_entropy(compiled(tokens), tokens))
                ref = ref_opt.fused_backward(cross_entropy(eager(tokens), tokens))
                assert not info.skipped and info.grad_norm == pytest.approx(ref.grad_norm, rel=1e-4)
            assert not torch.equal(model.output.weight, init["output.weight"])
            for (name, p), q in zip(model.named_parameters(), eager.parameters()):
                torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


def test_adalomo_temporaries_are_a_chunk_not_copies_of_the_gradient():
    from measure import TensorMemoryTracker

    torch.manual_seed(0)
    w = nn.Parameter((torch.randn(2048, 1024) * 0.02).bfloat16())
    x = torch.randn(4, 1024).bfloat16()
    nbytes = w.numel() * 2
    for kw in ({}, {"clip_grad_norm": 1.0, "weight_decay": 0.1}):
        opt = AdaLomo([w], lr=1e-3, **kw)
        loss = (x @ w.t()).float().pow(2).mean()
        with TensorMemoryTracker([w, x, loss]) as tracker:
            assert not opt.fused_backward(loss).skipped
        # the weight, its 16-bit gradient, and fp32 temporaries of one chunk (2^18 elements: 1 MiB each)
        assert tracker.peak < 2 * nbytes + 4 * 2 ** 20, kw
