"""plan.py's estimate against the peak tensor memory of one LOMO step measured on CPU (bench.TensorMemoryTracker)."""
import torch

from bench import TensorMemoryTracker
from lomo import LOMO
from model import ModelArgs, Transformer, cross_entropy, init_weights
from plan import GiB, plan


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
