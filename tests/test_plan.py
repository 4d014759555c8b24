"""plan.py's estimate against the peak tensor memory of one LOMO step measured on CPU (bench.TensorMemoryTracker)."""
import pytest
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


@pytest.mark.xfail(strict=True, reason="plan.py counts one gradient (largest x nbytes) for LOMO's update, but the "
                   "update also holds torch.isfinite's temporaries (an fp32 abs and three bool tensors the size of "
                   "the largest gradient), and for 16-bit weights fp32 copies of the gradient and the weight")
def test_plan_total_bounds_peak_when_the_largest_gradient_dominates():
    # A large embedding and few tokens: the update of the largest tensor sets the peak.
    margs, batch, seq_len = ModelArgs(dim=128, n_layers=2, n_heads=4, vocab_size=4000, multiple_of=32), 1, 8
    peak, _ = measure_lomo_step(margs, batch, seq_len)
    assert peak <= plan(margs, "lomo", 1, batch, seq_len, nbytes=4)["total"] * GiB
