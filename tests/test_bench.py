"""bench.py, bench_eval.py and measure.py: the memory tracker against known allocations, a smoke run of every
method, and the collective bytes of the sharded run against a count made here from the shapes; shard.py's memory:
a unit's full weights are freed before its reduce-scatter, and the non-finite guard makes no fp32 copy."""
import argparse
import contextlib
import dataclasses
import io
import os
import weakref

import pytest
import torch

import bench
import bench_eval
import data
import shard
import superglue
from dist_utils import run_workers
from measure import TensorMemoryTracker, random_batch
from model import cross_entropy, param_shapes
from tokenizer import open_tokenizer

MINI = ["--model", "mini", "--seq-len", "16", "--warmup", "1", "--steps", "1"]


def test_tracker_counts_known_allocations_and_frees():
    with TensorMemoryTracker() as tracker:
        a = torch.empty(1000)                       # 4000 bytes
        b = torch.empty(500, dtype=torch.float64)   # 4000 bytes
        view = a[:10]                               # shares a's storage: nothing more
        assert tracker.current == 8000
        del a
        assert tracker.current == 8000              # the view keeps the storage alive
        del view
        assert tracker.current == 4000
        x, y = torch.ones(64, 32), torch.ones(32, 16)
        z = x @ y
        assert tracker.current == 4000 + 4 * (64 * 32 + 32 * 16 + 64 * 16)
        del x, y, z, b
        assert tracker.current == 0
    assert tracker.peak == 4000 + 4 * (64 * 32 + 32 * 16 + 64 * 16)


def test_tracker_counts_given_tensors_and_follows_storage_resize():
    weight = torch.ones(256)  # made before the mode: counts from the start because it is passed in
    with TensorMemoryTracker([weight]) as tracker:
        assert tracker.current == 1024
        weight.untyped_storage().resize_(0)  # how FSDP2 frees its unsharded parameters
        assert tracker.current == 0
        weight.untyped_storage().resize_(1024)
        assert tracker.current == tracker.peak == 1024


def test_tracker_sees_backward_and_gradients():
    w = torch.ones(100, 100, requires_grad=True)  # 40000 bytes
    with TensorMemoryTracker([w]) as tracker:
        (w * 2).sum().backward()
        assert tracker.current == 2 * 40000  # w and w.grad; w * 2 and the scalars are freed
    assert 2 * 40000 <= tracker.peak <= 3 * 40000 + 64


def test_every_method_runs_and_memory_orders_as_the_state_it_keeps():
    rows = {r["method"]: r for r in bench.main(MINI + ["--isolate", "none", "--json"])}
    assert set(rows) == set(bench.METHODS)
    for r in rows.values():
        assert r["peak_gib"] > 0 and r["tokens_per_s"] > 0
    param_bytes = sum(s.numel() for s in param_shapes(bench.model_args("mini")).values()) * 4
    gib = lambda m: rows[m]["peak_gib"] * 2 ** 30  # noqa: E731
    assert gib("floor") > param_bytes
    assert gib("sgd") >= 2 * param_bytes                     # the weights and every gradient
    assert gib("adamw") >= 4 * param_bytes                   # plus two fp32 moments
    assert gib("lomo") < gib("floor") + 0.25 * param_bytes    # one gradient at a time
    assert gib("lomo") < 0.5 * gib("adamw")
    assert gib("lora") < gib("floor") + 0.1 * param_bytes     # no base gradient at all; small adapters
    assert gib("lomo") < gib("lora-lomo") < gib("floor") + 0.25 * param_bytes


def test_methods_over_the_memory_limit_are_reported_oom_and_the_others_run(capsys):
    margs = bench.model_args("mini")
    limit = bench.estimate_gib("lomo", margs, 1, 16, 4) * 1.01  # lomo fits; adamw's three copies do not
    rows = bench.main(MINI + ["--isolate", "none", "--methods", "lomo,adamw", "--mem-limit-gib", str(limit)])
    assert "peak_gib" in rows[0] and "oom" in rows[1]
    out = capsys.readouterr().out
    assert "OOM" in out and "lomo tokens/s" not in out  # no floor to compare against: no speed check printed


