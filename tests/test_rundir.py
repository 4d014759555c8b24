"""rundir.py through train.main: a --save-dir holds one run, resumes continue it exactly, and a failed save or
export (a full disk, simulated) keeps the last good checkpoint and says what it needed."""
import contextlib
import dataclasses
import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import data
import rundir
import train
from optimizers import Optimizers
from dist_utils import run_workers
from tokenizer import train_tokenizer

# 8 examples in batches of 2: 4 steps an epoch, 8 in all; checkpoints at 2, 4, 6, 8; evaluations at 3, 6 and the end
FLAGS = ["--train-samples", "8", "--epochs", "2", "--eval-samples", "4", "--max-len", "48", "--batch-size", "2",
         "--optimizer", "adalomo", "--lr", "0.01", "--eval-every", "3", "--save-every", "2", "--keep-last", "10"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    return train_tokenizer(data.synthetic_texts(), str(folder / "synthetic"), vocab_size=320)


@pytest.fixture(scope="module")
def uninterrupted(tokenizer, tmp_path_factory):
    """The reference: the same run, never stopped."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    train.main(FLAGS + ["--tokenizer", tokenizer, "--save-dir", str(folder)])
    return folder


def rows(folder):
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def weights(checkpoint):
    return torch.load(Path(checkpoint) / "rank0.pt", weights_only=False)["model"]


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def crash_at_step(monkeypatch, n):
    """train.train_step raises in step n, as a killed process would stop there (the steps before are logged)."""
    real, calls = train.train_step, []

    def step(*args):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt("simulated crash")
        return real(*args)
    monkeypatch.setattr(train, "train_step", step)


# ---------------------------------------------------------------------------------------- one run per folder

def test_a_used_save_dir_is_refused_and_overwrite_starts_afresh(tokenizer, tmp_path):
    small = ["--tokenizer", tokenizer, "--train-samples", "8", "--epochs", "1", "--batch-size", "4",
             "--eval-samples", "2", "--max-len", "48"]
    train.main(small + ["--seed", "1", "--save-dir", str(tmp_path / "a")])
    (tmp_path / "a" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path / "a")
    with pytest.raises(SystemExit, match=r"--save-dir .*a is not empty .*--resume .*step_00000002 .*--overwrite"):
        train.main(small + ["--seed", "2", "--save-dir", str(tmp_path / "a")])
    assert snapshot(tmp_path / "a") == before  # nothing written, nothing lost
    train.main(small + ["--seed", "2", "--save-dir", str(tmp_path / "a"), "--overwrite"])
    train.main(small + ["--seed", "2", "--save-dir", str(tmp_path / "b")])
    untimed = lambda folder: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_mem_gib")}  # noqa: E731
                              for r in rows(folder)]
    assert untimed(tmp_path / "a") == untimed(tmp_path / "b")  # the second run's 2 steps and evaluation only
    assert len(untimed(tmp_path / "a")) == 3
    assert_same_weights(tmp_path / "a" / "step_00000002", tmp_path / "b" / "step_00000002")
    assert (tmp_path / "a" / "notes.txt").read_text() == "mine"  # not a run's file: kept


def test_resume_after_a_crash_keeps_every_metrics_row_once(tokenizer, uninterrupted, tmp_path, monkeypatch):
    run = FLAGS + ["--tokenizer", tokenizer, "--save-dir", str(tmp_path)]
    crash_at_step(monkeypatch, 6)  # step 5 is logged after checkpoint step_4, then the run dies
    with pytest.raises(KeyboardInterrupt):
        train.main(run)
    assert [r["step"] for r in rows(tmp_path) if "loss" in r] == [1, 2, 3, 4, 5]
    monkeypatch.undo()
    train.main(run + ["--resume", str(tmp_path / "step_00000004")])
    resumed, reference = rows(tmp_path), rows(uninterrupted)
    assert [(r["step"], r.get("split")) for r in resumed] == [(r["step"], r.get("split")) for r in reference]
    assert [r.get("loss") for r in resumed] == [r.get("loss") for r in reference]  # bit-exact on the CPU
    assert [r.get("accuracy") for r in resumed] == [r.get("accuracy") for r in reference]
    assert_same_weights(tmp_path / "step_00000008", uninterrupted / "step_00000008")


def test_resume_into_a_new_folder_is_bit_exact(tokenizer, uninterrupted, tmp_path):
    train.main(FLAGS + ["--tokenizer", tokenizer, "--save-dir", str(tmp_path),
                        "--resume", str(uninterrupted / "step_00000004")])
    resumed, reference = rows(tmp_path), rows(uninterrupted)
    assert [r["step"] for r in resumed if "loss" in r] == [5, 6, 7, 8]
    assert [r.get("loss") for r in resumed] == [r.get("loss") for r in reference[-len(resumed):]]
    assert_same_weights(tmp_path / "step_00000008", uninterrupted / "step_00000008")


def test_resume_from_an_earlier_checkpoint_needs_overwrite(tokenizer, uninterrupted, tmp_path):
    shutil.copytree(uninterrupted, tmp_path / "run")
    run = FLAGS + ["--tokenizer", tokenizer, "--save-dir", str(tmp_path / "run")]
    before = snapshot(tmp_path / "run")
    with pytest.raises(SystemExit, match="not the latest checkpoint .*step_00000006, step_00000008 follow it"):
        train.main(run + ["--resume", str(tmp_path / "run" / "step_00000004")])
    with pytest.raises(SystemExit, match="--epochs 0 only evaluates: .*pass a new --save-dir"):
        train.main(run + ["--resume", str(tmp_path / "run" / "step_00000008"), "--epochs", "0"])
    assert snapshot(tmp_path / "run") == before
    with torch.no_grad():  # mark a later checkpoint: the resumed run must write its own, not keep this one
        state = torch.load(tmp_path / "run" / "step_00000006" / "rank0.pt", weights_only=False)
        state["model"] = {n: torch.zeros_like(t) for n, t in state["model"].items()}
        torch.save(state, tmp_path / "run" / "step_00000006" / "rank0.pt")
    train.main(run + ["--resume", str(tmp_path / "run" / "step_00000004"), "--overwrite"])
    assert [r.get("loss") for r in rows(tmp_path / "run")] == [r.get("loss") for r in rows(uninterrupted)]
    for step in (6, 8):
        assert_same_weights(tmp_path / "run" / f"step_{step:08d}", uninterrupted / f"step_{step:08d}")


def test_save_never_skips_a_checkpoint_it_did_not_write(tmp_path):
    args = train.parse_args(["--save-dir", str(tmp_path)])
    folder = rundir.RunDir(args, rank=0, world=1)
    folder.check()
    net = torch.nn.Linear(3, 2)
    opt = Optimizers(args, net, None, world=1, total_steps=10)
    foreign = tmp_path / "step_00000005"
    foreign.mkdir()
    (foreign / "meta.json").write_text("{}")
    with pytest.raises(SystemExit, match="step_00000005 exists but was not written by this run"):
        folder.save(5, (0, 5), net, opt)
    assert (foreign / "meta.json").read_text() == "{}" and not list(tmp_path.glob(".step*"))
    saved = folder.save(6, (0, 6), net, opt)
    assert torch.equal(weights(saved)["weight"], net.weight)
    os.utime(saved / "rank0.pt", (0, 0))
    assert folder.save(6, (0, 6), net, opt) == saved  # its own, of this very state: not written twice
    assert (saved / "rank0.pt").stat().st_mtime == 0


def test_resume_refuses_flags_that_change_the_run(tokenizer, uninterrupted, tmp_path):
    checkpoint = uninterrupted / "step_00000004"
    run = FLAGS + ["--tokenizer", tokenizer, "--save-dir", str(tmp_path / "x"), "--resume", str(checkpoint)]
    with pytest.raises(SystemExit, match="saved with --seed 42 --lr 0.01; this run has --seed 7 --lr 0.02"):
        train.main(run + ["--seed", "7", "--lr", "0.02"])
    with pytest.raises(SystemExit, match=r"saved with a global batch of 2 \(1 rank\(s\) x --batch-size 2\); this "
                       r"run's is 4 \(1 rank\(s\) x --batch-size 4\): pass --batch-size 2$"):
        train.main(run + ["--batch-size", "4"])
    assert not (tmp_path / "x" / "metrics.jsonl").exists()
    train.main(run + ["--epochs", "0", "--seed", "7"])  # only evaluates: any flags
    assert [r["step"] for r in rows(tmp_path / "x")] == [4]


# ------------------------------------------------------------------------------------- durable, or a clear error

def test_checkpoint_files_are_fsynced_before_the_rename(tokenizer, tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(rundir.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                        real_fsync(fd)))
    monkeypatch.setattr(rundir.os, "replace", lambda a, b: (events.append(("rename", str(b))), real_replace(a, b)))
    train.main(["--tokenizer", tokenizer, "--train-samples", "4", "--epochs", "1", "--batch-size", "4",
                "--eval-samples", "2", "--max-len", "48", "--save-dir", str(tmp_path)])
    final = str(tmp_path / "step_00000001")
    rename = events.index(("rename", final))
    fsynced = [path for kind, path in events[:rename] if kind == "fsync"]
    tmp = str(tmp_path / ".step_00000001.tmp")
    assert {tmp + "/rank0.pt", tmp + "/meta.json", tmp} <= set(fsynced)  # the files, and the folder's names
    assert ("fsync", str(tmp_path)) in events[rename:]  # the rename itself


def full_disk_on_save(monkeypatch, from_call):
    """From the from_call-th call on, torch.save writes part of the file and fails as it does on a full disk (seen
    on a 1 MiB tmpfs): a RuntimeError "unexpected pos", raised while handling the OSError of the failed write."""
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) < from_call:
            return real(obj, f, *args, **kwargs)
        with open(f, "wb") if isinstance(f, (str, Path)) else contextlib.nullcontext(f) as out:
            out.write(b"x" * 1000)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(torch, "save", save)


def test_full_disk_during_a_save_names_the_folder_and_keeps_the_last_checkpoint(tokenizer, tmp_path, monkeypatch):
    full_disk_on_save(monkeypatch, from_call=2)
    run = ["--tokenizer", tokenizer, "--train-samples", "8", "--epochs", "1", "--batch-size", "2", "--eval-samples",
           "2", "--max-len", "48", "--save-every", "2", "--save-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        train.main(run)
    message = str(exc.value)
    assert f"cannot write checkpoint step_00000004 in --save-dir {tmp_path} (no space left on device): it needs " \
        "about" in message
    model_bytes = sum(t.nelement() * t.element_size() for t in weights(tmp_path / "step_00000002").values())
    assert int(message.split("needs about ")[1].split(" ")[0].replace(",", "")) >= model_bytes
    assert "the last good checkpoint" in message and "--resume" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "step_00000002"]  # no partial .tmp
    monkeypatch.undo()
    train.main(run + ["--resume", str(tmp_path / "step_00000002")])  # and the run goes on from there


def _full_disk_worker(rank, world, argv):
    if rank == 1:  # only one rank's disk fails: the other must not wait for it in a collective
        full_disk_on_save(pytest.MonkeyPatch(), from_call=1)
    with pytest.raises(SystemExit, match="--save-dir .* [(]no space left on device[)]"):
        train.main(argv)
    if rank == 0:  # which removed the partial folder before it exited
        assert not list(Path(argv[-1]).glob(".step*"))


def test_full_disk_on_one_rank_stops_every_rank(tokenizer, tmp_path):
    run_workers(_full_disk_worker, ["--tokenizer", tokenizer, "--train-samples", "8", "--epochs", "1",
                                    "--batch-size", "2", "--eval-samples", "2", "--max-len", "48",
                                    "--save-dir", str(tmp_path)])


def test_full_disk_during_an_export(tokenizer, tmp_path, monkeypatch):
    """safetensors and torch.save report a full disk in exceptions of their own: the free space tells it from a bug."""
    import checkpoint

    def full(self, tensors):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(checkpoint.MetaWriter, "_write_unit", full)
    run = ["--tokenizer", tokenizer, "--epochs", "0", "--eval-samples", "2", "--max-len", "48"]
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with space to spare: a bug, with its traceback
        train.main(run + ["--save-dir", str(tmp_path / "a"), "--export", str(tmp_path / "model")])
    usage = rundir.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda path: usage._replace(free=100))
    with pytest.raises(SystemExit, match=r"--export .*model: cannot write it \(no space left on device\): the model "
                       "needs about .* bytes .*, 100 bytes are free. The partial folder was removed"):
        train.main(run + ["--save-dir", str(tmp_path / "b"), "--export", str(tmp_path / "model")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # neither an export nor a partial folder


# ------------------------------------------------------------------------------ checked before the model loads

def test_folders_are_checked_before_training(tokenizer, tmp_path):
    run = ["--tokenizer", tokenizer, "--epochs", "1", "--train-samples", "4", "--max-len", "48"]
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    with pytest.raises(SystemExit, match="--export .*used already exists and is not empty"):
        train.main(run + ["--save-dir", str(tmp_path / "a"), "--export", str(tmp_path / "used")])
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="--save-dir .*file/run: cannot write in"):
        train.main(run + ["--save-dir", str(tmp_path / "file" / "run")])
    with pytest.raises(SystemExit, match="--export .*file/model: cannot write in"):
        train.main(run + ["--save-dir", str(tmp_path / "b"), "--export", str(tmp_path / "file" / "model")])
    assert not list(tmp_path.glob("*/metrics.jsonl"))  # no run started


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_save_dir_is_refused_before_training(tokenizer, tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(SystemExit, match="cannot write in"):
        train.main(["--tokenizer", tokenizer, "--save-dir", str(tmp_path / "ro")])


def test_low_disk_space_is_warned_of(tokenizer, tmp_path, monkeypatch, capsys):
    usage = rundir.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    def stop(*args):  # the check comes before the model is loaded: stop the run there
        raise SystemExit("stop")
    monkeypatch.setattr(train, "build_model", stop)
    with pytest.raises(SystemExit, match="stop"):
        train.main(["--tokenizer", tokenizer, "--optimizer", "adamw", "--save-dir", str(tmp_path / "run"),
                    "--export", str(tmp_path / "model")])
    out = capsys.readouterr().out
    assert f"warning: {tmp_path / 'run'} has 0.00 MiB free, but a checkpoint needs about" in out
    assert f"warning: {tmp_path} has 0.00 MiB free, but the export needs about" in out


# ------------------------------------------------------------------------------- resume on another layout

# 14 examples in global batches of 6 (6 + 6 + 2): 3 steps an epoch, 6 in all. The checkpoint at step 2 is mid-epoch
# (12 examples done); in the last batch of each epoch 2 examples go to 3 ranks, so one rank runs empty.
LAYOUT = ["--train-samples", "14", "--epochs", "2", "--eval-samples", "3", "--max-len", "48", "--save-every", "2",
          "--keep-last", "10"]
PER_RANK = {1: "6", 2: "3", 3: "2"}  # --batch-size: a global batch of 6 on any of these
TIED = ["--optimizer", "adalomo", "--lr", "0.01", "--clip-grad-norm", "1.0"]  # with a tied --ckpt: see below
LORA_LOMO = ["--lora-rank", "2", "--lora-dropout", "0", "--lora-lr", "0.01"]
ADAMW_BF16 = ["--optimizer", "adamw", "--lr", "0.01", "--dtype", "bf16"]


def full_tensors(checkpoint, key="model"):
    """{name: full tensor} (key "model") or {(name, state key): full tensor} (key "state", the rows-kind state) of
    a checkpoint, put together from each rank file's rows at their global offsets: the reference layout-free view."""
    files = [torch.load(f, weights_only=True) for f in sorted(Path(checkpoint).glob("rank*.pt"))]
    pieces = {}
    for f in files:
        for name, (start, stop) in f["rows"].items():
            items = {name: f["model"][name]} if key == "model" else \
                {(name, k): v for k, v in f["state"].get(name, {}).items() if k in ("row", "sq", "exp_avg", "master")}
            for item, piece in items.items():
                pieces.setdefault(item, []).append((start, piece))
    return {item: torch.cat([piece for _, piece in sorted(p, key=lambda x: x[0])]) for item, p in pieces.items()}


def checkpoints(folder):
    return rundir.checkpoints(Path(folder))


def assert_continues(resumed, reference, step=2):
    """The run resumed from step `step` equals the uninterrupted `reference` from there: each later metrics row
    (losses within 1e-5, the same accuracy), and the final weights within 1e-5."""
    got, want = rows(resumed), [r for r in rows(reference) if r["step"] > step]
    assert [(r["step"], r.get("split")) for r in got] == [(r["step"], r.get("split")) for r in want]
    assert [r.get("loss") for r in got] == pytest.approx([r.get("loss") for r in want], abs=1e-5)
    assert [r.get("accuracy") for r in got] == [r.get("accuracy") for r in want]
    last = checkpoints(resumed)[-1].name
    assert last == checkpoints(reference)[-1].name == "step_00000006"
    a, b = full_tensors(Path(resumed) / last), full_tensors(Path(reference) / last)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0, msg=name)


