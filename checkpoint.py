"""Checkpoints of the LLaMA in model.py: Meta's format and Hugging Face's, in and out.

`open_checkpoint` reads Meta (params.json + consolidated.NN.pth) and Hugging Face (config.json +
*.safetensors / pytorch_model*.bin) folders through memory mapping, one tensor (or a row slice) at a time,
always under Meta's names and in Meta's layout. `MetaWriter` / `HFWriter` stream a model out one unit at a time,
into a temporary folder renamed when complete. `load_model` / `save_model` do a whole model at once.

What the formats are (config keys, tensor names, RoPE layout) is formats.py's; this file reads and writes them.
"""
import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from formats import (CheckpointError, check_shardable, hf_args, hf_config, hf_to_meta_name, meta_args,
                     meta_params, meta_to_hf_name, permute_for_hf, rope_heads, split_dim, unpermute_from_hf)
from model import ModelArgs, Transformer, param_shapes


# ------------------------------------------------------------------------------------------- readers

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _open_weights(file: Path):
    """A lazy handle on one weight file: safetensors' safe_open, or a memory-mapped torch.load dict."""
    from safetensors import safe_open

    try:
        if file.suffix == ".safetensors":
            return safe_open(file, framework="pt")
        return torch.load(file, mmap=True, weights_only=True, map_location="cpu")
    except Exception as e:  # safetensors: "incomplete metadata, file not fully covered"; torch: a zip error
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{file}: cannot read this weight file ({first_line}); it is truncated, damaged or "
                              f"not a weight file: copy or download it again") from None


def _listed(names: list[str], limit: int = 12) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{names[:limit]}{more}"


def _row_range(rows: Optional[slice], n: int) -> tuple[int, int]:
    if rows is None:
        return 0, n
    start, stop, step = rows.indices(n)
    if step != 1:
        raise ValueError(f"rows must be a contiguous slice, got {rows}")
    return start, max(start, stop)


class CheckpointReader:
    """Common part of MetaReader and HFReader: validates names and shapes against `args` on opening."""
    path: Path
    args: ModelArgs

    def _validate(self, names_in_files: set[str]) -> None:
        expected = param_shapes(self.args)
        missing = [n for n in expected if n not in names_in_files]
        unexpected = sorted(names_in_files - set(expected))
        if missing or unexpected:
            hint = "; if the output layer is the embedding, say tie_word_embeddings: true" \
                if missing == ["output.weight"] else ""
            raise CheckpointError(f"checkpoint {self.path} does not match its config: missing keys "
                                  f"{_listed(missing)}, unexpected keys {_listed(unexpected)}{hint}")
        wrong = [f"{n}: {tuple(self.shape(n))} in {self.where(n)}, config says {tuple(s)}"
                 for n, s in expected.items() if self.shape(n) != s]
        if wrong:
            raise CheckpointError(f"checkpoint {self.path}: tensor shapes do not match its config:\n  "
                                  + "\n  ".join(wrong[:12]))
        self._names = list(expected)

    def _equals_embedding(self, name: str) -> bool:
        """Whether tensor `name` equals tok_embeddings.weight: compared a block of rows at a time, the first
        row first, so that an untied model answers after reading one row."""
        if self.shape(name) != self.shape("tok_embeddings.weight"):
            return False
        rows = self.shape(name)[0]
        bounds = [0, 1, *range(4096, rows, 4096), rows]
        return all(torch.equal(self.read(name, slice(a, b)), self.read("tok_embeddings.weight", slice(a, b)))
                   for a, b in zip(bounds, bounds[1:]) if a < b)

    def names(self) -> list[str]:
        """Meta key names, in model order (rope.freqs is left out; so is output.weight when tied)."""
        return list(self._names)