def test_a_method_runs_in_a_fresh_process():
    args = argparse.Namespace(model="mini", dtype="fp32", batch_size=1, seq_len=16, warmup=1, steps=1,
                              mem_limit_gib=8.0)
    row = bench.run_isolated("lomo", args)
    assert row["method"] == "lomo" and row["peak_gib"] > 0, row


def test_eval_scores_every_candidate_token_with_less_padding(capsys):
    """Both scorers see the same synthetic candidates; tokens/s counts their tokens (not the padding)."""
    rows = bench.main(MINI + ["--methods", "floor,eval,eval-hf", "--data-dir", "synthetic", "--eval-examples", "5",
                              "--eval-batch-size", "4", "--steps", "2"])
    floor, ours, hf = rows
    assert floor["method"] == "floor" and floor["peak_gib"] > 0  # a training method still runs beside them
    encoded = bench_eval.synthetic_candidates(5, 256, 1024)
    assert ours["tokens"] == sum(len(ids) for example in encoded for ids, _ in example)
    assert ours["sequences"] == sum(map(len, encoded)) and ours["spread"] >= 1
    assert ours["peak_gib"] > 0 and ours["tokens_per_s"] == pytest.approx(ours["tokens"] / ours["pass_s"])
    lengths = [len(ids) for example in encoded for ids, _ in example]
    in_order = [lengths[i:i + 4] for i in range(0, len(lengths), 4)]  # transformers' batches: the data's order
    assert ours["padding"] < bench_eval.padding_share(in_order)
    out = capsys.readouterr().out
    if "error" in hf:  # transformers is a test-only dependency
        assert "transformers is not installed" in hf["error"] and "ERROR" in out
    else:
        assert hf["tokens"] == ours["tokens"] and hf["padding"] == pytest.approx(bench_eval.padding_share(in_order))
        assert "vs eval-hf" in out and "1.00" in out


def test_eval_reads_superglue_with_the_real_tokenizer(capsys):
    if not os.path.isdir(os.path.join(bench.REALDATA, "superglue")):
        pytest.skip("../shared/realdata is absent")
    args = bench.parse_args(["--model", "mini", "--methods", "eval", "--eval-examples", "2"])  # real data: the default
    margs = dataclasses.replace(bench.model_args("mini"), vocab_size=32000)
    encoded, pad_id, what = bench_eval.eval_candidates(args, margs)
    tok = open_tokenizer(args.tokenizer)
    examples = [ex for task in superglue.TASKS for ex in superglue.load_task(task, args.data_dir, "val")[:2]]
    assert encoded == [data.encode_candidates(tok, ex, 1024) for ex in examples] and pad_id == tok.pad_id
    assert "16 SuperGLUE val examples" in what
    with pytest.raises(SystemExit, match="has 32000 tokens, more than --model mini's 256 embedding rows"):
        bench_eval.eval_candidates(args, bench.model_args("mini"))


def test_bad_flags_are_rejected_with_the_flag_named(capsys):
    for argv, flag in ((["--methods", "lomo,adam"], "--methods"), (["--model", "8b"], "--model"),
                       (["--sharded"], "--sharded"), (["--methods", "eval", "--data-dir", "nowhere"], "--data-dir"),
                       (["--methods", "eval", "--data-dir", ".", "--tokenizer", "no.model"], "--tokenizer"),
                       (["--eval-examples", "0"], "--eval-examples")):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert flag in capsys.readouterr().err


def expected_block_unit_bytes(margs, world, nbytes):
    """Bytes a rank sends per step with block units and one backward pass, from the shapes alone: each unit
    (embedding; each block; final norm + output) is a flat buffer of world x chunk elements, chunk being the
    most elements any rank holds when every tensor is cut by rows as torch.tensor_split cuts them. It is
    all-gathered twice and reduce-scattered once, and a ring sends (world - 1) / world of it each time."""
    shapes = param_shapes(margs)
    units = [["tok_embeddings.weight"], ["norm.weight", "output.weight"]]
    units += [[n for n in shapes if n.startswith(f"layers.{i}.")] for i in range(margs.n_layers)]
    total = 0
    for names in units:
        per_rank = [0] * world
        for n in names:
            rows = [len(r) for r in torch.arange(shapes[n][0]).tensor_split(world)]
            for r in range(world):
                per_rank[r] += rows[r] * shapes[n][1:].numel()
        total += 3 * max(per_rank) * (world - 1) * nbytes
    return total


