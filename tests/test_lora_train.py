"""LoRA and LoRA + LOMO through train.main: 2 gloo ranks (own sharding, both units, and FSDP2) against 1 process,
the LoRA baseline's frozen weights, the merged export against the LoRA model, bit-exact resume, the demos, and the
flags' defaults and refusals."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import checkpoint
import data
import model
import train
from dist_utils import run_workers
from lora import LoRA
from tokenizer import open_tokenizer, train_tokenizer

# 9 training examples in global batches of 8 (4 steps), as tests/test_train.py: one of 2 ranks runs padding work.
SMALL = ["--train-samples", "9", "--epochs", "2", "--eval-samples", "5", "--max-len", "48"]
# Token-loss clipping at about ln(320), the first step's loss: it clamps some tokens of that step.
LORA_LOMO = ["--lora-rank", "2", "--lora-dropout", "0", "--clip-grad-norm", "1.0", "--clip-loss-value", "5.77"]
LORA_ONLY = ["--optimizer", "lora", "--lora-dropout", "0"]
CONFIGS = {  # name: (flags, the 1-process run it must equal); dropout 0, so that 1 and 2 ranks can agree
    "lora-lomo": (LORA_LOMO, "lora-lomo"),
    "lora-lomo-linear": (LORA_LOMO + ["--shard-unit", "linear"], "lora-lomo"),
    "lora-lomo-fsdp2": (LORA_LOMO + ["--sharding", "fsdp2"], "lora-lomo"),
    "lora-adalomo": (["--optimizer", "adalomo", "--lr", "0.01", "--lora-rank", "2", "--lora-dropout", "0",
                      "--lora-targets", "wq,wk,wv,wo,w1,w2,w3"], "lora-adalomo"),
    "lora": (LORA_ONLY, "lora"),
    "lora-fsdp2": (LORA_ONLY + ["--sharding", "fsdp2"], "lora"),
}
RESUME = SMALL + ["--lora-rank", "2", "--lora-lr", "0.01", "--clip-grad-norm", "1.0", "--save-every", "2",
                  "--keep-last", "10"]  # the default dropout, 0.05


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    return train_tokenizer(data.synthetic_texts(), str(folder / "synthetic"), vocab_size=320)


def losses(save_dir):
    return [json.loads(line)["loss"] for line in open(Path(save_dir) / "metrics.jsonl") if '"loss"' in line]


def final(save_dir):
    """(full base tensors, adapters) of the last checkpoint: each rank's rows concatenated, and lora.pt."""
    last = sorted(Path(save_dir).glob("step_*"))[-1]
    ranks = [torch.load(f, weights_only=False)["model"] for f in sorted(last.glob("rank*.pt"))]
    lora = torch.load(last / "lora.pt", weights_only=False)
    return {name: torch.cat([r[name] for r in ranks]) for name in ranks[0]}, lora["adapters"]


def _worker(rank, world, argv_list):
    for argv in argv_list:
        train.main(argv)


@pytest.fixture(scope="module")
def runs(tokenizer, tmp_path_factory):
    """Every config on 2 ranks (one set of processes; the first exports in HF's format, then a run is resumed
    from its step 2), and the 1-process references (one exports in Meta's format)."""
    root = tmp_path_factory.mktemp("lora-runs")
    common = SMALL + ["--tokenizer", tokenizer]
    two = [common + flags + ["--batch-size", "4", "--save-dir", str(root / f"{name}-2")]
           for name, (flags, _) in CONFIGS.items()]
    two[0] += ["--export", str(root / "export-hf"), "--export-format", "hf"]
    resume = RESUME + ["--tokenizer", tokenizer, "--batch-size", "4"]
    two += [resume + ["--save-dir", str(root / "full")],
            resume + ["--save-dir", str(root / "resumed"), "--resume", str(root / "full" / "step_00000002")]]
    run_workers(_worker, two)
    for name in sorted({one for _, one in CONFIGS.values()}):
        extra = ["--export", str(root / "export-meta")] if name == "lora-lomo" else []
        train.main(common + CONFIGS[name][0] + ["--batch-size", "8", "--save-dir", str(root / f"{name}-1")] + extra)
    return root


