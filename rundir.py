"""The run folder of train.py (--save-dir): its checkpoints, metrics.jsonl, and the rules that keep runs apart.

    <save-dir>/metrics.jsonl        a JSON row per training step and per evaluation (rank 0 writes it)
    <save-dir>/step_00000020/       a checkpoint: rank0.pt, rank1.pt, ... (each rank's rows with their global
                                    offsets, and its optimizer state: reshard.py), meta.json, and with LoRA lora.pt
                                    (the adapters and their AdamW state: one copy, as every rank holds the same)
    <save-dir>/<Task>.jsonl         test predictions (--predict)

A folder holds one run. A fresh run needs an empty or new folder, or --overwrite, which deletes the files an
earlier run left there (never other files). A run resumed from one of the folder's own checkpoints continues it
in place: metrics.jsonl is cut back to what it held when that checkpoint was saved, and the checkpoint must be the
folder's latest (--overwrite deletes the later ones). So no folder ever mixes two runs or two histories.
A checkpoint resumes on any number of ranks and either sharding (reshard.py), with the same global batch.
All of this is checked on every rank before the model is loaded; only rank 0 writes outside its own files.
"""
import errno
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

import plan
import reshard
import shard
import superglue
from checkpoint import HFWriter, MetaWriter, fsync_path
from model import param_shapes

