"""LoRA, LoRA + LOMO and token-loss clipping, each against an independent reference: a dense model whose weight is
W + (alpha / r) B A, torch.optim.AdamW and SGD after a full backward pass, a hand-written masked mean, a single
process for the sharded backends."""
import copy
import math

import pytest
import torch
from torch.func import functional_call

import model
import shard
import train
from dist_utils import run_workers
from lora import LoRA, parse_targets
from optimizers import LORA_ADAMW, Optimizers

MARGS = model.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=32)
ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
SCALE = 16 / 2  # alpha / r of adapters() below


def tiny(seed=0, margs=MARGS, dtype=torch.float32, **kw):
    net = model.Transformer(margs, **kw)
    model.init_weights(net, seed=seed)
    return net.to(dtype)


def adapters(targets=("wq", "wv"), dropout=0.0, seed=1, nonzero_b=True):
    """LoRA with B drawn at random too (B starts at zero: the update would vanish and so would A's gradient)."""
    lora = LoRA(MARGS, rank=2, alpha=16, dropout=dropout, targets=targets, seed=seed)
    if nonzero_b:
        gen = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for adapter in lora.adapters().values():
                adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=gen) * 0.05)
    return lora


def batch(seed=0, n=4, T=12):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, MARGS.vocab_size, (n, T), generator=gen)
    labels = tokens.clone()
    labels[:, : T // 2] = -100  # answer tokens only, as the training data
    return tokens, labels


def dense_loss(base, lora_params, lora, tokens, labels):
    """The loss of a model without hooks whose adapted weights are W + (alpha / r) B A, with A and B taken from
    `lora_params` ({adapter name: (A, B)}): autograd through this formula gives the reference gradients."""
    weights = {f"{name}.weight": base.get_parameter(f"{name}.weight") + SCALE * B @ A
               for name, (A, B) in zip(lora.adapters(), lora_params.values())}
    return model.cross_entropy(functional_call(base, weights, (tokens,)), labels)


def dense_grads(base, lora, tokens, labels):
    """Reference gradients of the adapters (and the loss) from the dense formula."""
    leaves = {name: (a.lora_A.detach().clone().requires_grad_(), a.lora_B.detach().clone().requires_grad_())
              for name, a in lora.adapters().items()}
    loss = dense_loss(base, leaves, lora, tokens, labels)
    grads = torch.autograd.grad(loss, [t for pair in leaves.values() for t in pair])
    return loss.detach(), list(grads)


# ------------------------------------------------------------------------------------------------ the adapter

def dense_model(lora, dtype=torch.float32):
    """A model without hooks whose adapted weights are W + (alpha / r) B A, written out here."""
    net = tiny(dtype=dtype)
    with torch.no_grad():
        for name, a in lora.adapters().items():
            w = net.get_parameter(f"{name}.weight")
            w.copy_(w.float() + SCALE * a.lora_B @ a.lora_A)
    return net


@pytest.mark.parametrize("targets", [("wq", "wv"), ALL])
def test_forward_equals_a_dense_model_with_the_merged_weight(targets):
    lora, with_lora = adapters(targets), tiny()
    lora.attach(with_lora)
    tokens, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(with_lora(tokens), dense_model(lora)(tokens), atol=1e-5, rtol=0)
        assert not torch.allclose(with_lora(tokens), tiny()(tokens), atol=1e-3)  # the adapters do change it
    merged = lora.merged(dict(tiny().named_parameters()))  # what an export writes
    for name, w in dense_model(lora).named_parameters():
        torch.testing.assert_close(merged[name], w, atol=1e-7, rtol=0, msg=name)


def test_init_is_the_model_itself_and_the_same_on_every_rank():
    a, b = LoRA(MARGS, 2, 16, targets=("wq",), seed=3), LoRA(MARGS, 2, 16, targets=("wq",), seed=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert all(not adapter.lora_B.any() for adapter in a.adapters().values())  # B = 0: W x + 0
    bound = 1 / math.sqrt(MARGS.dim)  # kaiming_uniform_(a=sqrt(5)) is nn.Linear's U(-1/sqrt(in), 1/sqrt(in))
    A = a.layers[0].attention.wq.lora_A
    assert A.abs().max() <= bound and A.abs().max() > 0.8 * bound and A.shape == (2, MARGS.dim)
    assert list(a.state_dict()) == [f"layers.{i}.attention.wq.lora_{m}" for i in range(2) for m in "AB"]


def test_attaching_twice_is_refused():
    lora, net = adapters(), tiny()
    lora.attach(net)
    with pytest.raises(ValueError, match="layers.0.attention.wq already has this LoRA's adapter"):
        lora.attach(net)


def test_targets_are_named_and_ordered():
    assert parse_targets(" wv,wq ") == ("wq", "wv")
    with pytest.raises(ValueError, match="unknown projection.*q_proj"):
        parse_targets("wq,q_proj")


def test_bf16_model_keeps_fp32_adapters_and_matches_the_merged_weight():
    lora = adapters()
    net = tiny(dtype=torch.bfloat16)
    lora.attach(net)
    tokens, labels = batch()
    with torch.no_grad():
        torch.testing.assert_close(net(tokens), dense_model(lora, torch.bfloat16)(tokens), atol=0.05, rtol=0)
    model.cross_entropy(net(tokens), labels).backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in lora.parameters())


# ----------------------------------------------------------------------------------------------- the updates

def optimizers_for(net, lora, flags):
    args = train.parse_args(flags + ["--lr-schedule", "constant", "--lora-dropout", "0"])
    return Optimizers(args, net, lora, world=1, total_steps=10)


@pytest.mark.parametrize("clip", [None, 0.02])
def test_lora_baseline_equals_adamw_and_leaves_every_base_weight_alone(clip):
    """--optimizer lora: the adapters take torch.optim.AdamW's steps (eps 1e-6, no weight decay) on the dense
    formula's gradients (clipped by their global norm with --clip-grad-norm); every base weight stays bit-identical
    and never holds a gradient."""
    net, lora = tiny(), adapters()
    net.requires_grad_(False)  # as train.build_model does for --optimizer lora
    lora.attach(net)
    flags = ["--optimizer", "lora", "--lora-lr", "0.01"] + (["--clip-grad-norm", str(clip)] if clip else [])
    opt = optimizers_for(net, lora, flags)
    base, ref_lora = tiny(), copy.deepcopy(lora)
    ref = torch.optim.AdamW(ref_lora.parameters(), lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
    before = {n: p.clone() for n, p in net.named_parameters()}
    for step in range(3):
        tokens, labels = batch(step)
        loss = model.cross_entropy(net(tokens), labels)
        ref_loss, grads = dense_grads(base, ref_lora, tokens, labels)
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
        row = opt.update(loss, True)
        for p, g in zip(ref_lora.parameters(), grads):
            p.grad = g
        norm = torch.nn.utils.clip_grad_norm_(ref_lora.parameters(), clip or math.inf)
        assert row == ({"skipped": False, "grad_norm": pytest.approx(float(norm), rel=1e-5)} if clip else
                       {"skipped": False})
        assert not clip or float(norm) > clip  # clipping is active
        ref.step()
        assert all(p.grad is None for p in net.parameters()) and all(p.grad is None for p in lora.parameters())
    for (name, p), q in zip(lora.named_parameters(), ref_lora.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)
    for name, p in net.named_parameters():
        assert torch.equal(p, before[name]), name


@pytest.mark.parametrize("clip", [None, 0.05])
def test_lora_lomo_equals_a_full_backward_then_sgd_and_adamw(clip):
    """LoRA + LOMO against the unfused reference: a full backward pass, the base gradients clipped by their own
    global norm (the adapters' are not in it, as in the official trainer), SGD on the base weights, AdamW on the
    adapters. With clipping there are two backward passes: the adapters' gradient must be the update pass's alone,
    checked directly (AdamW itself hardly changes with a doubled gradient)."""
    net, lora = tiny(), adapters()
    lora.attach(net)
    flags = ["--lora-rank", "2", "--lr", "0.05", "--lora-lr", "0.01"]
    flags += ["--clip-grad-norm", str(clip)] if clip else []
    opt = optimizers_for(net, lora, flags)
    assert opt.base.check_pass == bool(clip)
    ref_net, ref_lora = tiny(), copy.deepcopy(lora)
    ref_lora.attach(ref_net)
    sgd = torch.optim.SGD(ref_net.parameters(), lr=0.05)
    adamw = torch.optim.AdamW(ref_lora.parameters(), lr=0.01, **LORA_ADAMW)
    seen = []
    opt.adapters.register_step_pre_hook(lambda o, *_: seen.append([p.grad.clone() for p in lora.parameters()]))
    for step in range(3):
        tokens, labels = batch(step)
        row = opt.update(model.cross_entropy(net(tokens), labels), True)
        model.cross_entropy(ref_net(tokens), labels).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref_net.parameters(), clip or math.inf)
        if clip:
            assert row["grad_norm"] == pytest.approx(float(norm), rel=1e-5)  # the base weights' norm only
            assert float(norm) > clip  # clipping is active
        for got, p in zip(seen[-1], ref_lora.parameters()):
            torch.testing.assert_close(got, p.grad, atol=1e-7, rtol=1e-5)
        sgd.step()
        adamw.step()
        sgd.zero_grad()
        adamw.zero_grad()
    for (name, p), q in zip(net.named_parameters(), ref_net.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)
    for (name, p), q in zip(lora.named_parameters(), ref_lora.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)


def test_fp16_lora_lomo_unscales_the_adapters_gradients():
    """fp16 weights: LOMO scales the loss by 65536; AdamW must see the true gradient (fp32 reference, 1%)."""
    net, lora = tiny(dtype=torch.float16), adapters()
    lora.attach(net)
    opt = optimizers_for(net, lora, ["--lora-rank", "2"])
    seen = []
    opt.adapters.register_step_pre_hook(lambda o, *_: seen.append([p.grad.clone() for p in lora.parameters()]))
    tokens, labels = batch()
    opt.update(model.cross_entropy(net(tokens), labels), True)
    _, grads = dense_grads(tiny(), adapters(), tokens, labels)
    assert opt.base.loss_scale == 2.0 ** 16 and len(seen) == 1
    for got, want in zip(seen[0], grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0.02)


def test_a_nonfinite_adapter_gradient_skips_the_adapters_step():
    net, lora = tiny(), adapters()
    lora.attach(net)
    opt = optimizers_for(net, lora, ["--optimizer", "lora"])
    before = [p.clone() for p in lora.parameters()]
    tokens, labels = batch()
    loss = model.cross_entropy(net(tokens), labels)
    lora.layers[0].attention.wq.lora_A.register_hook(lambda g: g * math.inf)
    assert opt.update(loss, True) == {"skipped": True}
    assert all(torch.equal(p, q) and p.grad is None for p, q in zip(lora.parameters(), before))


def test_a_skipped_fused_step_says_why_in_its_metrics_row():
    """metrics.jsonl's row of a skipped LOMO step carries StepInfo.reason: a partial update is not a clean skip."""
    net = tiny()
    opt = Optimizers(train.parse_args(["--optimizer", "lomo"]), net, None, world=1, total_steps=10)
    tokens, labels = batch()
    loss = model.cross_entropy(net(tokens), labels)
    poison = net.layers[0].attention.wq.weight.register_hook(lambda g: g * math.inf)
    row = opt.update(loss, True)
    assert row["skipped"] and row["skip_reason"].startswith("non-finite gradient: updates stopped part-way")
    poison.remove()
    assert opt.update(model.cross_entropy(net(tokens), labels), True)["skip_reason"] is None  # not logged


# ------------------------------------------------------------------------------------------ token-loss clipping

def test_token_loss_clipping_equals_a_hand_written_masked_mean():
    """Each answer token's loss clamped to at most V, then the mean over answer tokens: a clamped token adds V
    and no gradient. (The official code clamps loss.data and averages over every position, ignored ones too.)"""
    tokens, labels = batch(n=3, T=10)
    logits = torch.randn(3, 10, MARGS.vocab_size, generator=torch.Generator().manual_seed(0)) * 4
    logits.requires_grad_()
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    mask = labels[:, 1:] != -100
    losses = nll[mask].detach().sort().values
    V = float(losses[len(losses) // 2 - 1:len(losses) // 2 + 1].mean())  # half the tokens are clamped, none at V
    ref = (torch.minimum(nll, torch.tensor(V)) * mask).sum() / mask.sum()
    ref_grad, = torch.autograd.grad(ref, logits)
    got = model.cross_entropy(logits, labels, max_token_loss=V)
    grad, = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-7, rtol=0)
    clamped = (nll > V) & mask
    assert clamped.any() and not grad[:, :-1][clamped].any()  # no gradient from a clamped token
    total = model.cross_entropy(logits, labels, reduction="sum", max_token_loss=V)
    torch.testing.assert_close(total, ref * mask.sum(), atol=1e-5, rtol=0)
    assert model.cross_entropy(logits, labels, max_token_loss=1e9) == model.cross_entropy(logits, labels)


# ------------------------------------------------------------------------------ the sharded step and dropout

def sharded_tiny(backend, world, lora):
    """tiny()'s weights sharded over the process group by `backend` ("block" or "linear": shard.py's units;
    "fsdp2"), with `lora`'s adapters attached."""
    from torch.distributed.device_mesh import init_device_mesh
    if backend == "fsdp2":
        net = shard.fsdp2_transformer(MARGS, init_device_mesh("cpu", (world,)), lora=lora)
    else:
        net = shard.ShardedTransformer(MARGS, backend, lora=lora)
    weights = dict(model.random_weights(MARGS, seed=0))
    shard.load_rows(net, lambda n, rows: weights[n][rows])
    return net


def _local_adapter_grads(net, lora, tokens, labels, seed):
    """This rank's adapter gradients (before any all-reduce) of one forward and backward pass with dropout."""
    torch.manual_seed(seed)
    model.cross_entropy(net(tokens), labels).backward()
    grads = [p.grad.clone() for p in lora.parameters()]
    lora.zero_grad()
    return grads, torch.get_rng_state()


def _dropout_worker(rank, world):
    """Dropout 0.3 on ALL projections: every sharded or checkpointed backward pass recomputes its block, and must
    draw the forward pass's masks again. Reference: the plain model without checkpointing, same seed, same data."""
    tokens, labels = batch(seed=rank)
    ref_lora = adapters(ALL, dropout=0.3)
    plain = tiny()
    ref_lora.attach(plain)
    want, rng = _local_adapter_grads(plain, ref_lora, tokens, labels, seed=5)
    for name in ("checkpointed", "block", "linear", "fsdp2"):
        lora = adapters(ALL, dropout=0.3)
        if name == "checkpointed":
            net = tiny(checkpointing=True)
            lora.attach(net)
        else:
            net = sharded_tiny(name, world, lora)
        got, rng_after = _local_adapter_grads(net, lora, tokens, labels, seed=5)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5, msg=name)
        assert torch.equal(rng_after, rng), name  # the replays leave the RNG where the plain model left it


@pytest.mark.parametrize("world", [2, 3])
def test_recomputed_blocks_draw_the_forward_dropout_masks(world):
    run_workers(_dropout_worker, world_size=world)


def _sharded_steps(net, lora, flags, world, rank, steps=2):
    """Two steps of the global batch (6 sequences; this rank's share) with train.py's optimizers."""
    args = train.parse_args(flags + ["--lr-schedule", "constant", "--batch-size", "2"])
    opt = Optimizers(args, net, lora, world, total_steps=10)
    for step in range(steps):
        tokens, labels = batch(seed=step, n=6)
        mine = slice(rank * 6 // world, (rank + 1) * 6 // world)
        n_tokens = (labels[:, 1:] != -100).sum()  # the loss is the mean over the global batch's answer tokens
        loss = model.cross_entropy(net(tokens[mine]), labels[mine], reduction="sum") / n_tokens
        assert not opt.update(loss, True)["skipped"]


def _sharded_worker(rank, world):
    """LoRA + LOMO (global clipping: two backward passes) and the LoRA baseline, sharded over 2 or 3 ranks (own with
    both units, FSDP2) against one process on the whole batch: the same weights and adapters."""
    for flags in (["--lora-rank", "2", "--clip-grad-norm", "0.5", "--lr", "0.1"], ["--optimizer", "lora"]):
        flags = flags + ["--lora-dropout", "0", "--lora-lr", "0.01"]
        ref, ref_lora = tiny(), adapters(ALL)
        ref_lora.attach(ref)
        if "lora" in flags:
            ref.requires_grad_(False)
        _sharded_steps(ref, ref_lora, flags, 1, 0)
        for name in ("block", "linear", "fsdp2"):
            lora = adapters(ALL)
            net = sharded_tiny(name, world, lora)
            if "lora" in flags:
                net.requires_grad_(False)
            _sharded_steps(net, lora, flags, world, rank)
            for (key, p), q in zip(lora.named_parameters(), ref_lora.parameters()):
                torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=f"{name} {flags[0]} {key}")
            rows, full = shard.local_rows(net), dict(ref.named_parameters())
            for key, local in shard.local_tensors(net).items():
                torch.testing.assert_close(local, full[key][slice(*rows[key])], atol=1e-6, rtol=0, msg=f"{name} {key}")


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_lora_equals_one_process(world):
    run_workers(_sharded_worker, world_size=world)


def _frozen_worker(rank, world):
    """--optimizer lora, sharded: the frozen weights get no gradient, and none is even computed: no reduce-scatter
    runs (for FSDP2: no NonFiniteGuard all-reduce, which follows each of its reduce-scatters); the adapters still get
    theirs."""
    import torch.distributed as dist
    calls, real_scatter, real_all_reduce = [], shard.reduce_scatter, dist.all_reduce
    shard.reduce_scatter = lambda *a, **k: calls.append("reduce-scatter") or real_scatter(*a, **k)
    dist.all_reduce = lambda *a, **k: calls.append("all-reduce") or real_all_reduce(*a, **k)
    try:
        for name in ("block", "linear", "fsdp2"):
            lora = adapters()
            net = sharded_tiny(name, world, lora)
            net.requires_grad_(False)  # as train.build_model does, after sharding
            tokens, labels = batch(seed=rank)
            model.cross_entropy(net(tokens), labels).backward()
            assert not calls, (name, calls)
            assert all(p.grad is None for p in net.parameters()), name
            assert all(p.grad is not None and p.grad.any() for p in lora.parameters()), name
    finally:
        shard.reduce_scatter, dist.all_reduce = real_scatter, real_all_reduce


def test_frozen_shards_get_no_gradient_and_no_reduce_scatter():
    run_workers(_frozen_worker)


def _nonfinite_worker(rank, world):
    """LoRA + LOMO on 2 ranks with shard.py, a non-finite gradient on rank 1 only: in single-pass mode the
    NonFiniteGuard stops LOMO at the same unit on every rank, and the adapters' step is skipped on both (their
    gradients are dropped, no all-reduce runs); with a check pass nothing changes. The adapters stay equal."""
    import torch.distributed as dist
    for flags in ([], ["--clip-grad-norm", "1.0"]):
        lora = adapters()
        net = sharded_tiny("block", world, lora)
        args = train.parse_args(["--lora-rank", "2", "--lora-dropout", "0"] + flags)
        opt = Optimizers(args, net, lora, world, total_steps=10)
        before = [p.clone() for p in lora.parameters()]
        tokens, labels = batch(seed=rank)
        logits = net(tokens)
        if rank == 1:
            logits.register_hook(lambda g: g * math.inf)
        row = opt.update(model.cross_entropy(logits, labels, reduction="sum") / 100, True)
        assert row["skipped"], flags
        assert all(torch.equal(p, q) and p.grad is None for p, q in zip(lora.parameters(), before)), flags
        flags_of_all = [None] * world
        dist.all_gather_object(flags_of_all, row)
        assert str(flags_of_all[0]) == str(flags_of_all[1]), flags_of_all  # str: NaN == NaN


def test_a_nonfinite_gradient_on_one_rank_skips_the_adapters_on_every_rank():
    run_workers(_nonfinite_worker)