@pytest.mark.parametrize("name", CONFIGS)
def test_two_ranks_equal_one_process(runs, name):
    one = runs / f"{CONFIGS[name][1]}-1"
    assert losses(runs / f"{name}-2") == pytest.approx(losses(one), abs=1e-5) and len(losses(one)) == 4
    (base2, lora2), (base1, lora1) = final(runs / f"{name}-2"), final(one)
    assert losses(one)[-1] < losses(one)[0] - 0.3 and any(b.any() for k, b in lora1.items() if k.endswith("lora_B"))
    for key in base1:
        torch.testing.assert_close(base2[key], base1[key], atol=1e-5, rtol=0, msg=key)
    for key in lora1:
        torch.testing.assert_close(lora2[key], lora1[key], atol=1e-5, rtol=0, msg=key)


@pytest.mark.parametrize("name", ["lora-1", "lora-2", "lora-fsdp2-2"])
def test_lora_baseline_leaves_every_base_weight_bit_identical(runs, tokenizer, name):
    margs = model.ModelArgs(**{**model.ModelArgs.from_name("tiny").__dict__,
                               "vocab_size": open_tokenizer(tokenizer).n_words})
    base, adapters = final(runs / name)
    initial = dict(model.random_weights(margs, seed=42))  # the default --seed's random model
    assert base.keys() == initial.keys()
    for key, value in initial.items():
        assert torch.equal(base[key], value), key
    assert any(a.any() for key, a in adapters.items() if key.endswith("lora_B"))  # the adapters did train


def lora_logits(run, tokens):
    """The LoRA model of a run's last checkpoint: its base weights with its adapters hooked on."""
    base, adapters = final(run)
    meta = json.loads((sorted(Path(run).glob("step_*"))[-1] / "meta.json").read_text())["lora"]
    net = model.Transformer(model.ModelArgs(**{**model.ModelArgs.from_name("tiny").__dict__,
                                               "vocab_size": base["tok_embeddings.weight"].shape[0]}))
    net.load_state_dict(base)
    lora = LoRA(net.args, meta["rank"], meta["alpha"], targets=meta["targets"])
    lora.load_state_dict(adapters)
    lora.attach(net)
    with torch.no_grad():
        return net(tokens)