META, METRICS, LORA = "meta.json", "metrics.jsonl", "lora.pt"
# Flags that a resumed training run must share with the saved one: each changes the data order, the schedule
# or the update, so changing one mid-run would silently give a run that no single command describes. (The global
# batch, --batch-size x ranks, must be the same too; --batch-size alone may change with the number of ranks.)
RUN_FLAGS = ("task", "train_samples", "sampling", "seed", "epochs", "max_len", "optimizer", "lr",
             "lr_schedule", "warmup_ratio", "clip_grad_norm", "clip_grad_value", "clip_loss_value", "weight_decay",
             "stochastic_rounding", "dtype", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_lr")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints(folder: Path) -> list[Path]:
    """The finished checkpoints in a folder, oldest first."""
    return sorted(p for p in folder.glob("step_*") if p.is_dir())


def run_files(folder: Path) -> list[Path]:
    """What a run of train.py writes into its folder (--overwrite deletes exactly these)."""
    return sorted(p for p in folder.iterdir() if p.name == METRICS or p.name in superglue.SUBMISSION_FILES
                  or (p.is_dir() and (p.name.startswith("step_") or p.name.startswith(".step_"))))


def read_meta(path) -> dict:
    try:
        return json.loads((Path(path) / META).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--resume {path}: not a checkpoint folder of train.py (meta.json unreadable: {e})")


def write_durably(path: Path, write) -> None:
    """write(file) into path, then flush and fsync, so that a power loss after a later rename cannot leave an
    empty or partial file behind the new name."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def check_writable(folder: Path, flag: str) -> None:
    """Create the folder if needed and write a file there: a path under a file, or a read-only disk, fails now."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise SystemExit(f"{flag}: cannot write in {folder} ({e.strerror or e}); pass a folder you can write to")


def check_export(path) -> None:
    """--export must be a new or empty folder whose parent can be written (checkpoint.py's writers write next to
    it, then rename)."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"--export {out} already exists and is not empty: pass a new folder (nothing is overwritten)")
    check_writable(out.parent, f"--export {out}")


def size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


def _nbytes(obj) -> int:
    """Bytes of every tensor in a nested state (what torch.save will write, give or take the headers)."""
    if torch.is_tensor(obj):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def write_failure(e: Exception, folder: Path, nbytes: int):
    """Why writing about nbytes into folder failed, when the disk is to blame; None for anything else (a bug, to be
    raised as it is). torch.save and safetensors wrap a full disk in exceptions of their own ("unexpected pos"),
    so the free space decides too."""
    if any(getattr(x, "errno", None) in (errno.ENOSPC, errno.EDQUOT) for x in (e, e.__context__)) \
            or shutil.disk_usage(folder).free < nbytes:
        return "no space left on device"
    return str(e) if isinstance(e, OSError) else None


def gather_objects(obj, world: int) -> list:
    """Every rank's `obj`, in rank order (one rank: [obj])."""
    if world == 1:
        return [obj]
    everyone = [None] * world
    dist.all_gather_object(everyone, obj)
    return everyone


def raise_together(message, world: int) -> None:
    """Every rank exits with the first rank's error when any rank has one, so that none waits in a collective."""
    problems = [m for m in gather_objects(message, world) if m]
    if problems:
        raise SystemExit(problems[0])


class RunDir:
    """The run's --save-dir, on every rank: check() and prepare() before the model is loaded, then log(), save()
    and load()."""

    def __init__(self, args, rank: int, world: int):
        self.args, self.rank, self.world = args, rank, world
        self.root = Path(args.save_dir)
        self.metrics_path = self.root / METRICS
        self.resume_meta = read_meta(args.resume) if args.resume else None
        self.in_place = bool(args.resume) and Path(args.resume).resolve().parent == self.root.resolve()
        self.saved = {self.resume_meta["step"]} if self.in_place else set()  # checkpoints of this very state
        self.metrics_rows = 0  # rows of metrics.jsonl; a checkpoint records it, so a resume can cut back to it
        self.to_delete = []

    def describe(self) -> dict:
        """What meta.json records of the run, besides its step."""
        a = self.args
        lora = {"rank": a.lora_rank, "alpha": a.lora_alpha, "targets": a.lora_targets.split(",")} if a.lora_rank \
            else None  # what the adapters compute: lora.LoRA.config()
        return {"format": reshard.FORMAT, "world_size": self.world,
                "sharding": a.sharding if self.world > 1 else "none",
                "shard_unit": a.shard_unit if self.world > 1 and a.sharding == "own" else None,
                "optimizer": a.optimizer, "lora": lora, "global_batch": a.batch_size * self.world,
                "flags": {flag: getattr(a, flag) for flag in RUN_FLAGS}}

    def warn_if_short_of_space(self, margs, dtype) -> None:
        """Warn (rank 0) when the free space cannot hold one checkpoint, or the export, of the planned size."""
        sizes = plan.plan(margs, self.args.optimizer, 1, nbytes=dtype.itemsize)
        needs = [(self.root, (sizes["params"] + sizes["optimizer_state"]) * plan.GiB, "a checkpoint")]
        if self.args.export:
            needs.append((Path(self.args.export).parent, sizes["params"] * plan.GiB, "the export"))
        for folder, nbytes, what in needs:
            free = shutil.disk_usage(folder).free
            if free < nbytes:
                print(f"warning: {folder} has {size(free)} free, but {what} needs about {size(nbytes)}")

    def check(self) -> None:
        """Refuse, before anything is loaded, a resume that cannot continue this run and a folder that would mix
        two runs; check that the folder can be written."""
        if self.resume_meta:
            self._check_resume()
        entries = sorted(self.root.iterdir()) if self.root.is_dir() else []
        if self.in_place and not self.args.epochs:
            raise SystemExit(f"--epochs 0 only evaluates: its metrics would be appended to the log of the run in "
                             f"{self.root} that --resume {self.args.resume} belongs to; pass a new --save-dir")
        if self.in_place:  # continue the folder's own run: nothing may come after the checkpoint resumed from
            name = step_name(self.resume_meta["step"])
            later = [c for c in checkpoints(self.root) if c.name > name]
            if later and not self.args.overwrite:
                raise SystemExit(f"--resume {self.args.resume} is not the latest checkpoint of {self.root} "
                                 f"({', '.join(c.name for c in later)} follow it): resuming there would mix two "
                                 "histories. Pass --overwrite to delete the later ones, or a new --save-dir")
            self.to_delete = later + sorted(self.root.glob(".step_*.tmp"))  # and any save cut short by a crash
        elif entries:
            if not self.args.overwrite:
                latest = checkpoints(self.root)
                resume = f"--resume {latest[-1]} to continue it, " if latest else ""
                held = ", ".join(e.name for e in entries[:4]) + (", ..." if len(entries) > 4 else "")
                raise SystemExit(f"--save-dir {self.root} is not empty (it holds {held}): pass {resume}--overwrite "
                                 "to delete the earlier run's files and start afresh, or a new --save-dir")
            self.to_delete = run_files(self.root)
        check_writable(self.root, f"--save-dir {self.root}")

    def _check_resume(self) -> None:
        saved, ours, path = self.resume_meta, self.describe(), self.args.resume
        if saved.get("format", 1) != reshard.FORMAT:
            raise SystemExit(f"--resume {path} was written by an earlier train.py (checkpoint format "
                             f"{saved.get('format', 1)}; this one reads format {reshard.FORMAT}): resume it with the "
                             "train.py that wrote it; the checkpoint is left untouched")
        if saved["optimizer"] != ours["optimizer"]:
            raise SystemExit(f"--resume {path} was saved with --optimizer {saved['optimizer']}, this run has "
                             f"--optimizer {ours['optimizer']}")
        if saved.get("lora") != ours["lora"]:  # even to evaluate: without its adapters the model is another
            flags = lambda lora: "no LoRA" if lora is None else (  # noqa: E731
                f"--lora-rank {lora['rank']} --lora-alpha {lora['alpha']} --lora-targets {','.join(lora['targets'])}")
            raise SystemExit(f"--resume {path} was saved with {flags(saved.get('lora'))}, this run has "
                             f"{flags(ours['lora'])}: pass the saved values")
        if self.args.epochs:  # a run that only evaluates, predicts or exports may use any flags
            differ = [f for f in RUN_FLAGS if f in saved.get("flags", {}) and saved["flags"][f] != ours["flags"][f]]
            if differ:
                flags = lambda values: " ".join(f"--{f.replace('_', '-')} {values[f]}" for f in differ)  # noqa: E731
                raise SystemExit(f"--resume {path} was saved with {flags(saved['flags'])}; this run has "
                                 f"{flags(ours['flags'])}: pass the saved values (or --epochs 0 to only evaluate)")
            self._check_global_batch()

    def _check_global_batch(self) -> None:
        """The same global batch on any number of ranks: the same examples make each step (data.epoch_batches)."""
        saved, world, batch = self.resume_meta, self.world, self.args.batch_size
        if saved["global_batch"] == batch * world:
            return
        fix = (f"pass --batch-size {saved['global_batch'] // world}" if saved["global_batch"] % world == 0 else
               f"it does not split over {world} ranks: run on a number of ranks that divides it")
        raise SystemExit(f"--resume {self.args.resume} was saved with a global batch of {saved['global_batch']} "
                         f"({saved['world_size']} rank(s) x --batch-size {saved['global_batch'] // saved['world_size']}"
                         f"); this run's is {batch * world} ({world} rank(s) x --batch-size {batch}): {fix}")

    def prepare(self) -> None:
        """After every check has passed: delete what check() found to go, and cut metrics.jsonl back to the
        checkpoint resumed from (rank 0)."""
        if self.rank == 0:
            for path in self.to_delete:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            if self.in_place and self.metrics_path.exists():
                rows = [line for line in self.metrics_path.read_text().splitlines(True) if line.endswith("\n")]
                rows = rows[:self.resume_meta.get("metrics_rows", len(rows))]
                tmp = self.root / f".{METRICS}.tmp"
                write_durably(tmp, lambda f: f.write("".join(rows).encode()))
                os.replace(tmp, self.metrics_path)
                self.metrics_rows = len(rows)
        if self.world > 1:
            dist.barrier()

    def log(self, row: dict) -> None:
        """Append a row to metrics.jsonl (rank 0; the others keep no log)."""
        if self.rank == 0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.metrics_rows += 1

    def save(self, step, position, model, opt, lora=None) -> Path:
        """<save-dir>/step_N: one file per rank plus meta.json (and lora.pt), written in a temporary folder,
        fsynced, then renamed, so that a crash or a full disk during a save never harms the last good checkpoint. A
        step this run has already saved (or resumed from) holds this very state and is not written twice. Keeps the
        last --keep-last. Every rank calls it, with its optimizers.Optimizers and the lora.LoRA (or None).
        position: (epoch, examples of it done), which means the same on any number of ranks."""
        final, tmp = self.root / step_name(step), self.root / f".{step_name(step)}.tmp"
        if step in self.saved:
            return final
        raise_together(f"{final} exists but was not written by this run (is another run writing into --save-dir "
                       f"{self.root}?): refusing to overwrite it" if final.exists() else None, self.world)
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        if self.world > 1:
            dist.barrier()
        state = {**reshard.rank_state(model, opt.base), "scheduler": opt.state_dict("base")["scheduler"],
                 "step": step, "position": position, "rng": torch.get_rng_state(), "python_rng": random.getstate(),
                 "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        adapters = {"adapters": lora.state_dict(), "config": lora.config(), **opt.state_dict("adapters")} \
            if lora is not None and self.rank == 0 else None  # replicated: rank 0's copy is everyone's
        failure, nbytes = None, _nbytes(state) + _nbytes(adapters)
        try:
            write_durably(tmp / f"rank{self.rank}.pt", lambda f: torch.save(state, f))
            if adapters is not None:
                write_durably(tmp / LORA, lambda f: torch.save(adapters, f))
            if self.rank == 0:
                meta = {"step": step, "metrics_rows": self.metrics_rows, **self.describe()}
                write_durably(tmp / META, lambda f: f.write(json.dumps(meta, indent=2).encode()))
        except Exception as e:
            failure = write_failure(e, tmp, nbytes)
            if failure is None:
                raise
        self._finish_save(failure, nbytes, final, tmp)
        self.saved.add(step)
        return final

    def _finish_save(self, failure, nbytes, final, tmp) -> None:
        """Rename the checkpoint into place once every rank has written its file; or, if any rank could not,
        remove the partial folder and exit with that rank's reason, the bytes needed and the bytes free."""
        results = gather_objects((failure, nbytes), self.world)
        failures = [f for f, _ in results if f]
        if failures:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            needed, last = sum(n for _, n in results), checkpoints(self.root)
            kept = f"the last good checkpoint, {last[-1]}, is untouched" if last else "no earlier checkpoint exists"
            raise SystemExit(f"cannot write checkpoint {final.name} in --save-dir {self.root} ({failures[0]}): it "
                             f"needs about {needed:,} bytes ({size(needed)}), "
                             f"{shutil.disk_usage(self.root).free:,} bytes are free. The partial {tmp.name} was "
                             f"removed and {kept}; make room or pass another --save-dir"
                             + (f", then --resume {last[-1]}" if last else ""))
        if self.rank == 0:
            fsync_path(tmp)
            os.replace(tmp, final)
            fsync_path(self.root)
            for old in checkpoints(self.root)[:-self.args.keep_last]:
                shutil.rmtree(old)
        if self.world > 1:
            dist.barrier()

    def load(self, model, opt, lora=None) -> tuple[int, tuple]:
        """Restore this rank's rows of the --resume checkpoint, from whatever layout saved it (reshard.py), and the
        adapters (check() has checked that the run fits). Returns (step, position). Random state: rank r restores
        the saved rank r's; a rank beyond the saved ones seeds from (--seed, step, rank)."""
        path, problem = Path(self.args.resume), None
        try:
            if lora is not None:
                try:
                    adapters = torch.load(path / LORA, map_location="cpu", weights_only=True)
                except Exception as e:  # a missing, truncated or corrupt file
                    raise ValueError(f"cannot read {LORA} ({e}); the checkpoint is corrupt") from e
                saved = {n: tuple(t.shape) for n, t in adapters["adapters"].items()}
                if saved != {n: tuple(t.shape) for n, t in lora.state_dict().items()}:
                    raise ValueError("it holds other LoRA adapters than --lora-rank / --lora-targets describe")
            files = [path / f"rank{r}.pt" for r in range(self.resume_meta["world_size"])]
            state, heads = reshard.read_rows(files, model)  # the weights now; the rest below
        except ValueError as e:
            problem = f"--resume {path}: {e}"
        raise_together(problem, self.world)  # so that no rank goes on to train alone
        head = heads[0]  # what every rank file holds alike
        if opt.base is not None:
            saved = reshard.optimizer_state_dict(opt.base, model, head["optimizer"], state)
            opt.load_state_dict("base", {"optimizer": saved, "scheduler": head["scheduler"]})
        if lora is not None:
            lora.load_state_dict(adapters["adapters"])
            opt.load_state_dict("adapters", adapters)
        if self.rank < len(heads):
            mine = heads[self.rank]
            torch.set_rng_state(mine["rng"])
            if mine.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(mine["cuda_rng"])
            random.setstate(mine["python_rng"])
        else:
            seed = random.Random(f"{self.args.seed}:{head['step']}:{self.rank}").getrandbits(63)
            torch.manual_seed(seed)
            random.seed(seed)
        return head["step"], tuple(head["position"])


def export(args, model, margs, rank, world, lora, tok) -> None:
    """Stream the model out unit by unit through checkpoint.py's writers; only rank 0 writes. LoRA's adapters are
    merged into their weights (W + (alpha / r) B A): the export is a plain LLaMA. A write error (a full disk) on
    rank 0 stops the writing but not the gathering, so that no rank waits in a collective; then every rank exits
    with it, and the partial folder is removed."""
    names = list(param_shapes(margs))
    units = [[n for n in names if not n.startswith("layers.") and n != "tok_embeddings.weight"]]
    units = [["tok_embeddings.weight"]] + [[n for n in names if n.startswith(f"layers.{i}.")]
                                           for i in range(margs.n_layers)] + units
    writer = None
    if rank == 0:  # the tokenizer's files go beside the weights (not the demo's: it lived in a temporary folder)
        files = [f for f in tok.files if os.path.isfile(f)]
        writer = MetaWriter(args.export, margs, extra_files=files) if args.export_format == "meta" else HFWriter(
            args.export, margs, files, {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id})
    failure, nbytes = None, plan.sizes(margs)["total"] * (4 if args.dtype == "fp32" else 2)
    try:
        for tensors in shard.full_units(model, units):
            try:
                if writer and not failure:
                    writer.write(lora.merged(tensors) if lora is not None else tensors)
            except Exception as e:
                failure = write_failure(e, writer.tmp, sum(t.nbytes for t in tensors.values()))
                if failure is None:
                    raise
        try:
            if writer and not failure:
                writer.close()  # renames the finished folder into place
        except Exception as e:
            failure = write_failure(e, writer.tmp, nbytes)  # Meta's format merges the units into one file
            if failure is None:
                raise
    finally:
        if writer:
            shutil.rmtree(writer.tmp, ignore_errors=True)  # a partial folder; after close() there is none
    raise_together(failure and f"--export {args.export}: cannot write it ({failure}): the model needs about "
                   f"{nbytes:,} bytes ({size(nbytes)}), "
                   f"{shutil.disk_usage(Path(args.export).parent).free:,} bytes are free. The partial folder was "
                   "removed", world)
