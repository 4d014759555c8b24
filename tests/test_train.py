"""train.py and shard.py end to end: 2 gloo ranks against 1 process, FSDP2 against the hand-written sharding,
resumption, export, loading, the dry-run planner, the demo, and bad input."""
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

import checkpoint
import data
import model
import optimizers
import plan
import train
from dist_utils import run_workers
from tokenizer import open_tokenizer, train_tokenizer

# 9 training examples in global batches of 8: the last global batch holds 1 example, so one of 2 ranks runs
# dropped padding work. 5 evaluation examples do not divide over 2 ranks either.
SMALL = ["--train-samples", "9", "--epochs", "2", "--eval-samples", "5", "--max-len", "48"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    return train_tokenizer(data.synthetic_texts(), str(folder / "synthetic"), vocab_size=320)


def metrics(save_dir):
    rows = [json.loads(line) for line in open(os.path.join(save_dir, "metrics.jsonl"))]
    return [r for r in rows if "loss" in r], [r for r in rows if r.get("split") == "val"]


def final_params(save_dir):
    """Full tensors of the last checkpoint: each rank's rows, concatenated in rank order."""
    last = sorted(Path(save_dir).glob("step_*"))[-1]
    ranks = [torch.load(f, weights_only=False)["model"] for f in sorted(last.glob("rank*.pt"))]
    return {name: torch.cat([r[name] for r in ranks]) for name in ranks[0]}


def run(argv, world=1):
    if world == 1:
        return train.main(argv)
    run_workers(_main_worker, argv, world_size=world)


def _main_worker(rank, world, argv_list):
    for argv in argv_list if isinstance(argv_list[0], list) else [argv_list]:
        train.main(argv)


CONFIGS = {  # name: flags; every one runs on 1 rank (batch 8) and on 2 ranks (batch 4 each)
    "lomo-value-block": ["--clip-grad-value", "0.05"],
    "lomo-norm-linear": ["--clip-grad-norm", "1.0", "--shard-unit", "linear"],
    "lomo-tensor-norm-block": ["--clip-grad-norm", "0.5", "--clip-grad-norm-scope", "tensor"],
    "adalomo-block": ["--optimizer", "adalomo", "--lr", "0.01", "--weight-decay", "0.1"],
    "adalomo-norm-linear": ["--optimizer", "adalomo", "--lr", "0.01", "--clip-grad-norm", "1.0",
                            "--shard-unit", "linear"],
    "fsdp2": ["--sharding", "fsdp2", "--clip-grad-norm", "1.0"],
    "own-for-fsdp2": ["--clip-grad-norm", "1.0"],
}


DEMO = ["--train-samples", "64", "--epochs", "1", "--eval-samples", "4"]  # the plain demo, cut short


@pytest.fixture(scope="module")
def runs(tokenizer, tmp_path_factory):
    """Every config once on 2 ranks (one set of processes) and once in this process; returns their folders. The
    demo too, without --batch-size: its global batch of 16 is split over the ranks."""
    root = tmp_path_factory.mktemp("runs")
    common = SMALL + ["--tokenizer", tokenizer]
    two = [common + flags + ["--batch-size", "4", "--save-dir", str(root / f"{name}-2")]
           for name, flags in CONFIGS.items()]
    run(two + [DEMO + ["--save-dir", str(root / "demo-2")]], world=2)
    for name, flags in CONFIGS.items():
        if name != "fsdp2":
            run(common + flags + ["--batch-size", "8", "--save-dir", str(root / f"{name}-1")])
    run(DEMO + ["--save-dir", str(root / "demo-1")])
    return root


@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "fsdp2"])
def test_two_ranks_equal_one_process(runs, name):
    (loss2, val2), (loss1, val1) = metrics(runs / f"{name}-2"), metrics(runs / f"{name}-1")
    assert len(loss1) == len(loss2) == 4
    for a, b in zip(loss1, loss2):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a.get("grad_norm", 0) == pytest.approx(b.get("grad_norm", 0), rel=1e-5)
    assert val1 == val2
    p1, p2 = final_params(runs / f"{name}-1"), final_params(runs / f"{name}-2")
    for key in p1:
        torch.testing.assert_close(p2[key], p1[key], atol=1e-5, rtol=0, msg=key)