class MetaReader(CheckpointReader):
    """params.json + consolidated.00.pth .. consolidated.NN.pth (model-parallel shards, memory-mapped).
    Tied (the Llama 3.2 1B / 3B layout): output.weight absent, or equal to tok_embeddings.weight. Meta's own
    code has no tying, so its files hold both."""

    def __init__(self, path):
        self.path = Path(path)
        numbered = {}
        for f in self.path.glob("consolidated.*.pth"):
            if m := re.fullmatch(r"consolidated\.(\d+)\.pth", f.name):
                numbered[int(m.group(1))] = f
        if not numbered:
            raise FileNotFoundError(f"{self.path}: no consolidated.00.pth (Meta checkpoint shards) next to params.json")
        gaps = [f"consolidated.{i:02d}.pth" for i in range(max(numbered) + 1) if i not in numbered]
        if gaps:
            raise CheckpointError(f"{self.path}: shard files {gaps} are missing (found {len(numbered)} shards)")
        self.files = [numbered[i] for i in range(len(numbered))]
        self._shards = [_open_weights(f) for f in self.files]
        for sd in self._shards:
            sd.pop("rope.freqs", None)
        first = self._shards[0]
        for f, sd in zip(self.files[1:], self._shards[1:]):
            if set(sd) != set(first):
                raise CheckpointError(f"{f}: keys {sorted(set(sd) ^ set(first))} are not in both it and "
                                      f"{self.files[0].name}")
            if bad := [n for n in sd if sd[n].shape != first[n].shape]:
                raise CheckpointError(f"{f}: shapes of {bad} differ from those in {self.files[0].name}")
        self.args = self._read_params()
        tied = "output.weight" not in first or self._equals_embedding("output.weight")
        self.args = dataclasses.replace(self.args, tie_embeddings=tied)
        self._validate(set(first) - ({"output.weight"} if tied else set()))

    def _read_params(self) -> ModelArgs:
        file, first, n = self.path / "params.json", self._shards[0], len(self.files)
        if "tok_embeddings.weight" not in first:
            raise CheckpointError(f"{self.files[0]}: no tok_embeddings.weight; is this a LLaMA checkpoint?")
        rows, cols = first["tok_embeddings.weight"].shape
        params = _read_json(file)
        # shards of the embedding: by columns (LLaMA 1/2), or by rows (Llama 3), which leaves every column whole
        self._embedding_split = 0 if n > 1 and cols == params.get("dim") else 1
        vocab = rows * n if self._embedding_split == 0 else rows
        if params.get("vocab_size", -1) not in (-1, vocab):
            raise CheckpointError(f"{file}: vocab_size {params['vocab_size']} but tok_embeddings.weight in "
                                  f"{self.files[0].name} has {vocab} rows")
        args = meta_args(params, file, vocab)
        if self._embedding_split == 1 and cols * n != args.dim:
            raise CheckpointError(f"{self.path}: found {n} shard file(s), but params.json has dim {args.dim} and "
                                  f"{self.files[0].name} holds {cols} embedding columns, so {args.dim // cols} "
                                  f"shards are expected; copy all consolidated.NN.pth files")
        check_shardable(args, n, str(self.path))
        return args

    def where(self, name: str) -> str:
        n = len(self.files)
        return str(self.files[0]) if n == 1 else f"{self.path}/consolidated.*.pth ({n} shards)"

    def shape(self, name: str) -> torch.Size:
        shape = list(self._shards[0][name].shape)
        if (dim := split_dim(name, self._embedding_split)) is not None:
            shape[dim] *= len(self.files)
        return torch.Size(shape)

    def read(self, name: str, rows: Optional[slice] = None) -> torch.Tensor:
        """One tensor (or rows[rows] of it), merged from the shards; a fresh tensor, not a view of the file."""
        start, stop = _row_range(rows, self.shape(name)[0])
        parts = [sd[name] for sd in self._shards]
        dim = split_dim(name, self._embedding_split) if len(parts) > 1 else None
        if dim == 0:  # shard i holds rows [i*n, (i+1)*n)
            n = parts[0].shape[0]
            return torch.cat([p[max(start - i * n, 0):max(stop - i * n, 0)] for i, p in enumerate(parts)])
        if dim == 1:
            return torch.cat([p[start:stop] for p in parts], dim=1)
        return parts[0][start:stop].clone()