def _checked_load(check, saved):
    """Wrap RunDir.load to check, right after it, what it restored against the saved checkpoint's files."""
    real = rundir.RunDir.load

    def load(self, model, opt, lora=None):
        result = real(self, model, opt, lora)
        if check == "rng":  # rank r restores the saved rank r's state; a new rank seeds from (--seed, step, rank)
            files = sorted(Path(saved).glob("rank*.pt"))
            if self.rank < len(files):
                expected = torch.load(files[self.rank], weights_only=True)["rng"]
            else:
                seed = rundir.random.Random(f"{self.args.seed}:2:{self.rank}").getrandbits(63)  # step 2
                expected = torch.Generator().manual_seed(seed).get_state()
            assert torch.equal(torch.get_rng_state(), expected)
        if check == "adamw":  # every master and moment row of the 1-rank file, in this rank's FSDP2 DTensors
            full = torch.load(Path(saved) / "rank0.pt", weights_only=True)["state"]
            masters = dict(zip(map(id, opt.base.model_params), [m for g in opt.base.param_groups for m in g["params"]]))
            mine = train.shard.local_rows(model)
            for name, p in train.shard.named_params(model).items():
                start, stop = mine[name]
                master, state = masters[id(p)], opt.base.state[masters[id(p)]]
                assert master.dtype == torch.float32 and p.dtype == torch.bfloat16
                for key, value in (("master", master), ("exp_avg", state["exp_avg"]),
                                   ("exp_avg_sq", state["exp_avg_sq"])):
                    assert type(value).__name__ == "DTensor", (name, key)
                    assert torch.equal(value.to_local(), full[name][key][start:stop]), (name, key)
                assert torch.equal(state["step"], full[name]["step"])
        return result
    return load