def test_two_rank_demo_trains_the_one_process_steps(runs):
    """The plain demo (no --batch-size) on 2 ranks: the same global batches, so the same losses."""
    (one, _), (two, _) = metrics(runs / "demo-1"), metrics(runs / "demo-2")
    assert len(one) == len(two) == 4
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-5)


def test_fsdp2_equals_hand_written_sharding(runs):
    (loss_f, val_f), (loss_o, val_o) = metrics(runs / "fsdp2-2"), metrics(runs / "own-for-fsdp2-2")
    assert [r["loss"] for r in loss_f] == pytest.approx([r["loss"] for r in loss_o], abs=1e-5)
    assert val_f == val_o
    pf, po = final_params(runs / "fsdp2-2"), final_params(runs / "own-for-fsdp2-2")
    for key in po:
        torch.testing.assert_close(pf[key], po[key], atol=1e-5, rtol=0, msg=key)


def assert_local_rows(net, full, where):
    """Each of this rank's tensors of `net` holds its rows of the full tensors `full` ({name: tensor})."""
    rows = train.shard.local_rows(net)
    for name, local in train.shard.local_tensors(net).items():
        start, stop = rows[name]
        assert torch.equal(local, full[name][start:stop]), (where, name)


def _tied_worker(rank, world, argv_list, tokenizer, margs_dict):
    """Tied runs on 2 ranks, then: a tied model's random init is the same on every backend."""
    for argv in argv_list:
        train.main(argv)
    margs = model.ModelArgs(**margs_dict)
    reference = model.Transformer(margs)
    model.init_weights(reference, seed=7)
    full = reference.state_dict()
    args = train.parse_args(["--tokenizer", tokenizer, "--seed", "7"])
    for sharding in ("own", "fsdp2"):
        args.sharding = sharding
        net = train.build_model(args, margs, rank, world, torch.device("cpu"), torch.float32)
        assert sorted(train.shard.local_tensors(net)) == sorted(full), sharding  # no output.weight
        assert_local_rows(net, full, sharding)


def test_tied_model_trains_alike_on_1_and_2_ranks_and_exports(tokenizer, tmp_path):
    """A tied checkpoint (the Llama 3.2 1B / 3B layout) trained by 1 process and by 2 ranks with each sharding:
    the same losses and weights. With --clip-grad-norm LOMO runs two backward passes, and the tied weight's hook
    must see both uses' gradients summed, once per pass, in each. The export loads in transformers."""
    margs = dataclasses.replace(model.ModelArgs.from_name("tiny"), vocab_size=open_tokenizer(tokenizer).n_words,
                                tie_embeddings=True)
    net = model.Transformer(margs)
    model.init_weights(net, seed=5)
    checkpoint.save_model(net, tmp_path / "ckpt", format="hf")
    common = SMALL + ["--tokenizer", tokenizer, "--ckpt", str(tmp_path / "ckpt"), "--clip-grad-norm", "1.0"]
    configs = {"own-block": [], "own-linear": ["--shard-unit", "linear"], "fsdp2": ["--sharding", "fsdp2"]}
    two = [common + flags + ["--batch-size", "4", "--save-dir", str(tmp_path / name)]
           for name, flags in configs.items()]
    two[0] += ["--export", str(tmp_path / "export"), "--export-format", "hf"]
    run_workers(_tied_worker, two, tokenizer, margs.__dict__)
    run(common + ["--batch-size", "8", "--save-dir", str(tmp_path / "one")])
    (loss1, val1), p1 = metrics(tmp_path / "one"), final_params(tmp_path / "one")
    assert "output.weight" not in p1 and len(loss1) == 4
    for name in configs:
        loss2, val2 = metrics(tmp_path / name)
        assert [r["loss"] for r in loss2] == pytest.approx([r["loss"] for r in loss1], abs=1e-5), name
        assert [r["grad_norm"] for r in loss2] == pytest.approx([r["grad_norm"] for r in loss1], rel=1e-5), name
        assert val2 == val1, name
        p2 = final_params(tmp_path / name)
        assert p2.keys() == p1.keys()
        for key in p1:
            torch.testing.assert_close(p2[key], p1[key], atol=1e-5, rtol=0, msg=f"{name} {key}")
    exported = checkpoint.load_model(tmp_path / "export")
    assert exported.args.tie_embeddings
    for key, value in final_params(tmp_path / "own-block").items():
        assert torch.equal(exported.state_dict()[key], value), key
    transformers = pytest.importorskip("transformers")
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export").eval()
    tokens = torch.randint(0, margs.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(tokens), reference(tokens).logits.float(), atol=1e-4, rtol=0)