class HFReader(CheckpointReader):
    """config.json + *.safetensors (lazy safe_open) or pytorch_model*.bin (torch.load mmap). Tied
    (tie_word_embeddings: true): no lm_head.weight, or one equal to the embedding."""

    def __init__(self, path):
        self.path = Path(path)
        self.args = hf_args(_read_json(self.path / "config.json"), self.path / "config.json")
        files = sorted(self.path.glob("*.safetensors")) or sorted(self.path.glob("pytorch_model*.bin"))
        if not files:
            raise FileNotFoundError(f"{self.path}: config.json but no *.safetensors or pytorch_model*.bin weights")
        self._hf = {}  # Meta name -> (file, HF name, open handle)
        for f in files:
            handle = _open_weights(f)
            for hf_name in handle.keys():
                if not hf_name.endswith("rotary_emb.inv_freq"):  # a buffer older transformers saved
                    self._hf[hf_to_meta_name(hf_name)] = (f, hf_name, handle)
        if self.args.tie_embeddings and "output.weight" in self._hf:
            if not self._equals_embedding("output.weight"):
                raise CheckpointError(f"{self.path}: config.json says tie_word_embeddings: true, but lm_head.weight "
                                      f"differs from model.embed_tokens.weight; set it to false to keep both")
            del self._hf["output.weight"]
        self._validate(set(self._hf))

    def where(self, name: str) -> str:
        return str(self._hf[name][0])

    def shape(self, name: str) -> torch.Size:
        _, hf_name, handle = self._hf[name]
        if isinstance(handle, dict):
            return handle[hf_name].shape
        return torch.Size(handle.get_slice(hf_name).get_shape())

    def _read_rows(self, name, start, stop):
        _, hf_name, handle = self._hf[name]
        if isinstance(handle, dict):
            return handle[hf_name][start:stop].clone()
        return handle.get_slice(hf_name)[start:stop]

    def read(self, name: str, rows: Optional[slice] = None) -> torch.Tensor:
        """One tensor (or rows[rows] of it) in Meta's layout: wq / wk are un-permuted head by head."""
        start, stop = _row_range(rows, self.shape(name)[0])
        if rope_heads(name, self.args) is None or start == stop:
            return self._read_rows(name, start, stop)
        hd = self.args.head_dim  # HF permutes within a head: read whole heads, un-permute, cut
        first, last = start // hd, -(-stop // hd)
        w = unpermute_from_hf(self._read_rows(name, first * hd, last * hd), last - first)
        return w[start - first * hd:stop - first * hd]


def open_checkpoint(path) -> CheckpointReader:
    """A reader for a Meta (params.json) or Hugging Face (config.json) checkpoint folder."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    if (path / "params.json").exists():
        return MetaReader(path)
    if (path / "config.json").exists():
        return HFReader(path)
    found = sorted(p.name for p in path.iterdir())[:8]
    raise FileNotFoundError(f"{path}: neither params.json (Meta format) nor config.json (Hugging Face format) "
                            f"found (folder holds {found}); copy the config file that came with the weights")


def load_model(path, dtype=torch.float32, device="cpu", checkpointing: bool = False,
               vocab_size: Optional[int] = None) -> Transformer:
    """Build on 'meta', then fill tensor by tensor from the checkpoint in `path` (Meta or HF format).
    vocab_size: the tokenizer's n_words; it must equal the embedding's rows."""
    reader = open_checkpoint(path)
    if vocab_size is not None and vocab_size != reader.args.vocab_size:
        raise CheckpointError(f"the tokenizer has {vocab_size} tokens but the checkpoint's embedding "
                              f"({reader.where('tok_embeddings.weight')}) has {reader.args.vocab_size} rows: "
                              f"use the tokenizer that came with this checkpoint")
    with torch.device("meta"):
        model = Transformer(reader.args, checkpointing)
    for name in reader.names():
        module_name, _, attr = name.rpartition(".")
        tensor = reader.read(name).to(device=device, dtype=dtype)
        setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor))
    return model


# ------------------------------------------------------------------------------------------- writers

def _owned_cpu(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor that owns exactly its storage (torch.save of a view would save the whole storage)."""
    t = t.detach().to("cpu").contiguous()
    return t if t.untyped_storage().nbytes() == t.nbytes else t.clone()


