"""checkpoint.py against checkpoint fixtures laid out here the way Meta's model-parallel code and HF's
convert_llama_weights_to_hf.py lay them out."""
import dataclasses
import json
import os

import pytest
import torch

import checkpoint as C
import formats
from model import ModelArgs, RopeScaling, param_shapes
from test_model import assert_same_state, random_model, tiny

# --------------------------------------------------------------------- checkpoint fixtures, written here

SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,  # fairscale ColumnParallelLinear
             "wo": 1, "w2": 1, "tok_embeddings": 1}                      # RowParallelLinear, ParallelEmbedding


def write_meta_fixture(folder, model, n_shards, vocab_size=-1, embedding_split=1, output=None, **extra_params):
    """Meta's files of `model`. embedding_split 0: Llama 3's VocabParallelEmbedding. output: an output.weight to
    write (a tied model has none of its own)."""
    a = model.args
    folder.mkdir()
    params = dict(dim=a.dim, multiple_of=a.multiple_of, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                  n_layers=a.n_layers, norm_eps=a.norm_eps, vocab_size=vocab_size, **extra_params)
    (folder / "params.json").write_text(json.dumps(params))
    state = model.state_dict() if output is None else {**model.state_dict(), "output.weight": output}
    for k in range(n_shards):
        shard = {"rope.freqs": torch.ones(a.head_dim // 2)}
        for name, t in state.items():
            dim = embedding_split if name == "tok_embeddings.weight" else SPLIT_DIM.get(name.split(".")[-2])
            shard[name] = t.clone() if dim is None else t.chunk(n_shards, dim)[k].clone()
        torch.save(shard, folder / f"consolidated.{k:02d}.pth")
    return folder


def hf_permute(w, n_heads, dim1, dim2):  # from HF's convert_llama_weights_to_hf.py
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def hf_state(model):
    a, out = model.args, {}
    for name, t in model.state_dict().items():
        parts = name.split(".")
        if name == "tok_embeddings.weight":
            out["model.embed_tokens.weight"] = t
        elif name == "norm.weight":
            out["model.norm.weight"] = t
        elif name == "output.weight":
            out["lm_head.weight"] = t
        else:
            i, module = parts[1], ".".join(parts[2:-1])
            hf = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                  "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                  "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
                  "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
                  "ffn_norm": "post_attention_layernorm"}[module]
            if module == "attention.wq":
                t = hf_permute(t, a.n_heads, a.dim, a.dim)
            if module == "attention.wk":
                t = hf_permute(t, a.kv_heads, a.kv_heads * a.head_dim, a.dim)
            out[f"model.layers.{i}.{hf}.weight"] = t.contiguous()
    return out


def write_hf_bin_fixture(folder, model):
    a = model.args
    folder.mkdir()
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=a.dim,
                  intermediate_size=a.hidden_dim, num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads,
                  num_key_value_heads=a.kv_heads, vocab_size=a.vocab_size, rms_norm_eps=a.norm_eps,
                  max_position_embeddings=a.max_seq_len, hidden_act="silu", tie_word_embeddings=False)
    (folder / "config.json").write_text(json.dumps(config))
    state = hf_state(model)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(a.head_dim // 2)  # old HF buffer
    names = list(state)
    torch.save({n: state[n] for n in names[:9]}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({n: state[n] for n in names[9:]}, folder / "pytorch_model-00002-of-00002.bin")
    return folder


def test_meta_two_shards_load_like_unsplit(tmp_path):
    model = random_model()
    one = C.load_model(write_meta_fixture(tmp_path / "mp1", model, 1))
    two = C.load_model(write_meta_fixture(tmp_path / "mp2", model, 2))
    assert one.args.architecture() == model.args.architecture()  # vocab_size -1 taken from the embedding rows
    assert_same_state(one, model)
    assert_same_state(two, model)
    reader = C.open_checkpoint(tmp_path / "mp2")
    assert reader.names() == list(model.state_dict())
    for name, rows in [("output.weight", slice(200, 300)), ("layers.1.attention.wk.weight", slice(5, 27)),
                       ("tok_embeddings.weight", slice(10, 20)), ("layers.0.feed_forward.w2.weight", None),
                       ("norm.weight", slice(3, 9))]:  # slices across the shard boundary, on both split dims
        full = model.state_dict()[name]
        assert torch.equal(reader.read(name, rows), full if rows is None else full[rows]), name


def test_hf_layout_round_trip_is_exact(tmp_path):
    model = random_model()
    loaded = C.load_model(write_hf_bin_fixture(tmp_path / "hf", model))  # Meta -> HF (permuted) -> Meta
    assert_same_state(loaded, model)
    reader = C.open_checkpoint(tmp_path / "hf")
    for name in ("layers.0.attention.wq.weight", "layers.1.attention.wk.weight"):  # rows cut inside a head
        assert torch.equal(reader.read(name, slice(5, 27)), model.state_dict()[name][5:27])


@pytest.mark.parametrize("fmt", ["meta", "hf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_then_load_is_bit_exact(tmp_path, fmt, dtype):
    model = random_model().to(dtype)
    C.save_model(model, tmp_path / "out", format=fmt)
    loaded = C.load_model(tmp_path / "out", dtype=dtype)
    assert loaded.args.architecture() == model.args.architecture()
    assert_same_state(loaded, model)
    tokens = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


def test_written_files_follow_meta_and_hf_layouts(tmp_path):
    from safetensors.torch import load_file

    model = random_model()
    a, state = model.args, model.state_dict()
    C.save_model(model, tmp_path / "meta", format="meta", n_shards=2)
    llama2_model_args = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                         "ffn_dim_multiplier", "norm_eps", "max_batch_size", "max_seq_len"}
    assert set(json.loads((tmp_path / "meta" / "params.json").read_text())) <= llama2_model_args
    for k in range(2):
        shard = torch.load(tmp_path / "meta" / f"consolidated.{k:02d}.pth", weights_only=True)
        assert list(shard) == list(state)
        for name, t in state.items():
            dim = SPLIT_DIM.get(name.split(".")[-2])
            assert torch.equal(shard[name], t if dim is None else t.chunk(2, dim)[k]), name
    assert_same_state(C.load_model(tmp_path / "meta"), model)

    C.save_model(model, tmp_path / "hf", format="hf")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    written = {}
    for file in set(index["weight_map"].values()):
        written.update(load_file(tmp_path / "hf" / file))
    expected = hf_state(model)
    assert sorted(written) == sorted(expected) == sorted(index["weight_map"])
    for name in expected:
        assert torch.equal(written[name], expected[name]), name
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["num_key_value_heads"], config["intermediate_size"]) == (a.kv_heads, a.hidden_dim)


def test_hf_intermediate_size_survives_both_formats(tmp_path):
    model = random_model(tiny(ffn_hidden_dim=160))  # not reachable by Meta's rule with multiple_of=32
    C.save_model(model, tmp_path / "hf", format="hf")
    from_hf = C.load_model(tmp_path / "hf")
    assert from_hf.args.hidden_dim == 160
    C.save_model(from_hf, tmp_path / "meta", format="meta")
    from_meta = C.load_model(tmp_path / "meta")
    assert from_meta.args.hidden_dim == 160
    assert_same_state(from_meta, model)


# ---------------------------------------------------------------------------------------------- bad input

def test_missing_config_files(tmp_path):
    folder = write_meta_fixture(tmp_path / "meta", random_model(), 1)
    (folder / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match="params.json"):
        C.load_model(folder)
    C.save_model(random_model(), tmp_path / "hf", format="hf")
    (tmp_path / "hf" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        C.load_model(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        C.load_model(tmp_path / "nowhere")


def test_shard_count_must_match_files(tmp_path):
    folder = write_meta_fixture(tmp_path / "a", random_model(), 2)
    (folder / "consolidated.01.pth").unlink()
    with pytest.raises(ValueError, match="1 shard file.*2 shards are expected"):
        C.load_model(folder)
    folder = write_meta_fixture(tmp_path / "b", random_model(), 2)
    (folder / "consolidated.01.pth").rename(folder / "consolidated.02.pth")
    with pytest.raises(ValueError, match="consolidated.01.pth"):
        C.load_model(folder)
    with pytest.raises(ValueError, match="3 model-parallel shards cannot split"):
        C.MetaWriter(tmp_path / "c", tiny(), n_shards=3)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    model = random_model()
    folder = write_meta_fixture(tmp_path / "m", model, 1)
    shard = torch.load(folder / "consolidated.00.pth")
    del shard["layers.1.ffn_norm.weight"]
    shard["layers.1.attention.bias"] = torch.zeros(3)
    torch.save(shard, folder / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"missing keys \['layers.1.ffn_norm.weight'\], unexpected keys "
                                         r"\['layers.1.attention.bias'\]"):
        C.load_model(folder)


def test_shape_that_does_not_match_config_names_file(tmp_path):
    model = random_model()
    folder = write_meta_fixture(tmp_path / "m", model, 1)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "multiple_of": 128}))  # FFN 256, files 192
    with pytest.raises(ValueError, match=r"layers.0.feed_forward.w1.weight: \(192, 64\) in .*consolidated.00.pth"
                                         r", config says \(256, 64\)"):
        C.load_model(folder)


def test_tokenizer_vocab_must_match_embedding(tmp_path):
    folder = write_meta_fixture(tmp_path / "m", random_model(), 1)
    with pytest.raises(ValueError, match="tokenizer has 32000 tokens.*has 512 rows"):
        C.load_model(folder, vocab_size=32000)
    assert C.load_model(folder, vocab_size=512).args.vocab_size == 512


def test_config_fields_that_change_the_model_are_errors(tmp_path):
    folder = write_meta_fixture(tmp_path / "m", random_model(), 1, use_scaled_rope=True)
    with pytest.raises(C.CheckpointError, match=r"params.json: use_scaled_rope is true, but no Llama 3.1 / 3.2 "
                                                r"preset has this shape"):
        C.load_model(folder)
    folder = write_meta_fixture(tmp_path / "v", random_model(), 1, vision_chunk_size=560)
    with pytest.raises(C.CheckpointError, match=r"params.json: \['vision_chunk_size'\] would change the model"):
        C.load_model(folder)
    folder = write_meta_fixture(tmp_path / "d", random_model(), 1)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({k: v for k, v in params.items() if k != "dim"}))
    with pytest.raises(C.CheckpointError, match=r"params.json: missing fields \['dim'\]"):
        C.load_model(folder)
    folder = write_meta_fixture(tmp_path / "ok", random_model(), 1, max_batch_size=32)  # harmless: ignored
    assert C.load_model(folder).args.vocab_size == 512
    folder = write_hf_bin_fixture(tmp_path / "hf", random_model())
    config = json.loads((folder / "config.json").read_text())
    for change, message in [({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type 'linear' is not"),
                            ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not"),
                            ({"hidden_act": "gelu"}, "hidden_act='gelu' changes the model"),
                            ({"attention_bias": True}, "attention_bias=True changes the model"),
                            ({"mlp_bias": True}, "mlp_bias=True changes the model"),
                            ({"attention_dropout": 0.1}, "attention_dropout=0.1 changes the model"),
                            ({"model_type": "mistral"}, "model_type='mistral'"),
                            ({"sliding_window": 4096}, r"\['sliding_window'\] would change the model"),
                            ({"quantization_config": {"bits": 4}}, r"\['quantization_config'\] would change"),
                            ({"rope_theta": 1e4, "rope_parameters": {"rope_theta": 5e5}},
                             "rope_theta is 10000.0 in rope_theta but 500000.0 in rope_parameters"),
                            ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
                             "rope type llama3 needs 'low_freq"),
                            ({"rope_parameters": {"rope_type": "default", "factor": 8.0}}, r"RoPE keys \['factor'\]"),
                            ({"rope_parameters": {"partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
                            ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false")]:
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(C.CheckpointError, match="config.json: " + message):
            C.load_model(folder)
    harmless = {"use_cache": False, "initializer_range": 0.04, "pad_token_id": 0, "transformers_version": "4.40.0",
                "torch_dtype": "bfloat16", "pretraining_tp": 1, "attention_dropout": 0, "_name_or_path": "x",
                "rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    (folder / "config.json").write_text(json.dumps({**config, **harmless}))
    assert C.load_model(folder).args.rope_theta == 10000.0


def test_transformers_5_rope_parameters_give_rope_theta(tmp_path):
    """transformers 5 writes rope_theta only inside rope_parameters (the issue: it was read as 10000)."""
    folder = write_hf_bin_fixture(tmp_path / "hf", random_model())
    config = json.loads((folder / "config.json").read_text())
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    for rope, theta, expected_scaling in [
            ({"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}, 500000.0, None),
            ({"rope_theta": 100000, "rope_scaling": None}, 100000.0, None),  # transformers 4
            ({"rope_parameters": {**scaling, "rope_theta": 500000.0}}, 500000.0, RopeScaling(8.0, 1.0, 4.0, 64)),
            ({"rope_theta": 500000.0, "rope_scaling": scaling}, 500000.0, RopeScaling(8.0, 1.0, 4.0, 64))]:
        (folder / "config.json").write_text(json.dumps({**config, **rope}))
        args = C.open_checkpoint(folder).args
        assert (args.rope_theta, args.rope_scaling) == (theta, expected_scaling), rope


LLAMA3_PARAMS = {  # Meta's params.json of each release, as published
    "llama3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                      ffn_dim_multiplier=1.3, norm_eps=1e-05, rope_theta=500000.0),
    "llama3.1-8b": dict(dim=4096, ffn_dim_multiplier=1.3, multiple_of=1024, n_heads=32, n_kv_heads=8, n_layers=32,
                        norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True, vocab_size=128256),
    "llama3.1-70b": dict(dim=8192, ffn_dim_multiplier=1.3, multiple_of=4096, n_heads=64, n_kv_heads=8, n_layers=80,
                         norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True, vocab_size=128256),
    "llama3.2-1b": dict(dim=2048, ffn_dim_multiplier=1.5, multiple_of=256, n_heads=32, n_kv_heads=8, n_layers=16,
                        norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True, vocab_size=128256),
    "llama3.2-3b": dict(dim=3072, ffn_dim_multiplier=1.0, multiple_of=256, n_heads=24, n_kv_heads=8, n_layers=28,
                        norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True, vocab_size=128256),
}


HF_CONFIGS = {  # config.json of real releases on the hub, as published (their keys, their values)
    "llama2-7b": {"_name_or_path": "meta-llama/Llama-2-7b-hf", "architectures": ["LlamaForCausalLM"],
                  "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
                  "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
                  "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
                  "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
                  "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.31.0.dev0",
                  "use_cache": True, "vocab_size": 32000},
    "llama3.1-8b": {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
                    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
                    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
                    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
                    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
                    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256},
    "llama3.2-1b": {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
                    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
                    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
                    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
                    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
                    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
                    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
                    "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256},
    "smollm2-135m": {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
                     "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 576,
                     "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "is_llama_config": True,
                     "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": 9,
                     "num_hidden_layers": 30, "num_key_value_heads": 3, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
                     "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000,
                     "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.40.1",
                     "use_cache": True, "vocab_size": 49152},
}


@pytest.mark.parametrize("name", HF_CONFIGS)
def test_published_hf_configs_read_as_their_model(name):
    args = formats.hf_args(HF_CONFIGS[name], "config.json")
    if name == "smollm2-135m":  # no preset: its published size, 134.5M parameters with the tied embedding
        assert (args.rope_theta, args.tie_embeddings, args.kv_heads, args.head_dim) == (100000.0, True, 3, 64)
        assert sum(s.numel() for s in param_shapes(args).values()) == 134_515_008
    else:
        preset = ModelArgs.from_name(name)
        assert args.architecture() == preset.architecture() and args.max_seq_len == preset.max_seq_len


@pytest.mark.parametrize("name", LLAMA3_PARAMS)
def test_meta_llama3_params_take_the_scaling_of_their_release(name):
    args = formats.meta_args(LLAMA3_PARAMS[name], "params.json", 128256)
    preset = ModelArgs.from_name(name)
    assert args.rope_scaling == preset.rope_scaling and args.max_seq_len == preset.max_seq_len
    assert args.rope_scaling is None or args.rope_scaling.factor == (32.0 if "3.2" in name else 8.0)
    assert args.architecture() == {**preset.architecture(), "tie_embeddings": False}  # the tensors decide tying
    params = formats.meta_params(dataclasses.replace(args, tie_embeddings=preset.tie_embeddings))
    assert formats.meta_args(params, "params.json", 128256).architecture() == args.architecture()


def test_meta_params_refuse_what_they_cannot_say():
    with pytest.raises(C.CheckpointError, match="cannot hold head_dim=24"):
        formats.meta_params(tiny(explicit_head_dim=24))
    with pytest.raises(C.CheckpointError, match="says only use_scaled_rope"):
        formats.meta_params(tiny(rope_scaling=RopeScaling(8.0)))
    with pytest.raises(C.CheckpointError, match="says only use_scaled_rope"):  # the shape of 3.1 8B, another factor
        formats.meta_params(dataclasses.replace(ModelArgs.from_name("llama3.1-8b"), rope_scaling=RopeScaling(4.0)))
    with pytest.raises(C.CheckpointError, match="cannot hold head_dim"):  # refused before anything is written
        C.save_model(random_model(tiny(explicit_head_dim=24)), "/nonexistent/never-created", format="meta")


def test_meta_tied_checkpoints(tmp_path):
    tied = random_model(tiny(tie_embeddings=True))
    embedding = tied.tok_embeddings.weight.detach()
    for name, output, n_shards in [("same", embedding.clone(), 1), ("absent", None, 1), ("same2", embedding, 2)]:
        loaded = C.load_model(write_meta_fixture(tmp_path / name, tied, n_shards, output=output))
        assert loaded.args.tie_embeddings, name
        assert_same_state(loaded, tied)
    untied = C.load_model(write_meta_fixture(tmp_path / "different", tied, 2, output=embedding + 1))
    assert not untied.args.tie_embeddings
    assert torch.equal(untied.output.weight, embedding + 1)
    C.save_model(tied, tmp_path / "export", format="meta", n_shards=2)  # Meta's layout: both tensors, equal
    shards = [torch.load(tmp_path / "export" / f"consolidated.{k:02d}.pth") for k in range(2)]
    assert torch.equal(torch.cat([s["output.weight"] for s in shards]), embedding)
    assert_same_state(C.load_model(tmp_path / "export"), tied)


def test_meta_llama3_vocab_parallel_shards(tmp_path):
    """Llama 3's model-parallel files split the embedding by rows (VocabParallelEmbedding), not by columns."""
    model = random_model()
    folder = write_meta_fixture(tmp_path / "m", model, 2, vocab_size=512, embedding_split=0)
    assert torch.load(folder / "consolidated.01.pth")["tok_embeddings.weight"].shape == (256, 64)
    assert_same_state(C.load_model(folder), model)


def test_hf_tied_checkpoints(tmp_path):
    from safetensors.torch import load_file, save_file

    tied = random_model(tiny(tie_embeddings=True))
    C.save_model(tied, tmp_path / "hf", format="hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    files = sorted((tmp_path / "hf").glob("*.safetensors"))
    assert not any("lm_head.weight" in load_file(f) for f in files)  # as transformers saves a tied model
    assert_same_state(C.load_model(tmp_path / "hf"), tied)
    embedding = tied.tok_embeddings.weight.detach()
    save_file({"lm_head.weight": embedding.clone()}, tmp_path / "hf" / "zz-head.safetensors")  # a redundant copy
    assert_same_state(C.load_model(tmp_path / "hf"), tied)
    save_file({"lm_head.weight": embedding + 1}, tmp_path / "hf" / "zz-head.safetensors")
    with pytest.raises(C.CheckpointError, match="tie_word_embeddings: true, but lm_head.weight differs"):
        C.load_model(tmp_path / "hf")
    (tmp_path / "hf" / "zz-head.safetensors").unlink()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(C.CheckpointError, match=r"missing keys \['output.weight'\].*tie_word_embeddings: true"):
        C.load_model(tmp_path / "hf")


@pytest.mark.parametrize("fmt", ["hf", "hf-bin", "meta"])
def test_truncated_weight_file_is_named(tmp_path, fmt):
    model = random_model()
    if fmt == "hf-bin":
        folder = write_hf_bin_fixture(tmp_path / "ckpt", model)
    else:
        C.save_model(model, tmp_path / "ckpt", format=fmt)
        folder = tmp_path / "ckpt"
    victim = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".pth", ".bin"))[-1]
    victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])  # an interrupted copy
    with pytest.raises(C.CheckpointError, match=f"{victim}: cannot read this weight file .*truncated") as e:
        C.open_checkpoint(folder)
    assert "\n" not in str(e.value)


def test_writers_never_overwrite_or_leave_partial_output(tmp_path):
    model = random_model()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        C.save_model(model, tmp_path / "full", format="hf")
    assert (tmp_path / "full" / "keep.txt").read_text() == "user data"
    with pytest.raises(ValueError, match="tensors missing"):
        with C.MetaWriter(tmp_path / "partial", model.args) as writer:
            writer.write({"tok_embeddings.weight": model.tok_embeddings.weight})
    with pytest.raises(ValueError, match="shape"):
        with C.HFWriter(tmp_path / "bad", model.args) as writer:
            writer.write({"norm.weight": torch.ones(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


@pytest.mark.parametrize("fmt", ["meta", "hf"])
def test_written_files_are_fsynced_before_the_rename(tmp_path, monkeypatch, fmt):
    """A power loss after the rename must not leave empty files under the final name: every file, and the folder
    that holds them, reaches the disk before the rename, and the parent's new name after it."""
    synced, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    renamed = []
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append(len(synced)), real_replace(a, b)))
    out = tmp_path / "export"
    C.save_model(random_model(tiny()), out, fmt)
    before_rename = {os.path.basename(p) for p in synced[:renamed[0]]}
    files = {p.name for p in out.iterdir()}
    assert files and files <= before_rename, f"not fsynced before the rename: {files - before_rename}"
    assert str(tmp_path) in synced[renamed[0]:], "the parent folder is not fsynced after the rename"