def _uneven_eval_worker(rank, world, tokenizer, margs_dict):
    """Score 5 examples over 2 ranks (3 + 2): the result must equal scoring each example alone."""
    margs = model.ModelArgs(**margs_dict)
    args = train.parse_args(["--tokenizer", tokenizer, "--batch-size", "2", "--max-len", "48"])
    net = train.build_model(args, margs, rank, world, torch.device("cpu"), torch.float32)
    tok = open_tokenizer(tokenizer)
    examples = data.synthetic_task(5, seed=7)
    scores = train.evaluate(net, tok, examples, args, rank, world, torch.device("cpu"))
    reference = model.Transformer(margs)
    model.init_weights(reference, seed=args.seed)
    expected = data.score_candidates(reference, tok, examples, 48, batch_size=2)
    assert len(scores) == 5
    torch.testing.assert_close(torch.tensor(scores), torch.tensor(expected), atol=1e-4, rtol=0)


def test_uneven_eval_scores_every_example_once(tokenizer):
    margs = model.ModelArgs.from_name("tiny")
    margs_dict = {**margs.__dict__, "vocab_size": open_tokenizer(tokenizer).n_words}
    run_workers(_uneven_eval_worker, tokenizer, margs_dict)


def _export_worker(rank, world, argv, export_dirs):
    for fmt, out in export_dirs:
        train.main(argv + ["--export", out, "--export-format", fmt, "--save-dir", out + "-run"])


def test_export_round_trips_in_both_formats(tokenizer, tmp_path):
    argv = SMALL + ["--tokenizer", tokenizer, "--batch-size", "4", "--epochs", "1"]
    exports = [("meta", str(tmp_path / "meta")), ("hf", str(tmp_path / "hf"))]
    run_workers(_export_worker, argv, exports)
    for fmt, out in exports:
        trained = final_params(out + "-run")
        loaded = checkpoint.load_model(out).state_dict()
        assert loaded.keys() == trained.keys()
        for key, value in trained.items():
            assert torch.equal(loaded[key], value), (fmt, key)


def _load_worker(rank, world, ckpt, tokenizer):
    args = train.parse_args(["--ckpt", ckpt, "--tokenizer", tokenizer])
    margs = train.model_args(args, open_tokenizer(tokenizer))
    reference = checkpoint.load_model(ckpt).state_dict()
    for sharding in ("own", "fsdp2"):
        args.sharding = sharding
        assert_local_rows(train.build_model(args, margs, rank, world, torch.device("cpu"), torch.float32),
                          reference, sharding)


def test_meta_shards_load_into_two_ranks(tokenizer, tmp_path):
    margs = model.ModelArgs(**{**model.ModelArgs.from_name("tiny").__dict__,
                               "vocab_size": open_tokenizer(tokenizer).n_words})
    net = model.Transformer(margs)
    model.init_weights(net, seed=3)
    checkpoint.save_model(net, tmp_path / "ckpt", format="meta", n_shards=2)
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("consolidated.*")) == ["consolidated.00.pth",
                                                                                  "consolidated.01.pth"]
    run_workers(_load_worker, str(tmp_path / "ckpt"), tokenizer)


def test_dry_run_of_a_llama3_preset(capsys):
    train.main(["--model", "llama3.2-1b", "--dry-run"])
    out = capsys.readouterr().out
    assert "model llama3.2-1b: 1,235,814,400 parameters" in out and "lomo" in out