def _reshard_worker(rank, world, runs):
    """train.main for each (argv, check, saved) in turn: one set of processes for every run of a world size."""
    for argv, check, saved in runs:
        with pytest.MonkeyPatch.context() as patch:
            if check:
                patch.setattr(rundir.RunDir, "load", _checked_load(check, saved))
            train.main(argv)


@pytest.fixture(scope="module")
def resharded(tokenizer, tmp_path_factory):
    """Runs saved on one layout and resumed at step 2 on another, and the uninterrupted runs of each new layout:
        tied AdaLomo:  1 -> 2 ranks, 2 -> 1, own -> fsdp2 (2 ranks)
        LoRA + LOMO:   2 ranks (own, linear units) -> 3 ranks (own, block units)
        bf16 AdamW:    1 -> fsdp2 (2 ranks), its fp32 masters and moments checked right after the load."""
    import checkpoint
    import model
    from tokenizer import open_tokenizer
    root = tmp_path_factory.mktemp("resharded")
    margs = dataclasses.replace(model.ModelArgs.from_name("tiny"), vocab_size=open_tokenizer(tokenizer).n_words,
                                tie_embeddings=True)
    net = model.Transformer(margs)
    model.init_weights(net, seed=5)
    checkpoint.save_model(net, root / "tied", format="hf")
    common = LAYOUT + ["--tokenizer", tokenizer]
    tied = common + TIED + ["--ckpt", str(root / "tied")]
    argv = lambda flags, world, name, *more: flags + ["--batch-size", PER_RANK[world],  # noqa: E731
                                                     "--save-dir", str(root / name), *more]
    resume = lambda name: ["--resume", str(root / name / "step_00000002")]  # noqa: E731
    train.main(argv(tied, 1, "tied-1"))
    train.main(argv(common + ADAMW_BF16, 1, "adamw-1"))
    run_workers(_reshard_worker, [
        (argv(tied, 2, "tied-2"), None, None),
        (argv(tied, 2, "tied-1to2", *resume("tied-1")), "rng", root / "tied-1" / "step_00000002"),
        (argv(tied + ["--sharding", "fsdp2"], 2, "tied-fsdp2"), None, None),
        (argv(tied + ["--sharding", "fsdp2"], 2, "tied-own-to-fsdp2", *resume("tied-2")), None, None),
        (argv(common + LORA_LOMO + ["--shard-unit", "linear"], 2, "lora-2"), None, None),
        (argv(common + ADAMW_BF16 + ["--sharding", "fsdp2"], 2, "adamw-1to2", *resume("adamw-1")), "adamw",
         root / "adamw-1" / "step_00000002")], world_size=2)
    exact = ["--tokenizer", tokenizer, "--train-samples", "10", "--epochs", "2", "--batch-size", "2",
             "--eval-samples", "3", "--max-len", "48", "--optimizer", "adalomo", "--lr", "0.01", "--save-every", "2",
             "--keep-last", "5"]  # for test_three_ranks_resume_exactly
    run_workers(_reshard_worker, [
        (exact + ["--save-dir", str(root / "full-3")], None, None),
        (exact + ["--save-dir", str(root / "resumed-3"), "--resume", str(root / "full-3" / "step_00000002")], None,
         None),
        (argv(common + LORA_LOMO, 3, "lora-3"), None, None),
        (argv(common + LORA_LOMO, 3, "lora-2to3", *resume("lora-2")), "rng", root / "lora-2" / "step_00000002")],
        world_size=3)
    train.main(argv(tied, 1, "tied-2to1", *resume("tied-2")))
    train.main(tied + ["--epochs", "0", "--resume", str(root / "tied-2" / "step_00000006"), "--export",
                       str(root / "tied-2-export"), "--save-dir", str(root / "tied-2-export-run")])
    return root


