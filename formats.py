"""The two checkpoint formats, Meta's and Hugging Face's, against model.py: what their config files mean, how their
tensors are named and laid out. No file is read or written here (checkpoint.py does that).

Config files (params.json, config.json) <-> ModelArgs: read exactly, or refused.
Every key of these files is read, or is on a list of keys that do not change what the model computes (token ids,
dtype, cache flags, ...), or is an error that names it: a config that asks for something model.py does not compute
(another RoPE type, biases, another activation, dropout) is refused, never replaced by a default. Keys that are
absent mean what they mean to the file's own reader: Meta's reference ModelArgs, transformers' LlamaConfig.
"""
import dataclasses
import re
from typing import Optional

import torch

from model import MODEL_NAMES, ModelArgs, RopeScaling


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read as it is: the message names the file and the field."""


# ------------------------------------------------------------------------------------- tensor names and layouts

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


def split_dim(name: str, embedding_dim: int = 1) -> Optional[int]:
    """The dim that Meta's model-parallel code (fairscale) splits: ColumnParallelLinear dim 0, RowParallelLinear
    dim 1; the embedding dim 1 (LLaMA 1/2's ParallelEmbedding) or 0 (Llama 3's VocabParallelEmbedding)."""
    if name == "output.weight" or name.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight")):
        return 0
    if name.endswith(("wo.weight", "w2.weight")):
        return 1
    return embedding_dim if name == "tok_embeddings.weight" else None


def rope_heads(name: str, args: ModelArgs) -> Optional[int]:
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


def check_shardable(args: ModelArgs, n: int, where: str) -> None:
    """Meta's n-way model-parallel files need every split width divisible by n."""
    for what, size in (("dim", args.dim), ("n_heads", args.n_heads), ("n_kv_heads", args.kv_heads),
                       ("FFN width", args.hidden_dim), ("vocab_size", args.vocab_size)):
        if size % n:
            raise CheckpointError(f"{where}: {n} model-parallel shards cannot split {what}={size} evenly")


# ------------------------------------------------------------------------------------------- config files

_META_READ = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
              "norm_eps", "rope_theta", "max_seq_len", "use_scaled_rope")
_META_IGNORED = ("max_batch_size",)  # params.json keys that do not change the computation
_HF_READ = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings",
            "head_dim", "tie_word_embeddings")
_HF_FIXED = {"model_type": "llama", "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
             "attention_dropout": 0.0, "rope_interleaved": False}  # keys with the one value implemented here
_HF_IGNORED = ("architectures", "transformers_version", "torch_dtype", "dtype", "use_cache", "initializer_range",
               "bos_token_id", "eos_token_id", "pad_token_id", "_name_or_path", "max_sequence_length",
               "pretraining_tp", "is_llama_config", "output_attentions", "output_hidden_states", "return_dict",
               "tokenizer_class", "transformers.js_config")