def _sharded_worker(rank, world):
    margs = bench.model_args("mini")
    own = bench.run_sharded("own", margs, torch.float32, torch.device("cpu"), 1, 16, 1, 2)
    expected = expected_block_unit_bytes(margs, world, 4) / 2 ** 30
    assert own["sent_gib_per_step"] == pytest.approx(expected, rel=1e-9)
    assert own["exact_sent_gib_per_step"] == pytest.approx(expected, rel=1e-9)
    # the plan counts the same without the padding of the flat buffers
    assert own["plan_sent_gib_per_step"] == pytest.approx(expected, rel=0.01)
    fsdp = bench.run_sharded("fsdp2", margs, torch.float32, torch.device("cpu"), 1, 16, 1, 2)
    # FSDP2 calls the collectives under their _single names: counted, about as much as the plan says
    assert fsdp["collectives_per_step"] > 0
    assert 0.8 * expected < fsdp["sent_gib_per_step"] <= 1.01 * expected
    for row in (own, fsdp):
        assert row["peak_gib"] > 0 and row["step_s"] > 0


def test_sharded_collective_bytes_match_the_shapes():
    run_workers(_sharded_worker, world_size=2)


def _full_weights_freed_worker(rank, world):
    """Record each unit's gathered full weights by weak reference; at the unit's reduce-scatter none may be alive."""
    unit_class, gathered, freed = shard.ShardedUnit, {}, []
    real_gather, real_scatter = unit_class.gather, unit_class.reduce_scatter

    def gather(self):
        full = real_gather(self)
        gathered[id(self)] = [weakref.ref(t) for t in full.values()]
        return full

    def reduce_scatter(self, grads):
        freed.append(all(ref() is None for ref in gathered[id(self)]))
        return real_scatter(self, grads)

    unit_class.gather, unit_class.reduce_scatter = gather, reduce_scatter
    try:
        margs = bench.model_args("mini")
        for unit in shard.SHARD_UNITS:
            model = shard.ShardedTransformer(margs, unit)
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0.0, 0.02)
            tokens = random_batch(margs, 1, 16, torch.device("cpu"), rank)
            freed.clear()
            cross_entropy(model(tokens), tokens).backward()
            assert freed == [True] * len(model.units()), (unit, freed)
    finally:
        unit_class.gather, unit_class.reduce_scatter = real_gather, real_scatter


def test_a_units_full_weights_are_freed_before_its_reduce_scatter():
    run_workers(_full_weights_freed_worker, world_size=2)


def _sharded_command_line_worker(rank, world):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rows = bench.main(MINI + ["--sharded"])  # sets up and tears down its own process group
    assert [r["sharding"] for r in rows] == ["own", "fsdp2"]
    assert rows[0]["sent_gib_per_step"] == pytest.approx(rows[0]["exact_sent_gib_per_step"], rel=1e-9)
    if rank == 0:  # the table, once
        assert "own / fsdp2 step time" in out.getvalue() and "measure.TensorMemoryTracker" in out.getvalue()
    else:
        assert out.getvalue() == ""


def test_the_sharded_command_line_runs_on_three_ranks_and_rank_0_reports():
    run_workers(_sharded_command_line_worker, world_size=3, init=False)


def _guard_worker(rank, world):
    from torch.profiler import ProfilerActivity, profile

    flat = torch.randn(1 << 22).to(torch.bfloat16)  # a unit's reduce-scattered gradients, 8 MiB
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        shard.NonFiniteGuard()(flat)
    assert torch.isfinite(flat).all()
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert largest < flat.nbytes / 4, largest  # no fp32 copy of the buffer: fp32 chunks of it


def test_the_non_finite_guard_sums_16_bit_gradients_without_an_fp32_copy():
    run_workers(_guard_worker, world_size=2)