def test_three_ranks_resume_exactly(resharded):
    """3 ranks, uneven row shards (dim 64 and vocab 320 over 3) and an uneven last batch (10 examples, 6 a step),
    resumed on the same layout: bit-exact (run in the resharded fixture's processes)."""
    full, resumed = resharded / "full-3", resharded / "resumed-3"
    assert [r.get("loss") for r in rows(resumed)] == [r.get("loss") for r in rows(full)[-len(rows(resumed)):]]
    assert [r["step"] for r in rows(resumed) if "loss" in r] == [3, 4]
    for r in range(3):
        a, b = (torch.load(f / "step_00000004" / f"rank{r}.pt", weights_only=False) for f in (full, resumed))
        assert a["rows"] == b["rows"] and a["model"].keys() == b["model"].keys()
        assert all(torch.equal(a["model"][n], b["model"][n]) for n in a["model"]), r


def test_resume_from_1_rank_on_2_with_adalomo_and_a_tied_model(resharded):
    assert_continues(resharded / "tied-1to2", resharded / "tied-2")


def test_resume_from_2_ranks_on_1(resharded):
    assert_continues(resharded / "tied-2to1", resharded / "tied-1")


def test_resume_from_own_sharding_on_fsdp2(resharded):
    assert_continues(resharded / "tied-own-to-fsdp2", resharded / "tied-fsdp2")