def _model_args(file, **kwargs) -> ModelArgs:
    try:
        return ModelArgs(**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: {e}") from None


def _unknown_keys(config: dict, file, *known) -> None:
    unknown = sorted(set(config).difference(*known))
    if unknown:
        raise CheckpointError(f"{file}: {unknown} would change the model and are not implemented here (LLaMA "
                              f"models only: see the README's supported checkpoints)")


def meta_args(params: dict, file, embedding_rows: int) -> ModelArgs:
    """ModelArgs from Meta's params.json (without tying, which the tensors decide). Absent optional keys take the
    defaults of Meta's LLaMA 1/2 reference ModelArgs (rope_theta 10000: every Llama 3 params.json gives its own);
    vocab_size -1 (LLaMA 1/2) means the embedding's rows."""
    _unknown_keys(params, file, _META_READ, _META_IGNORED)
    if missing := [k for k in ("dim", "n_layers", "n_heads") if params.get(k) is None]:
        raise CheckpointError(f"{file}: missing fields {missing}")
    kwargs = {k: v for k, v in params.items() if k in _META_READ and v is not None}
    kwargs.setdefault("norm_eps", 1e-5)
    if kwargs.get("vocab_size", -1) == -1:
        kwargs["vocab_size"] = embedding_rows
    scaled = kwargs.pop("use_scaled_rope", False)
    args = _model_args(file, **kwargs)
    preset = _meta_preset(args, scaled)
    if scaled and preset is None:
        raise CheckpointError(f"{file}: use_scaled_rope is true, but no Llama 3.1 / 3.2 preset has this shape, so "
                              f"the scaling factor is unknown (8 for Llama 3.1, 32 for 3.2 1B / 3B); convert the "
                              f"checkpoint to the HF format with its rope_scaling written out")
    if preset is not None:  # params.json has no context length: the release's; and its scaling factor
        args = dataclasses.replace(args, rope_scaling=preset.rope_scaling,
                                   max_seq_len=params.get("max_seq_len", preset.max_seq_len))
    return args


def _meta_preset(args: ModelArgs, scaled: bool) -> Optional[ModelArgs]:
    """The preset whose shape equals args' (RoPE scaling, tying and context length aside), scaled or not."""
    def shape(a):
        return {k: v for k, v in a.architecture().items() if k not in ("rope_scaling", "tie_embeddings")}
    presets = [ModelArgs.from_name(name) for name in MODEL_NAMES]
    return next((p for p in presets if shape(p) == shape(args) and (p.rope_scaling is not None) == scaled), None)


def meta_params(args: ModelArgs) -> dict:
    """params.json content that Meta's reference ModelArgs(**params) accepts: optional fields only when used.
    Refuses what params.json cannot say: an explicit head_dim, a RoPE scaling other than its preset's."""
    if args.explicit_head_dim is not None:
        raise CheckpointError(f"Meta's params.json cannot hold head_dim={args.head_dim} (not dim / n_heads): "
                              f"use the HF format (--export-format hf)")
    preset = _meta_preset(args, scaled=True)
    if args.rope_scaling is not None and (preset is None or preset.rope_scaling != args.rope_scaling):
        raise CheckpointError(f"Meta's params.json says only use_scaled_rope, and no preset of this shape has "
                              f"{args.rope_scaling}: use the HF format (--export-format hf)")
    params = dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, vocab_size=args.vocab_size,
                  multiple_of=args.multiple_of, norm_eps=args.norm_eps)
    if args.n_kv_heads is not None:
        params["n_kv_heads"] = args.n_kv_heads
    if args.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = args.ffn_dim_multiplier
    if args.rope_theta != 10000.0:
        params["rope_theta"] = args.rope_theta
    if args.rope_scaling is not None:
        params["use_scaled_rope"] = True
    if args.hidden_dim != dataclasses.replace(args, ffn_hidden_dim=None).hidden_dim:
        # params.json has no FFN width field, but Meta's rule rounds any width in (0, w] up to multiple_of=w
        base = int(2 * 4 * args.dim / 3)
        params["multiple_of"] = args.hidden_dim
        params.pop("ffn_dim_multiplier", None)
        if base > args.hidden_dim:
            params["ffn_dim_multiplier"] = args.hidden_dim / base
    return params