def _refuse_non_empty(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not empty: choose a new output folder")


def fsync_path(path) -> None:
    """Make a file's bytes, or a folder's names (a rename, a new file), durable on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Writer:
    """Writes into a temporary folder next to out_dir and renames it at close(), so that out_dir is either
    absent or complete, even after a power loss: every file is fsynced before the rename. Use as a context
    manager: on an exception the temporary folder is removed."""

    def __init__(self, out_dir, args: ModelArgs, extra_files=()):
        self.out_dir, self.args, self.extra_files = Path(out_dir), args, list(extra_files)
        _refuse_non_empty(self.out_dir)
        self.tmp = self.out_dir.parent / f".{self.out_dir.name}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self._expected, self._written, self._units = param_shapes(args), set(), 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """One unit (e.g. one block) of tensors, with Meta's names and layout."""
        for name, t in tensors.items():
            if name not in self._expected or name in self._written:
                problem = "it was written before" if name in self._written else "unknown key"
                raise ValueError(f"cannot write {name!r}: {problem}")
            if t.shape != self._expected[name]:
                raise ValueError(f"{name}: shape {tuple(t.shape)}, the model args need {tuple(self._expected[name])}")
        self._write_unit({name: _owned_cpu(t) for name, t in tensors.items()})
        self._written.update(tensors)
        self._units += 1

    def close(self) -> None:
        missing = [n for n in self._expected if n not in self._written]
        if missing:
            raise ValueError(f"{self.out_dir}: not written, tensors missing: {_listed(missing)}")
        self._finish()
        for file in self.extra_files:  # e.g. the tokenizer's files, so that the folder is complete
            shutil.copy(file, self.tmp / Path(file).name)
        for file in [*self.tmp.iterdir(), self.tmp]:
            fsync_path(file)
        _refuse_non_empty(self.out_dir)
        if self.out_dir.exists():
            self.out_dir.rmdir()
        os.replace(self.tmp, self.out_dir)
        fsync_path(self.out_dir.parent)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        try:
            if exc_type is None:
                self.close()
        finally:  # after a successful close() the folder has been renamed, so this removes nothing
            shutil.rmtree(self.tmp, ignore_errors=True)


class MetaWriter(_Writer):
    """Meta's format: params.json + consolidated.NN.pth, split into n_shards as LLaMA 1/2's model-parallel code
    expects (the embedding by columns). Each unit goes to a temporary file; close() memory-maps them into the
    consolidated files. A tied model is written as Meta's Llama 3.2 files are: output.weight holds a copy of the
    embedding, since Meta's code loads it (strictly) into an output layer of its own."""

    def __init__(self, out_dir, args: ModelArgs, n_shards: int = 1, extra_files=()):
        check_shardable(args, n_shards, f"MetaWriter({out_dir})")
        self.n_shards, self.params = n_shards, meta_params(args)
        super().__init__(out_dir, args, extra_files)

    def _write_unit(self, tensors):
        if self.args.tie_embeddings and "tok_embeddings.weight" in tensors:
            tensors = {**tensors, "output.weight": tensors["tok_embeddings.weight"]}
        for k in range(self.n_shards):
            shard = {}
            for name, t in tensors.items():
                dim = split_dim(name)
                shard[name] = t if dim is None or self.n_shards == 1 else _owned_cpu(t.chunk(self.n_shards, dim)[k])
            torch.save(shard, self.tmp / f"unit{self._units:05d}.{k:02d}.pth")

    def _finish(self):
        for k in range(self.n_shards):
            parts = sorted(self.tmp.glob(f"unit*.{k:02d}.pth"))
            merged = {}
            for part in parts:
                merged.update(torch.load(part, mmap=True, weights_only=True))
            torch.save(merged, self.tmp / f"consolidated.{k:02d}.pth")
            del merged
            for part in parts:
                part.unlink()
        (self.tmp / "params.json").write_text(json.dumps(self.params, indent=2) + "\n")


class HFWriter(_Writer):
    """Hugging Face LlamaForCausalLM format: one safetensors file per unit, index and config.json at close().
    A tied model has no lm_head.weight, as transformers saves it."""

    def __init__(self, out_dir, args: ModelArgs, extra_files=(), token_ids=None):
        super().__init__(out_dir, args, extra_files)
        self._weight_map, self._total_size, self._dtype = {}, 0, None
        self.token_ids = token_ids or {}  # {"bos_token_id": ..., "eos_token_id": ...}: the tokenizer's

    def _write_unit(self, tensors):
        from safetensors.torch import save_file

        hf = {}
        for name, t in tensors.items():
            n_heads = rope_heads(name, self.args)
            hf[meta_to_hf_name(name)] = t if n_heads is None else permute_for_hf(t, n_heads).contiguous()
            self._total_size += t.nbytes
            self._dtype = self._dtype or t.dtype
        file = f"model-{self._units + 1:05d}.safetensors"
        save_file(hf, self.tmp / file, metadata={"format": "pt"})
        self._weight_map.update(dict.fromkeys(hf, file))

    def _finish(self):
        index = {"metadata": {"total_size": self._total_size}, "weight_map": self._weight_map}
        (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config = {**hf_config(self.args, str(self._dtype).removeprefix("torch.")), **self.token_ids}
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def save_model(model: Transformer, out_dir, format: str = "meta", n_shards: int = 1) -> None:
    """Stream `model` block by block into out_dir, in Meta's format (n_shards model-parallel files) or HF's."""
    if format == "meta":
        writer = MetaWriter(out_dir, model.args, n_shards)
    elif format == "hf":
        writer = HFWriter(out_dir, model.args)
    else:
        raise ValueError(f"format must be 'meta' or 'hf', got {format!r}")
    with writer:
        writer.write({"tok_embeddings.weight": model.tok_embeddings.weight})
        for i, layer in enumerate(model.layers):
            writer.write({f"layers.{i}.{name}": t for name, t in layer.state_dict().items()})
        writer.write({n: p for n, p in model.named_parameters() if not n.startswith(("layers.", "tok_embeddings."))})