def test_resume_lora_lomo_from_2_ranks_on_3_and_from_linear_to_block_units(resharded):
    assert_continues(resharded / "lora-2to3", resharded / "lora-3")
    a, b = (torch.load(checkpoints(resharded / run)[-1] / rundir.LORA, weights_only=True)
            for run in ("lora-2to3", "lora-3"))
    for name in a["adapters"]:
        torch.testing.assert_close(a["adapters"][name], b["adapters"][name], atol=1e-5, rtol=0, msg=name)
    for i, state in b["optimizer"]["state"].items():  # the adapters' AdamW moments
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a["optimizer"]["state"][i][key], state[key], atol=1e-5, rtol=0)


def test_a_checkpoint_of_2_ranks_exports_from_1(resharded):
    """--epochs 0 --resume on another layout: a multi-GPU run's checkpoint evaluated and exported on one machine."""
    import checkpoint
    exported = checkpoint.load_model(resharded / "tied-2-export").state_dict()
    saved = full_tensors(resharded / "tied-2" / "step_00000006")
    assert sorted(exported) == sorted(saved)
    for name, value in saved.items():
        assert torch.equal(exported[name], value), name
    assert rows(resharded / "tied-2-export-run") == [r for r in rows(resharded / "tied-2") if r.get("split")][-1:]


def test_a_resharded_checkpoint_keeps_adalomo_state_by_rows(resharded):
    """AdaLomo's row statistics and vector moments, saved by 2 ranks (own) and by FSDP2, put together by rows, equal
    the 1-rank run's; the column statistics are whole in every rank's file."""
    one = full_tensors(resharded / "tied-1" / "step_00000006", "state")
    assert any(key == "row" for _, key in one) and any(key == "sq" for _, key in one)
    for run in ("tied-2", "tied-fsdp2", "tied-1to2"):
        other = full_tensors(resharded / run / "step_00000006", "state")
        assert other.keys() == one.keys()
        for item in one:
            torch.testing.assert_close(other[item], one[item], atol=0, rtol=1e-4, msg=f"{run} {item}")
        files = sorted((resharded / run / "step_00000006").glob("rank*.pt"))
        cols = [torch.load(f, weights_only=True)["state"]["layers.0.attention.wq.weight"]["col"] for f in files]
        assert len(cols) == 2 and cols[0].shape == (64,) and torch.equal(cols[0], cols[1])
