"""Checkpoints of the LLaMA in model.py: Meta's format and Hugging Face's, in and out.

`open_checkpoint` reads Meta (params.json + consolidated.NN.pth) and Hugging Face (config.json +
*.safetensors / pytorch_model*.bin) folders through memory mapping, one tensor (or a row slice) at a time,
always under Meta's names and in Meta's layout. `MetaWriter` / `HFWriter` stream a model out one unit at a time,
into a temporary folder renamed when complete. `load_model` / `save_model` do a whole model at once.
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

from model import ModelArgs, Transformer, param_shapes


# Meta's model-parallel split (fairscale): ColumnParallelLinear splits dim 0, RowParallelLinear and
# ParallelEmbedding split dim 1, norms are replicated.
def _split_dim(name: str) -> Optional[int]:
    if name == "output.weight" or name.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight")):
        return 0
    if name == "tok_embeddings.weight" or name.endswith(("wo.weight", "w2.weight")):
        return 1
    return None


_HF_LAYER_NAMES = {  # Meta name inside a block -> Hugging Face name
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_HF_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_META_LAYER_NAMES = {hf: meta for meta, hf in _HF_LAYER_NAMES.items()}
_META_TOP_NAMES = {hf: meta for meta, hf in _HF_TOP_NAMES.items()}


def meta_to_hf_name(name: str) -> str:
    if name in _HF_TOP_NAMES:
        return _HF_TOP_NAMES[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name)
    return f"model.layers.{m[1]}.{_HF_LAYER_NAMES[m[2]]}.weight"


def hf_to_meta_name(name: str) -> str:
    """Unknown names come back unchanged, so that they are reported as unexpected keys."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
    if m and m[2] in _META_LAYER_NAMES:
        return f"layers.{m[1]}.{_META_LAYER_NAMES[m[2]]}.weight"
    return _META_TOP_NAMES.get(name, name)


def _rope_heads(name: str, args: ModelArgs) -> Optional[int]:
    """Heads of a weight whose rows HF permutes for its RoPE layout (wq: n_heads, wk: n_kv_heads), else None."""
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    return args.kv_heads if name.endswith("attention.wk.weight") else None


