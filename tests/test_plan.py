"""plan.py's estimate against the peak tensor memory of one LOMO step measured on CPU (measure.TensorMemoryTracker,
and the profiler's memory timeline for a tied model), and of the two LoRA modes."""
import json
import warnings

import pytest
import torch

from measure import TensorMemoryTracker
from lomo import LOMO
from lora import TARGETS, LoRA
from model import ModelArgs, Transformer, cross_entropy, init_weights
from optimizers import LORA_ADAMW
from plan import GiB, lora_numel, plan


def measure_lomo_step(margs, batch, seq_len):
    """(peak live tensor bytes, parameter bytes) of one fp32 LOMO step, run as train.py runs it on one process
    (per-block activation checkpointing)."""
    model = Transformer(margs, checkpointing=True)
    init_weights(model, seed=0)
    tokens = torch.randint(margs.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    params = list(model.parameters())
    with TensorMemoryTracker(params + [tokens]) as tracker:
        opt = LOMO(params, lr=1e-3)
        opt.fused_backward(cross_entropy(model(tokens), tokens))
    return tracker.peak, sum(p.numel() * 4 for p in params)


def test_plan_total_within_25_percent_of_measured_peak():
    # As in real use, parameters are most of the peak (at 7B with 1 x 1024 tokens: 12.55 of about 14 GiB). The
    # rest (activations, one gradient) is what the planner models roughly; 25% of the total bounds that share.
    margs, batch, seq_len = ModelArgs(dim=128, n_layers=2, n_heads=4, vocab_size=1000, multiple_of=32), 1, 32
    peak, param_bytes = measure_lomo_step(margs, batch, seq_len)
    estimate = plan(margs, "lomo", 1, batch, seq_len, nbytes=4)
    assert estimate["params"] * GiB == param_bytes
    assert peak > param_bytes
    assert abs(estimate["total"] * GiB - peak) <= 0.25 * peak


def test_plan_total_within_25_percent_when_the_largest_gradient_dominates():
    # A large embedding and few tokens: the update of the largest tensor sets the peak. LOMO's update holds no
    # temporaries (an in-place add, and a sum for the finiteness check), so one gradient is what the plan counts.
    margs, batch, seq_len = ModelArgs(dim=128, n_layers=2, n_heads=4, vocab_size=4000, multiple_of=32), 1, 8
    peak, _ = measure_lomo_step(margs, batch, seq_len)
    assert abs(plan(margs, "lomo", 1, batch, seq_len, nbytes=4)["total"] * GiB - peak) <= 0.25 * peak


def measure_tied_step(margs, batch, seq_len, tmp_path):
    """(peak bytes, parameter bytes) of one fp32 LOMO step, from the profiler's allocation timeline. Not the
    tracker: it keeps a Python object on every storage it sees, and autograd sums a tied weight's two gradients in
    place only when it holds the last reference, so under the tracker a tied step costs one gradient more."""
    from torch.profiler import ProfilerActivity, profile

    model = Transformer(margs, checkpointing=True)
    init_weights(model, seed=0)
    tokens = torch.randint(margs.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    opt = LOMO(list(model.parameters()), lr=1e-3)
    with warnings.catch_warnings(), profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                                            record_shapes=True, with_stack=True) as prof:
        warnings.simplefilter("ignore", FutureWarning)
        opt.fused_backward(cross_entropy(model(tokens), tokens))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            prof.export_memory_timeline(str(tmp_path / "timeline.json"), device="cpu")
    except (AttributeError, NotImplementedError):
        pytest.skip("this torch has no profiler memory timeline")
    _, sizes = json.loads((tmp_path / "timeline.json").read_text())
    return max(sum(s) for s in sizes), sum(p.numel() * 4 for p in model.parameters())


def test_plan_of_a_tied_model_counts_the_weight_once_and_its_gradient_twice(tmp_path):
    # The embedding dominates: what the step adds to the parameters is the tied weight's two gradients (the
    # output layer's, kept until the embedding's is added in place) and the activations.
    tied = ModelArgs(dim=128, n_layers=2, n_heads=4, vocab_size=4000, multiple_of=32, tie_embeddings=True)
    untied = ModelArgs(**{**tied.__dict__, "tie_embeddings": False})
    estimate = plan(tied, "lomo", 1, 1, 8, nbytes=4)
    untied_params = plan(untied, "lomo", 1, 1, 8, nbytes=4)["params"]
    assert (untied_params - estimate["params"]) * GiB == 4000 * 128 * 4  # the weight counted once
    peak, param_bytes = measure_tied_step(tied, 1, 8, tmp_path)
    assert estimate["params"] * GiB == param_bytes
    step = (estimate["total"] - estimate["params"]) * GiB
    assert abs(step - (peak - param_bytes)) <= 0.25 * (peak - param_bytes)


def test_lora_rows_count_the_adapters_their_gradients_and_adamw_state():
    margs = ModelArgs.from_name("7b")
    A = sum(p.numel() for p in LoRA(margs, 2, 16).parameters())  # the module itself, r 2 on wq and wv
    assert A == lora_numel(margs, 2, ("wq", "wv")) == 32 * 2 * 2 * (4096 + 4096)
    lomo, lora_lomo, lora = plan(margs, "lomo"), plan(margs, "lomo", lora_rank=2), plan(margs, "lora", lora_rank=2)
    fp32 = 4 * A / GiB  # every adapter, its gradient, each of AdamW's two moments: fp32, whole on every rank
    assert lora_lomo["params"] - lomo["params"] == pytest.approx(fp32)
    assert lora_lomo["grads"] - lomo["grads"] == pytest.approx(fp32)
    assert lora_lomo["optimizer_state"] == pytest.approx(2 * fp32)
    assert (lora["grads"], lora["optimizer_state"]) == pytest.approx((fp32, 2 * fp32))  # no base gradient at all
    eight = plan(margs, "lora", 8, lora_rank=2)
    assert eight["params"] == pytest.approx(lomo["params"] / 8 + fp32) and eight["grads"] == pytest.approx(fp32)


def measure_lora_step(margs, batch, seq_len, optimizer, targets):
    """(peak live tensor bytes, parameter and adapter bytes) of one fp32 step of the LoRA baseline (optimizer
    "lora") or of LoRA + LOMO ("lomo"), as train.py runs it on one process."""
    model = Transformer(margs, checkpointing=True)
    init_weights(model, seed=0)
    lora = LoRA(margs, 2, 16, dropout=0.05, targets=targets)
    lora.attach(model)
    tokens = torch.randint(margs.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    params, adapters = list(model.parameters()), list(lora.parameters())
    if optimizer == "lora":
        model.requires_grad_(False)
    with TensorMemoryTracker(params + adapters + [tokens]) as tracker:
        adamw = torch.optim.AdamW(adapters, lr=1e-3, **LORA_ADAMW)
        loss = cross_entropy(model(tokens), tokens)
        if optimizer == "lora":
            loss.backward()
        else:
            lomo = LOMO(params, lr=1e-3)
            lomo.add_external_params(adapters)
            lomo.fused_backward(loss)
        adamw.step()
    return tracker.peak, sum(p.numel() * 4 for p in params + adapters)


@pytest.mark.parametrize("optimizer", ["lora", "lomo"])
def test_plan_of_the_lora_modes_within_25_percent_of_the_measured_step(optimizer):
    # Adapters on every projection and 256 tokens: their activations are a fair share of what a step adds.
    margs, targets = ModelArgs(dim=128, n_layers=2, n_heads=4, vocab_size=1000, multiple_of=32), tuple(TARGETS)
    peak, param_bytes = measure_lora_step(margs, 2, 128, optimizer, targets)
    estimate = plan(margs, optimizer, 1, 2, 128, nbytes=4, lora_rank=2, lora_targets=targets)
    assert estimate["params"] * GiB == param_bytes
    step = (estimate["total"] - estimate["params"]) * GiB
    assert abs(step - (peak - param_bytes)) <= 0.25 * (peak - param_bytes)