def test_dry_run_matches_paper_table_1(capsys):
    margs = model.ModelArgs.from_name("7b")
    rows = {opt: plan.plan(margs, opt, world=1, nbytes=2) for opt in ("adamw", "sgd", "lomo")}
    assert {opt: round(r["params"], 2) for opt, r in rows.items()} == {"adamw": 12.55, "sgd": 12.55, "lomo": 12.55}
    assert {opt: round(r["grads"], 2) for opt, r in rows.items()} == {"adamw": 12.55, "sgd": 12.55, "lomo": 0.24}
    assert {opt: round(r["optimizer_state"], 2) for opt, r in rows.items()} == {"adamw": 75.31, "sgd": 25.10,
                                                                                "lomo": 0.0}
    train.main(["--model", "7b", "--dry-run"])
    out = capsys.readouterr().out
    assert "6,738,415,616 parameters" in out and "75.31" in out and "25.10" in out and "0.24" in out
    train.main(["--model", "65b", "--dry-run", "--world-size", "8"])
    out = capsys.readouterr().out
    assert "own / block" in out and "own / linear" in out and "fits" in out


def test_block_units_send_three_times_the_parameters():
    margs = model.ModelArgs.from_name("7b")
    P = plan.sizes(margs)["total"] * 2 / plan.GiB
    row = plan.plan(margs, "lomo", world=8, nbytes=2, unit="block")
    assert row["sent_gib_per_step"] == pytest.approx(3 * P * 7 / 8)
    assert plan.plan(margs, "lomo", world=8, nbytes=2, unit="block", check_pass=True)["sent_gib_per_step"] == \
        pytest.approx(5 * P * 7 / 8)