def permute_for_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's adjacent-pair RoPE layout -> HF's half-split layout, per head (HF convert_llama_weights_to_hf.py)."""
    d1, d2 = w.shape
    return w.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


def unpermute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    d1, d2 = w.shape
    return w.view(n_heads, 2, d1 // n_heads // 2, d2).transpose(1, 2).reshape(d1, d2)


def _check_shardable(args: ModelArgs, n: int, where: str) -> None:
    for what, size in (("dim", args.dim), ("n_heads", args.n_heads), ("n_kv_heads", args.kv_heads),
                       ("FFN width", args.hidden_dim), ("vocab_size", args.vocab_size)):
        if size % n:
            raise ValueError(f"{where}: {n} model-parallel shards cannot split {what}={size} evenly")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


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
            raise ValueError(f"checkpoint {self.path} does not match its config: missing keys {_listed(missing)}, "
                             f"unexpected keys {_listed(unexpected)}")
        wrong = [f"{n}: {tuple(self.shape(n))} in {self.where(n)}, config says {tuple(s)}"
                 for n, s in expected.items() if self.shape(n) != s]
        if wrong:
            raise ValueError(f"checkpoint {self.path}: tensor shapes do not match its config:\n  " + "\n  ".join(wrong[:12]))
        self._names = list(expected)

    def names(self) -> list[str]:
        """Meta key names, in model order (rope.freqs is left out)."""
        return list(self._names)


class MetaReader(CheckpointReader):
    """params.json + consolidated.00.pth .. consolidated.NN.pth (model-parallel shards, memory-mapped)."""
    _IGNORED_PARAMS = ("max_batch_size",)

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
            raise ValueError(f"{self.path}: shard files {gaps} are missing (found {len(numbered)} shards)")
        self.files = [numbered[i] for i in range(len(numbered))]
        self._shards = [torch.load(f, mmap=True, weights_only=True, map_location="cpu") for f in self.files]
        for sd in self._shards:
            sd.pop("rope.freqs", None)
        first = self._shards[0]
        for f, sd in zip(self.files[1:], self._shards[1:]):
            if set(sd) != set(first):
                raise ValueError(f"{f}: keys {sorted(set(sd) ^ set(first))} are not in both it and "
                                 f"{self.files[0].name}")
            if bad := [n for n in sd if sd[n].shape != first[n].shape]:
                raise ValueError(f"{f}: shapes of {bad} differ from those in {self.files[0].name}")
        self.args = self._read_params()
        self._validate(set(self._shards[0]))

    def _read_params(self) -> ModelArgs:
        file = self.path / "params.json"
        params = _read_json(file)
        fields = {f.name for f in dataclasses.fields(ModelArgs)} - {"ffn_hidden_dim"}
        unknown = sorted(set(params) - fields - set(self._IGNORED_PARAMS))
        if unknown:
            raise ValueError(f"{file}: fields {unknown} would change the model and are not supported here; "
                             f"known fields: {sorted(fields)}")
        kwargs = {k: v for k, v in params.items() if k in fields and v is not None}
        kwargs.setdefault("norm_eps", 1e-5)  # Meta's ModelArgs default when params.json leaves it out
        first = self._shards[0]
        if "tok_embeddings.weight" not in first:
            raise ValueError(f"{self.files[0]}: no tok_embeddings.weight; is this a LLaMA checkpoint?")
        rows, cols = first["tok_embeddings.weight"].shape
        if kwargs.get("vocab_size", -1) == -1:
            kwargs["vocab_size"] = rows  # LLaMA 1 and 2 say -1: the tokenizer decides
        elif kwargs["vocab_size"] != rows:
            raise ValueError(f"{file}: vocab_size {kwargs['vocab_size']} but tok_embeddings.weight in "
                             f"{self.files[0].name} has {rows} rows")
        try:
            args = ModelArgs(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{file}: {e}") from None
        n = len(self.files)
        if cols * n != args.dim:
            raise ValueError(f"{self.path}: found {n} shard file(s), but params.json has dim {args.dim} and "
                             f"{self.files[0].name} holds {cols} embedding columns, so {args.dim // cols} shards "
                             f"are expected; copy all consolidated.NN.pth files")
        _check_shardable(args, n, str(self.path))
        return args

    def where(self, name: str) -> str:
        n = len(self.files)
        return str(self.files[0]) if n == 1 else f"{self.path}/consolidated.*.pth ({n} shards)"

    def shape(self, name: str) -> torch.Size:
        shape = list(self._shards[0][name].shape)
        if (dim := _split_dim(name)) is not None:
            shape[dim] *= len(self.files)
        return torch.Size(shape)

    def read(self, name: str, rows: Optional[slice] = None) -> torch.Tensor:
        """One tensor (or rows[rows] of it), merged from the shards; a fresh tensor, not a view of the file."""
        start, stop = _row_range(rows, self.shape(name)[0])
        parts = [sd[name] for sd in self._shards]
        dim = _split_dim(name) if len(parts) > 1 else None
        if dim == 0:  # shard i holds rows [i*n, (i+1)*n)
            n = parts[0].shape[0]
            return torch.cat([p[max(start - i * n, 0):max(stop - i * n, 0)] for i, p in enumerate(parts)])
        if dim == 1:
            return torch.cat([p[start:stop] for p in parts], dim=1)
        return parts[0][start:stop].clone()


class HFReader(CheckpointReader):
    """config.json + *.safetensors (lazy safe_open) or pytorch_model*.bin (torch.load mmap)."""
    # config.json entries that would change the model, and the only value we implement
    _MUST = {"model_type": "llama", "hidden_act": "silu", "tie_word_embeddings": False, "rope_scaling": None,
             "attention_bias": False, "mlp_bias": False}

    def __init__(self, path):
        from safetensors import safe_open

        self.path = Path(path)
        self.args = self._read_config()
        files = sorted(self.path.glob("*.safetensors")) or sorted(self.path.glob("pytorch_model*.bin"))
        if not files:
            raise FileNotFoundError(f"{self.path}: config.json but no *.safetensors or pytorch_model*.bin weights")
        self._hf = {}  # Meta name -> (file, HF name, open handle)
        for f in files:
            if f.suffix == ".safetensors":
                handle = safe_open(f, framework="pt")
            else:
                handle = torch.load(f, mmap=True, weights_only=True, map_location="cpu")
            for hf_name in handle.keys():
                if not hf_name.endswith("rotary_emb.inv_freq"):  # a buffer older transformers saved
                    self._hf[hf_to_meta_name(hf_name)] = (f, hf_name, handle)
        self._validate(set(self._hf))

    def _read_config(self) -> ModelArgs:
        file = self.path / "config.json"
        cfg = _read_json(file)
        for key, value in self._MUST.items():
            if key in cfg and cfg[key] != value:
                raise ValueError(f"{file}: {key}={cfg[key]!r} changes the model and is not supported (need {value!r})")
        try:
            args = ModelArgs(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
                             n_heads=cfg["num_attention_heads"], n_kv_heads=cfg.get("num_key_value_heads"),
                             vocab_size=cfg["vocab_size"], ffn_hidden_dim=cfg["intermediate_size"],
                             norm_eps=cfg["rms_norm_eps"], rope_theta=cfg.get("rope_theta", 10000.0),
                             max_seq_len=cfg.get("max_position_embeddings", 2048))
        except KeyError as e:
            raise ValueError(f"{file}: missing field {e.args[0]!r}") from None
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None
        if cfg.get("head_dim", args.head_dim) != args.head_dim:
            raise ValueError(f"{file}: head_dim={cfg['head_dim']} is not hidden_size / num_attention_heads")
        if args.ffn_hidden_dim == dataclasses.replace(args, ffn_hidden_dim=None).hidden_dim:
            args = dataclasses.replace(args, ffn_hidden_dim=None)  # Meta's rule gives it: no override needed
        return args

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
        if _rope_heads(name, self.args) is None or start == stop:
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
        raise ValueError(f"the tokenizer has {vocab_size} tokens but the checkpoint's embedding "
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


class _Writer:
    """Writes into a temporary folder next to out_dir and renames it at close(), so that out_dir is either
    absent or complete. Use as a context manager: on an exception the temporary folder is removed."""

    def __init__(self, out_dir, args: ModelArgs):
        self.out_dir, self.args = Path(out_dir), args
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
        _refuse_non_empty(self.out_dir)
        if self.out_dir.exists():
            self.out_dir.rmdir()
        os.replace(self.tmp, self.out_dir)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        try:
            if exc_type is None:
                self.close()
        finally:  # after a successful close() the folder has been renamed, so this removes nothing
            shutil.rmtree(self.tmp, ignore_errors=True)


class MetaWriter(_Writer):
    """Meta's format: params.json + consolidated.NN.pth, split into n_shards as Meta's model-parallel code expects.
    Each unit goes to a temporary file; close() memory-maps them into the consolidated files."""

    def __init__(self, out_dir, args: ModelArgs, n_shards: int = 1):
        _check_shardable(args, n_shards, f"MetaWriter({out_dir})")
        self.n_shards = n_shards
        super().__init__(out_dir, args)

    def _write_unit(self, tensors):
        for k in range(self.n_shards):
            shard = {}
            for name, t in tensors.items():
                dim = _split_dim(name)
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
        (self.tmp / "params.json").write_text(json.dumps(meta_params(self.args), indent=2) + "\n")


def meta_params(args: ModelArgs) -> dict:
    """params.json content that Meta's reference ModelArgs(**params) accepts: optional fields only when used."""
    params = dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, vocab_size=args.vocab_size,
                  multiple_of=args.multiple_of, norm_eps=args.norm_eps)
    if args.n_kv_heads is not None:
        params["n_kv_heads"] = args.n_kv_heads
    if args.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = args.ffn_dim_multiplier
    if args.rope_theta != 10000.0:
        params["rope_theta"] = args.rope_theta
    if args.hidden_dim != dataclasses.replace(args, ffn_hidden_dim=None).hidden_dim:
        # params.json has no FFN width field, but Meta's rule rounds any width in (0, w] up to multiple_of=w
        base = int(2 * 4 * args.dim / 3)
        params["multiple_of"] = args.hidden_dim
        params.pop("ffn_dim_multiplier", None)
        if base > args.hidden_dim:
            params["ffn_dim_multiplier"] = args.hidden_dim / base
    return params