def hf_args(cfg: dict, file) -> ModelArgs:
    """ModelArgs from a Hugging Face config.json (transformers 4 or 5 layout). Absent keys mean what they mean to
    transformers' LlamaConfig (rope_theta 10000, rms_norm_eps 1e-6, untied, ...)."""
    _unknown_keys(cfg, file, _HF_READ, _HF_FIXED, _HF_IGNORED)
    if "model_type" not in cfg:
        raise CheckpointError(f"{file}: no model_type; this reads LLaMA models (model_type \"llama\") only")
    for key, value in _HF_FIXED.items():
        if key in cfg and cfg[key] != value:
            raise CheckpointError(f"{file}: {key}={cfg[key]!r} changes the model and is not implemented "
                                  f"(only {value!r} is)")
    try:
        dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        shape = dict(dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads, vocab_size=cfg["vocab_size"],
                     ffn_hidden_dim=cfg["intermediate_size"])
    except KeyError as e:
        raise CheckpointError(f"{file}: missing field {e.args[0]!r}") from None
    head_dim = cfg.get("head_dim")
    tie = cfg.get("tie_word_embeddings", False)
    if tie not in (True, False):
        raise CheckpointError(f"{file}: tie_word_embeddings must be true or false, not {tie!r}")
    max_seq_len = cfg.get("max_position_embeddings", 2048)
    theta, scaling = _hf_rope(cfg, file, max_seq_len)
    args = _model_args(file, **shape, n_kv_heads=cfg.get("num_key_value_heads"),
                       norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
                       max_seq_len=max_seq_len, tie_embeddings=tie,
                       explicit_head_dim=None if head_dim in (None, dim // n_heads) else head_dim)
    if args.ffn_hidden_dim == dataclasses.replace(args, ffn_hidden_dim=None).hidden_dim:
        args = dataclasses.replace(args, ffn_hidden_dim=None)  # Meta's rule gives it: no override needed
    return args


def _hf_rope(cfg: dict, file, max_seq_len: int) -> tuple[float, Optional[RopeScaling]]:
    """(rope_theta, scaling) from the top-level rope_theta (transformers 4), rope_scaling (4) and rope_parameters
    (5, which also holds rope_theta). A key given twice with two values is an error."""
    values, origin = {}, {}
    top = {"rope_theta": cfg["rope_theta"]} if cfg.get("rope_theta") is not None else {}
    for where, part in (("rope_theta", top), ("rope_scaling", cfg.get("rope_scaling") or {}),
                        ("rope_parameters", cfg.get("rope_parameters") or {})):
        if not isinstance(part, dict):
            raise CheckpointError(f"{file}: {where} must be an object or null, not {part!r}")
        for key, value in part.items():
            if key in values and values[key] != value:
                raise CheckpointError(f"{file}: {key} is {values[key]!r} in {origin[key]} but {value!r} in {where}")
            values[key], origin[key] = value, where
    types = {values.pop(k) for k in ("rope_type", "type") if k in values}
    if len(types) > 1:
        raise CheckpointError(f"{file}: rope_type and type disagree: {sorted(types)}")
    rope_type = types.pop() if types else "default"
    theta = float(values.pop("rope_theta", 10000.0))
    if values.pop("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(f"{file}: partial_rotary_factor != 1 (rotating part of each head) is not implemented")
    scaling = None
    if rope_type == "llama3":
        try:
            scaling = RopeScaling(float(values.pop("factor")), float(values.pop("low_freq_factor")),
                                  float(values.pop("high_freq_factor")),
                                  int(values.pop("original_max_position_embeddings", max_seq_len)))
        except KeyError as e:
            raise CheckpointError(f"{file}: rope type llama3 needs {e.args[0]!r}") from None
    elif rope_type != "default":
        raise CheckpointError(f"{file}: rope type {rope_type!r} is not implemented (only 'default' and 'llama3')")
    if values:
        raise CheckpointError(f"{file}: RoPE keys {sorted(values)} are not implemented for rope type {rope_type!r}")
    return theta, scaling


def hf_config(args: ModelArgs, torch_dtype: str = "float32") -> dict:
    """config.json in the layout that transformers 4 and 5 both read (top-level rope_theta and rope_scaling:
    transformers 4 would ignore a rope_parameters object)."""
    s = args.rope_scaling
    scaling = None if s is None else {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                                      "high_freq_factor": s.high_freq_factor,
                                      "original_max_position_embeddings": s.original_max_seq_len}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
            "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads, "head_dim": args.head_dim,
            "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
            "rope_scaling": scaling, "max_position_embeddings": args.max_seq_len, "hidden_act": "silu",
            "tie_word_embeddings": args.tie_embeddings, "attention_bias": False, "mlp_bias": False,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": torch_dtype}