def test_short_demo_completes(tmp_path, capsys):
    """The default demo, cut to 188 steps: too short to leave the plateau at chance (that takes about 1,200
    steps; the full demo reaches 100%), but the answer format (Yes/No, then EOS) is learnt."""
    result = train.main(["--train-samples", "3000", "--epochs", "1", "--eval-samples", "90",
                         "--save-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert "done: 188 steps" in out and f"checkpoint {tmp_path / 'step_00000188'}" in out
    assert "eval: " in err and "batch/s" in err  # the evaluation's progress bar
    losses = [r["loss"] for r in metrics(tmp_path)[0]]
    assert losses[0] > 4 and max(losses[-10:]) < 0.5  # from uniform over 320 tokens to about ln(2) / 2
    assert set(result) == {"accuracy"} and 0 <= result["accuracy"] <= 1


# ------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("argv,message", [
    (["--model", "8b"], "--model '8b' is unknown"),
    (["--task", "squad"], "--task 'squad' is unknown"),
    (["--task", "boolq", "--data-dir", "/no/such/dir"], "--data-dir '/no/such/dir' is not a folder"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--epochs", "-1"], "--epochs must be at least 0, not -1"),
    (["--save-every", "-5"], "--save-every must be at least 0, not -5"),
    (["--eval-every", "-1"], "--eval-every must be at least 0"),
    (["--warmup-ratio", "2"], "--warmup-ratio is a fraction of the steps, from 0 to 1, not 2.0"),
    (["--lr", "nan"], "--lr must be greater than 0, not nan"),
    (["--clip-grad-value", "0"], "--clip-grad-value must be greater than 0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be at least 0"),
    (["--predict"], "--predict writes SuperGLUE test predictions; --task synthetic has no test split"),
])
def test_bad_flags_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert message in capsys.readouterr().err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for shown in ("--seed SEED data sampling and order, random init (default: 42)", "(default: out)",
                  "superglue: --lr 0.03, --epochs 10, --batch-size 16", "the demo's --batch-size is 16 / the number"):
        assert shown in out


def test_the_demo_batch_is_global(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert train.parse_args([]).batch_size == 4 and train.parse_args(["--batch-size", "3"]).batch_size == 3
    assert train.parse_args(["--task", "boolq", "--data-dir", "."]).batch_size == 16  # SuperGLUE: per rank
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit):
        train.parse_args([])
    assert "the demo's global batch of 16 does not split over 3 ranks: pass --batch-size" in capsys.readouterr().err


def test_the_demo_tokenizer_needs_no_shared_folder(tmp_path, monkeypatch):
    """Another user's demo left /tmp/lomo-demo-tokenizer behind (here: a file where a folder would go)."""
    (tmp_path / "lomo-demo-tokenizer").write_text("someone else's")
    monkeypatch.setattr(train.tempfile, "tempdir", str(tmp_path))
    tok = train.load_tokenizer(train.parse_args([]), rank=0, world=1)
    assert tok.n_words == 320 and tok.encode("Yes", bos=False, eos=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lomo-demo-tokenizer"]  # its temporary folder is gone


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(SystemExit, match="--tokenizer: tokenizer model not found: /no/tokenizer.model"):
        train.main(["--tokenizer", "/no/tokenizer.model", "--save-dir", str(tmp_path)])


def test_checkpoint_that_does_not_match_the_model(tokenizer, tmp_path):
    margs = model.ModelArgs(**{**model.ModelArgs.from_name("tiny").__dict__, "vocab_size": 100})
    checkpoint.save_model(model.Transformer(margs), tmp_path / "ckpt")
    with pytest.raises(SystemExit, match="not the --model 7b preset"):
        train.main(["--model", "7b", "--ckpt", str(tmp_path / "ckpt"), "--tokenizer", tokenizer,
                    "--save-dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="the tokenizer has 320 tokens"):
        train.main(["--ckpt", str(tmp_path / "ckpt"), "--tokenizer", tokenizer, "--save-dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="--ckpt: .*nowhere does not exist"):
        train.main(["--ckpt", str(tmp_path / "nowhere"), "--tokenizer", tokenizer, "--save-dir", str(tmp_path / "out")])


def test_embedding_padded_beyond_the_tokenizer_is_accepted(tokenizer, tmp_path):
    """Many checkpoints pad their vocabulary (e.g. to a multiple of 64): the extra rows are never a target."""
    margs = model.ModelArgs(**{**model.ModelArgs.from_name("tiny").__dict__, "vocab_size": 336})
    checkpoint.save_model(model.Transformer(margs), tmp_path / "ckpt")
    metrics = train.main(["--ckpt", str(tmp_path / "ckpt"), "--tokenizer", tokenizer, "--epochs", "0",
                          "--eval-samples", "4", "--save-dir", str(tmp_path / "run")])
    assert 0 <= metrics["accuracy"] <= 1


def test_resume_refuses_corrupt_or_mismatched_checkpoints(tokenizer, tmp_path):
    flags = SMALL + ["--tokenizer", tokenizer, "--batch-size", "8", "--epochs", "1", "--eval-samples", "2"]
    run(flags + ["--save-dir", str(tmp_path / "a")])
    ckpt = next((tmp_path / "a").glob("step_*"))
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "format"}))  # as before
    before = {f.name: f.read_bytes() for f in ckpt.iterdir()}
    with pytest.raises(SystemExit, match="written by an earlier train.py .checkpoint format 1; this one reads "
                       "format 2.: resume it with the train.py that wrote it; the checkpoint is left untouched"):
        train.main(flags + ["--save-dir", str(tmp_path / "b"), "--resume", str(ckpt)])
    assert {f.name: f.read_bytes() for f in ckpt.iterdir()} == before  # left untouched
    (ckpt / "meta.json").write_text(json.dumps({**meta, "world_size": 2}))  # saved by 2 ranks: one file lost
    with pytest.raises(SystemExit, match="cannot read rank1.pt .*No such file.*; the checkpoint is corrupt"):
        train.main(flags + ["--save-dir", str(tmp_path / "c"), "--resume", str(ckpt)])
    (ckpt / "meta.json").write_text(json.dumps(meta))
    margs = model.ModelArgs(**{**model.ModelArgs.from_name("tiny").__dict__, "vocab_size": 336})
    checkpoint.save_model(model.Transformer(margs), tmp_path / "padded")  # 336 embedding rows, not 320
    with pytest.raises(SystemExit, match=r"holds a different model than --model / --ckpt describe \(first "
                       r"differences: \['output.weight', 'tok_embeddings.weight'\]\)"):
        train.main(flags + ["--ckpt", str(tmp_path / "padded"), "--save-dir", str(tmp_path / "d"),
                            "--resume", str(ckpt)])
    (ckpt / "rank0.pt").write_bytes(before["rank0.pt"][:100])
    with pytest.raises(SystemExit, match="cannot read rank0.pt .*; the checkpoint is corrupt"):
        train.main(flags + ["--save-dir", str(tmp_path / "e"), "--resume", str(ckpt)])


def test_clip_grad_norm_scope_reaches_the_optimizer():
    args = train.parse_args(["--clip-grad-norm", "1.0", "--clip-grad-norm-scope", "tensor"])
    opt = optimizers.build_base(args, torch.nn.Linear(2, 2), world=1)
    assert opt.clip_grad_norm_scope == "tensor" and not opt.check_pass  # grouped clipping: one backward pass


def test_unfused_baselines_refuse_own_sharding():
    args = train.parse_args(["--optimizer", "adamw"])
    with pytest.raises(SystemExit, match="not supported with --sharding own"):
        optimizers.build_base(args, torch.nn.Linear(2, 2), world=2)


def boolq_fixture(folder, splits=("train", "val", "test")):
    rows = {"train": [{"question": "is the sky blue", "passage": "Sky: the sky is blue.", "idx": i,
                       "label": bool(i % 2)} for i in range(4)],
            "val": [{"question": "is grass red", "passage": "Grass: grass is green.", "idx": i, "label": False}
                    for i in range(3)],
            "test": [{"question": "is snow white", "passage": "Snow: snow is white.", "idx": i} for i in range(3)]}
    (folder / "BoolQ").mkdir()
    for split in splits:
        (folder / "BoolQ" / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows[split]) + "\n")
    return folder


def test_superglue_task_trains_and_writes_predictions(tokenizer, tmp_path, capsys):
    boolq_fixture(tmp_path)
    result = train.main(["--task", "boolq", "--data-dir", str(tmp_path), "--tokenizer", tokenizer, "--epochs", "1",
                         "--max-len", "128", "--batch-size", "2", "--predict", "--save-dir", str(tmp_path / "out")])
    assert set(result) == {"accuracy"}
    predictions = [json.loads(line) for line in open(tmp_path / "out" / "BoolQ.jsonl")]
    assert [p["idx"] for p in predictions] == [0, 1, 2]
    assert all(p["label"] in ("true", "false") for p in predictions)
    out, err = capsys.readouterr()
    assert "notice: boolq train holds 4 examples, fewer than the 1000 asked for (--train-samples): all are used" in out
    assert f"predictions {tmp_path / 'out' / 'BoolQ.jsonl'}" in out and "predict boolq: " in err


@pytest.mark.parametrize("problem,message", [
    ("missing", r"--data-dir: SuperGLUE file not found: .*BoolQ/test.jsonl"),
    ("malformed", r"--data-dir: .*BoolQ/test.jsonl, line 4: malformed JSON"),
])
def test_predict_input_is_checked_before_training(tokenizer, tmp_path, problem, message):
    boolq_fixture(tmp_path, splits=("train", "val") if problem == "missing" else ("train", "val", "test"))
    if problem == "malformed":
        with open(tmp_path / "BoolQ" / "test.jsonl", "a") as f:
            f.write("{not json\n")
    with pytest.raises(SystemExit, match=message):
        train.main(["--task", "boolq", "--data-dir", str(tmp_path), "--tokenizer", tokenizer, "--epochs", "1",
                    "--max-len", "128", "--batch-size", "2", "--predict", "--save-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # refused before any step


def test_max_len_is_checked_before_anything_runs_and_suggests_a_value(tokenizer, tmp_path):
    boolq_fixture(tmp_path)
    run = ["--task", "boolq", "--data-dir", str(tmp_path), "--tokenizer", tokenizer, "--epochs", "0"]
    with pytest.raises(SystemExit, match="--max-len 1024 exceeds the model's max_seq_len 256: pass --max-len 256"):
        train.main(run + ["--save-dir", str(tmp_path / "a")])  # the tiny model with SuperGLUE's default
    with pytest.raises(SystemExit) as exc:
        train.main(run + ["--max-len", "8", "--save-dir", str(tmp_path / "b")])
    assert "--max-len 8 is too short for boolq val: example" in str(exc.value)
    suggested = int(str(exc.value).split("pass --max-len ")[1].split(" ")[0])
    with pytest.raises(SystemExit, match="too short"):
        train.main(run + ["--max-len", str(suggested - 1), "--save-dir", str(tmp_path / "c")])
    train.main(run + ["--max-len", str(suggested), "--save-dir", str(tmp_path / "d")])  # evaluates: passages cut
    assert not list(tmp_path.glob("[abc]/metrics.jsonl"))


def test_data_format_errors_are_one_line(tokenizer, tmp_path):
    boolq_fixture(tmp_path)
    (tmp_path / "BoolQ" / "val.jsonl").write_text('{"question": "q", "passage": "p", "idx": 0}\n')
    with pytest.raises(SystemExit, match=r"^--data-dir: .*BoolQ/val.jsonl, line 1: missing field 'label'$"):
        train.main(["--task", "boolq", "--data-dir", str(tmp_path), "--tokenizer", tokenizer, "--max-len", "128",
                    "--save-dir", str(tmp_path / "out")])


def test_master_weights_resume_exactly_in_bf16(tokenizer, tmp_path):
    """The fp32 masters of the unfused baselines are saved: a resumed bf16 AdamW run equals an uninterrupted one."""
    run = SMALL + ["--tokenizer", tokenizer, "--optimizer", "adamw", "--lr", "0.01", "--dtype", "bf16",
                   "--batch-size", "2", "--save-every", "2", "--keep-last", "10"]
    train.main(run + ["--save-dir", str(tmp_path / "full")])
    train.main(run + ["--save-dir", str(tmp_path / "resumed"), "--resume", str(tmp_path / "full" / "step_00000004")])
    full, resumed = final_params(tmp_path / "full"), final_params(tmp_path / "resumed")
    for key in full:
        assert torch.equal(resumed[key], full[key]), key


@pytest.mark.parametrize("cls,ref_cls", [(optimizers.MasterAdamW, torch.optim.AdamW),
                                         (optimizers.MasterSGD, torch.optim.SGD)])
def test_master_weight_baselines_follow_the_fp32_optimizer(cls, ref_cls):
    """bf16 weights, fp32 masters: the masters take exactly the steps of the fp32 optimizer fed with the bf16
    gradients, and the weights are the masters rounded to bf16."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(torch.bfloat16)
    masters = [p.detach().float().clone().requires_grad_() for p in net.parameters()]
    opt, ref = cls(net.parameters(), lr=0.1, weight_decay=0.1), ref_cls(masters, lr=0.1, weight_decay=0.1)
    for _ in range(3):
        net(torch.randn(3, 4, dtype=torch.bfloat16)).float().pow(2).sum().backward()
        for p, m in zip(net.parameters(), masters):
            m.grad = p.grad.float()
        opt.step()
        ref.step()
        assert all(p.grad is None for p in net.parameters())
    for p, m in zip(net.parameters(), masters):
        assert torch.equal(p, m.to(torch.bfloat16))


def _torchrun_worker(rank, world, argv):
    """As under torchrun: no process group exists before train.main, and none may be left after it."""
    assert not torch.distributed.is_initialized()
    train.main(argv)
    assert not torch.distributed.is_initialized(), "train.main left its process group behind"


def test_main_tears_down_its_process_group(tokenizer, tmp_path):
    argv = SMALL + ["--tokenizer", tokenizer, "--batch-size", "4", "--epochs", "1", "--save-dir", str(tmp_path)]
    run_workers(_torchrun_worker, argv, init=False)