@pytest.mark.parametrize("export,run", [("export-meta", "lora-lomo-1"), ("export-hf", "lora-lomo-2")])
def test_merged_export_gives_the_lora_models_logits(runs, export, run):
    exported = checkpoint.load_model(runs / export)
    base, _ = final(runs / run)
    assert not torch.equal(exported.state_dict()["layers.0.attention.wq.weight"], base["layers.0.attention.wq.weight"])
    assert torch.equal(exported.state_dict()["layers.0.attention.wk.weight"], base["layers.0.attention.wk.weight"])
    tokens = torch.randint(0, exported.args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = exported(tokens)
    torch.testing.assert_close(ours, lora_logits(runs / run, tokens), atol=1e-5, rtol=0)
    if export == "export-hf":
        transformers = pytest.importorskip("transformers")
        reference = transformers.LlamaForCausalLM.from_pretrained(runs / export).eval()
        with torch.no_grad():
            torch.testing.assert_close(ours, reference(tokens).logits.float(), atol=1e-4, rtol=0)


def test_resume_with_dropout_is_bit_exact_on_two_ranks(runs):
    """LoRA + LOMO with the default dropout and clipping, 2 ranks: resumed at step 2, the run reaches step 4 with
    every base row, adapter, AdamW moment, schedule and loss bit-identical to the uninterrupted run."""
    assert losses(runs / "resumed") == losses(runs / "full")[2:]
    full, resumed = runs / "full" / "step_00000004", runs / "resumed" / "step_00000004"
    for name in ("rank0.pt", "rank1.pt", "lora.pt"):
        a, b = (torch.load(f / name, weights_only=False) for f in (full, resumed))
        for key in ("model", "adapters", "optimizer", "scheduler", "rng"):
            if key in a:
                assert_equal(a[key], b[key], f"{name} {key}")
    assert torch.load(full / "lora.pt", weights_only=False)["optimizer"]["state"]  # AdamW's moments are there


def assert_equal(a, b, where):
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal(a[key], b[key], f"{where} {key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for x, y in zip(a, b):
            assert_equal(x, y, where)
    else:
        assert a == b, where


def test_a_lora_checkpoint_is_refused_without_its_adapters(runs, tokenizer, tmp_path):
    ckpt = sorted((runs / "lora-lomo-1").glob("step_*"))[-1]
    with pytest.raises(SystemExit, match="saved with --lora-rank 2 --lora-alpha 16.0 --lora-targets wq,wv, this "
                                         "run has no LoRA: pass the saved values"):
        train.main(SMALL + ["--tokenizer", tokenizer, "--epochs", "0", "--resume", str(ckpt),
                            "--save-dir", str(tmp_path / "a")])
    metrics = train.main(SMALL + LORA_LOMO + ["--tokenizer", tokenizer, "--epochs", "0", "--resume", str(ckpt),
                                              "--save-dir", str(tmp_path / "b")])
    assert 0 <= metrics["accuracy"] <= 1
    shutil.copytree(ckpt, tmp_path / "cut")
    (tmp_path / "cut" / "lora.pt").write_bytes((ckpt / "lora.pt").read_bytes()[:100])
    with pytest.raises(SystemExit, match="cannot read lora.pt .*; the checkpoint is corrupt"):
        train.main(SMALL + LORA_LOMO + ["--tokenizer", tokenizer, "--epochs", "0", "--resume", str(tmp_path / "cut"),
                                        "--save-dir", str(tmp_path / "c")])


# ---------------------------------------------------------------------------------------------- the demos

@pytest.mark.parametrize("flags", [["--optimizer", "lora"], ["--lora-rank", "2"]])
def test_short_lora_demos_learn(flags, tmp_path, capsys):
    """The demos cut to 125 steps (the full ones reach 100% validation accuracy): LoRA + LOMO learns the answer
    format, the LoRA baseline (random frozen embeddings and head) lowers its loss."""
    train.main(flags + ["--train-samples", "2000", "--epochs", "1", "--eval-samples", "8", "--save-dir",
                        str(tmp_path)])
    assert "done: 125 steps" in capsys.readouterr().out
    first, last = (sum(x) / len(x) for x in (losses(tmp_path)[:10], losses(tmp_path)[-10:]))
    assert first > 4 and (last < 0.5 if "--lora-rank" in flags else last < first - 0.4), (first, last)


# -------------------------------------------------------------------------------------- defaults and refusals

def test_each_mode_takes_the_official_settings():
    superglue = ["--task", "boolq", "--data-dir", "."]
    lora_lomo, lora_only, lomo = (train.parse_args(superglue + flags) for flags in
                                  (["--lora-rank", "2"], ["--optimizer", "lora"], []))
    official = dict(lora_alpha=16.0, lora_dropout=0.05, lora_targets="wq,wv", lora_lr=5e-4, warmup_ratio=0.05)
    for args in (lora_lomo, lora_only):
        assert {k: getattr(args, k) for k in official} == official and args.lora_rank == 2
    assert (lora_lomo.lr, lora_lomo.clip_grad_norm) == (0.005, 1.0)
    assert (lora_only.lr, lora_only.clip_grad_norm) == (None, None)
    assert (lomo.lr, lomo.warmup_ratio, lomo.clip_grad_norm, lomo.lora_rank) == (0.03, 0.1, 1.0, 0)


@pytest.mark.parametrize("argv,message", [
    (["--optimizer", "sgd", "--lora-rank", "2"], "--lora-rank: LoRA trains with --optimizer lora"),
    (["--optimizer", "lora", "--lr", "0.1"], "--lr is for the model's weights, which --optimizer lora freezes"),
    (["--optimizer", "lora", "--weight-decay", "0.1"], "--weight-decay is for the model's weights"),
    (["--optimizer", "lora", "--lora-rank", "0"], "--lora-rank must be at least 1, not 0"),
    (["--lora-lr", "0.1"], "--lora-lr needs LoRA: pass --lora-rank (LoRA + LOMO) or --optimizer lora"),
    (["--lora-rank", "2", "--lora-targets", "wq,q_proj"], "--lora-targets 'wq,q_proj': unknown projection(s) q_proj"),
    (["--lora-rank", "2", "--lora-dropout", "1"], "--lora-dropout is a probability, from 0 to less than 1"),
    (["--lora-rank", "2", "--lora-alpha", "0"], "--lora-alpha must be greater than 0"),
    (["--lora-rank", "-1"], "--lora-rank must be at least 0, not -1"),
    (["--clip-loss-value", "-2"], "--clip-loss-value must be greater than 0, not -2.0"),
])
def test_bad_lora_flags_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert message in capsys.readouterr().err


def test_dry_run_shows_the_lora_rows(capsys):
    train.main(["--model", "7b", "--dry-run"])
    out = capsys.readouterr().out
    assert "lora+lomo" in out and "LoRA r 2 on wq,wv" in out
    train.main(["--model", "65b", "--dry-run", "--world-size", "8", "--optimizer", "lora"])
    assert "optimizer lora with LoRA r 2 on wq,wv" in capsys.readouterr().out