class HFWriter(_Writer):
    """Hugging Face LlamaForCausalLM format: one safetensors file per unit, index and config.json at close()."""

    def __init__(self, out_dir, args: ModelArgs):
        super().__init__(out_dir, args)
        self._weight_map, self._total_size, self._dtype = {}, 0, None

    def _write_unit(self, tensors):
        from safetensors.torch import save_file

        hf = {}
        for name, t in tensors.items():
            n_heads = _rope_heads(name, self.args)
            hf[meta_to_hf_name(name)] = t if n_heads is None else permute_for_hf(t, n_heads).contiguous()
            self._total_size += t.nbytes
            self._dtype = self._dtype or t.dtype
        file = f"model-{self._units + 1:05d}.safetensors"
        save_file(hf, self.tmp / file, metadata={"format": "pt"})
        self._weight_map.update(dict.fromkeys(hf, file))

    def _finish(self):
        index = {"metadata": {"total_size": self._total_size}, "weight_map": self._weight_map}
        (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (self.tmp / "config.json").write_text(json.dumps(hf_config(self.args, self._dtype), indent=2) + "\n")


def hf_config(args: ModelArgs, dtype: torch.dtype = torch.float32) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
            "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads,
            "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
            "max_position_embeddings": args.max_seq_len, "hidden_act": "silu", "tie_word_embeddings": False,
            "rope_scaling": None, "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": str(dtype).removeprefix("torch.")}


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
        writer.write({"norm.weight": model.norm.weight, "output.weight": model.output.weight})
