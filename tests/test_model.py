"""model.py against independent references: the parameter counts published for LLaMA / Llama 2, RoFormer's
complex-number RoPE, an unfused block written here, and checkpoint fixtures laid out here the way Meta's
model-parallel code and HF's convert_llama_weights_to_hf.py lay them out."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import model as M


def tiny(**overrides):
    return dataclasses.replace(M.ModelArgs.from_name("tiny"), **overrides)


def random_model(args=None, seed=0):
    m = M.Transformer(args or tiny())
    M.init_weights(m, seed=seed)
    return m


def same_architecture(a, b):
    fields = ("dim", "n_layers", "n_heads", "kv_heads", "vocab_size", "hidden_dim", "norm_eps", "rope_theta")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


# ----------------------------------------------------------------------------------- presets, structure

@pytest.mark.parametrize("name, ffn, count", [  # counts as published for LLaMA / Llama 2 (32,000-token vocab)
    ("7b", 11008, 6_738_415_616), ("13b", 13824, 13_015_864_320), ("30b", 17920, 32_528_943_616),
    ("65b", 22016, 65_285_660_672), ("llama2-7b", 11008, 6_738_415_616),
    ("llama2-13b", 13824, 13_015_864_320), ("llama2-70b", 28672, 68_976_648_192)])
def test_preset_parameter_counts(name, ffn, count):
    args = M.ModelArgs.from_name(name)
    assert args.hidden_dim == ffn
    with torch.device("meta"):
        model = M.Transformer(args)
    assert sum(p.numel() for p in model.parameters()) == count
    assert list(model.buffers()) == []
    if name == "llama2-70b":
        assert model.layers[0].attention.wk.weight.shape == (8 * 128, 8192)


def test_presets_and_names():
    assert set(M.MODEL_NAMES) >= {"7b", "13b", "30b", "65b", "llama2-7b", "llama2-13b", "llama2-70b", "tiny"}
    assert M.ModelArgs.from_name("65b").norm_eps == 1e-5 and M.ModelArgs.from_name("7b").norm_eps == 1e-6
    assert tiny().kv_heads < tiny().n_heads  # the tiny model exercises GQA
    with pytest.raises(ValueError, match="7b.*tiny"):
        M.ModelArgs.from_name("8b")


def test_state_dict_keys_are_meta_keys():
    with torch.device("meta"):
        keys = list(M.Transformer(tiny(n_layers=1)).state_dict())
    assert keys == ["tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.0.attention.wk.weight",
                    "layers.0.attention.wv.weight", "layers.0.attention.wo.weight",
                    "layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w2.weight",
                    "layers.0.feed_forward.w3.weight", "layers.0.attention_norm.weight",
                    "layers.0.ffn_norm.weight", "norm.weight", "output.weight"]


# ------------------------------------------------------------------------------------ maths vs references

def roformer_rotate(x, theta=10000.0):
    """RoFormer (Su et al. 2021), section 3.2: view each adjacent pair (x_2i, x_2i+1) at position m as the
    complex number x_2i + i*x_2i+1 and multiply it by e^{i m theta_i}, theta_i = theta^(-2i/d). x: (T, d)."""
    T, d = x.shape
    out = torch.empty(T, d, dtype=torch.float64)
    for m in range(T):
        for i in range(d // 2):
            z = complex(x[m, 2 * i], x[m, 2 * i + 1]) * complex(math.cos(m * theta ** (-2 * i / d)),
                                                                   math.sin(m * theta ** (-2 * i / d)))
            out[m, 2 * i], out[m, 2 * i + 1] = z.real, z.imag
    return out


def test_rope_matches_roformer_complex_formulation():
    T, d = 12, 16
    x = torch.randn(1, T, 1, d)
    ours = M.apply_rotary_emb(x, M.precompute_freqs_cis(d, T))[0, :, 0]
    torch.testing.assert_close(ours.double(), roformer_rotate(x[0, :, 0]), rtol=1e-5, atol=1e-5)
    freqs = M.precompute_freqs_cis(d, T, theta=500000.0)
    assert freqs.dtype == torch.complex64 and freqs.shape == (T, d // 2)
    torch.testing.assert_close(M.apply_rotary_emb(x, freqs)[0, :, 0].double(),
                               roformer_rotate(x[0, :, 0], theta=500000.0), rtol=1e-5, atol=1e-5)


def reference_block(block, x, args):
    """A LLaMA block from the formulas, unfused: RMSNorm, RoPE (RoFormer), GQA by repeating kv heads,
    explicitly masked softmax attention, SwiGLU."""
    def rmsnorm(v, w):
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + args.norm_eps) * w

    def rope(v):  # (T, heads, hd)
        return torch.stack([roformer_rotate(v[:, h], args.rope_theta).float() for h in range(v.shape[1])], 1)

    a, f = block.attention, block.feed_forward
    T, hd = x.shape[0], args.head_dim
    h = rmsnorm(x, block.attention_norm.weight)
    q = rope((h @ a.wq.weight.T).view(T, args.n_heads, hd))
    k = rope((h @ a.wk.weight.T).view(T, args.kv_heads, hd))
    v = (h @ a.wv.weight.T).view(T, args.kv_heads, hd)
    group = args.n_heads // args.kv_heads
    heads = []
    for i in range(args.n_heads):
        scores = q[:, i] @ k[:, i // group].T / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        heads.append(torch.softmax(scores, -1) @ v[:, i // group])
    x = x + torch.cat(heads, -1) @ a.wo.weight.T
    h = rmsnorm(x, block.ffn_norm.weight)
    return x + (F.silu(h @ f.w1.weight.T) * (h @ f.w3.weight.T)) @ f.w2.weight.T


@torch.no_grad()
def test_block_matches_unfused_reference():
    args = tiny(rope_theta=1000.0)
    model = random_model(args)
    block, x = model.layers[0], torch.randn(1, 10, args.dim)
    ours = block(x, M.precompute_freqs_cis(args.head_dim, 10, args.rope_theta))
    torch.testing.assert_close(ours[0], reference_block(block, x[0], args), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_causality():
    model = random_model()
    tokens = torch.randint(0, 512, (2, 20))
    changed = tokens.clone()
    changed[:, 12] = (tokens[:, 12] + 7) % 512
    a, b = model(tokens), model(changed)
    assert a.dtype == torch.float32 and a.shape == (2, 20, 512)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert (a[:, 12:] - b[:, 12:]).abs().amax() > 1e-3  # the change does reach later positions


@torch.no_grad()
def test_gqa_equals_multi_head_with_repeated_kv_heads():
    gqa = random_model(tiny(n_heads=4, n_kv_heads=2))
    mha = M.Transformer(tiny(n_heads=4, n_kv_heads=None))
    state = gqa.state_dict()
    for name in state:
        if name.endswith(("wk.weight", "wv.weight")):  # kv head j serves query heads 2j and 2j+1
            kv = state[name].view(2, 16, 64)
            state[name] = torch.stack([kv[0], kv[0], kv[1], kv[1]]).reshape(64, 64)
    mha.load_state_dict(state)
    tokens = torch.randint(0, 512, (2, 15))
    torch.testing.assert_close(gqa(tokens), mha(tokens), rtol=1e-5, atol=1e-6)


def test_checkpointing_gives_same_loss_and_gradients():
    tokens = torch.randint(0, 512, (2, 16))
    results = []
    for flag in (False, True):
        model = random_model()
        model.checkpointing = flag
        calls = []
        model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
        loss = M.cross_entropy(model(tokens), tokens)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}, len(calls)))
    (loss0, grads0, calls0), (loss1, grads1, calls1) = results
    assert (calls0, calls1) == (1, 2)  # with checkpointing the block is recomputed in backward
    torch.testing.assert_close(loss0, loss1, rtol=0, atol=0)
    for name in grads0:
        torch.testing.assert_close(grads0[name], grads1[name], rtol=1e-6, atol=1e-8)


def test_cross_entropy_shifts_ignores_and_uses_fp32():
    logits = torch.randn(2, 5, 7).bfloat16()
    labels = torch.tensor([[-100, 3, 1, -100, 6], [2, -100, -100, 0, 5]])
    terms = [-torch.log_softmax(logits[b, t].float(), -1)[labels[b, t + 1]]
             for b in range(2) for t in range(4) if labels[b, t + 1] != -100]
    loss_sum = M.cross_entropy(logits, labels, reduction="sum")
    assert loss_sum.dtype == torch.float32
    torch.testing.assert_close(loss_sum, torch.stack(terms).sum())
    torch.testing.assert_close(M.cross_entropy(logits, labels), torch.stack(terms).mean())


@torch.no_grad()
def test_generate_greedy_appends_argmax_and_stops_at_eos():
    model = random_model()
    out = M.generate(model, [1, 5, 9], max_new_tokens=4)
    assert out[:3] == [1, 5, 9] and len(out) == 7
    for t in range(3, 7):
        assert out[t] == model(torch.tensor([out[:t]]))[0, -1].argmax().item()
    assert M.generate(model, [1, 5, 9], max_new_tokens=4, eos_id=out[3]) == out[:4]
    assert len(M.generate(model, [1], max_new_tokens=3, temperature=1.0)) == 4


def test_init_weights_is_deterministic():
    a, b, c = random_model(seed=3), random_model(seed=3), random_model(seed=4)
    assert_same_state(a, b)
    assert not torch.equal(a.output.weight, c.output.weight)
    assert torch.equal(a.norm.weight, torch.ones(64))


# --------------------------------------------------------------------- checkpoint fixtures, written here

SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,  # fairscale ColumnParallelLinear
             "wo": 1, "w2": 1, "tok_embeddings": 1}                      # RowParallelLinear, ParallelEmbedding


def write_meta_fixture(folder, model, n_shards, vocab_size=-1, **extra_params):
    a = model.args
    folder.mkdir()
    params = dict(dim=a.dim, multiple_of=a.multiple_of, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                  n_layers=a.n_layers, norm_eps=a.norm_eps, vocab_size=vocab_size, **extra_params)
    (folder / "params.json").write_text(json.dumps(params))
    for k in range(n_shards):
        shard = {"rope.freqs": torch.ones(a.head_dim // 2)}
        for name, t in model.state_dict().items():
            dim = SPLIT_DIM.get(name.split(".")[-2])
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
    one = M.load_model(write_meta_fixture(tmp_path / "mp1", model, 1))
    two = M.load_model(write_meta_fixture(tmp_path / "mp2", model, 2))
    assert same_architecture(one.args, model.args)  # vocab_size -1 taken from the embedding rows
    assert_same_state(one, model)
    assert_same_state(two, model)
    reader = M.open_checkpoint(tmp_path / "mp2")
    assert reader.names() == list(model.state_dict())
    for name, rows in [("output.weight", slice(200, 300)), ("layers.1.attention.wk.weight", slice(5, 27)),
                       ("tok_embeddings.weight", slice(10, 20)), ("layers.0.feed_forward.w2.weight", None),
                       ("norm.weight", slice(3, 9))]:  # slices across the shard boundary, on both split dims
        full = model.state_dict()[name]
        assert torch.equal(reader.read(name, rows), full if rows is None else full[rows]), name


def test_hf_layout_round_trip_is_exact(tmp_path):
    model = random_model()
    loaded = M.load_model(write_hf_bin_fixture(tmp_path / "hf", model))  # Meta -> HF (permuted) -> Meta
    assert_same_state(loaded, model)
    reader = M.open_checkpoint(tmp_path / "hf")
    for name in ("layers.0.attention.wq.weight", "layers.1.attention.wk.weight"):  # rows cut inside a head
        assert torch.equal(reader.read(name, slice(5, 27)), model.state_dict()[name][5:27])


@pytest.mark.parametrize("fmt", ["meta", "hf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_then_load_is_bit_exact(tmp_path, fmt, dtype):
    model = random_model().to(dtype)
    M.save_model(model, tmp_path / "out", format=fmt)
    loaded = M.load_model(tmp_path / "out", dtype=dtype)
    assert same_architecture(loaded.args, model.args)
    assert_same_state(loaded, model)
    tokens = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


def test_written_files_follow_meta_and_hf_layouts(tmp_path):
    from safetensors.torch import load_file

    model = random_model()
    a, state = model.args, model.state_dict()
    M.save_model(model, tmp_path / "meta", format="meta", n_shards=2)
    llama2_model_args = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                         "ffn_dim_multiplier", "norm_eps", "max_batch_size", "max_seq_len"}
    assert set(json.loads((tmp_path / "meta" / "params.json").read_text())) <= llama2_model_args
    for k in range(2):
        shard = torch.load(tmp_path / "meta" / f"consolidated.{k:02d}.pth", weights_only=True)
        assert list(shard) == list(state)
        for name, t in state.items():
            dim = SPLIT_DIM.get(name.split(".")[-2])
            assert torch.equal(shard[name], t if dim is None else t.chunk(2, dim)[k]), name
    assert_same_state(M.load_model(tmp_path / "meta"), model)

    M.save_model(model, tmp_path / "hf", format="hf")
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
    M.save_model(model, tmp_path / "hf", format="hf")
    from_hf = M.load_model(tmp_path / "hf")
    assert from_hf.args.hidden_dim == 160
    M.save_model(from_hf, tmp_path / "meta", format="meta")
    from_meta = M.load_model(tmp_path / "meta")
    assert from_meta.args.hidden_dim == 160
    assert_same_state(from_meta, model)


# ---------------------------------------------------------------------------------------------- bad input

def test_missing_config_files(tmp_path):
    folder = write_meta_fixture(tmp_path / "meta", random_model(), 1)
    (folder / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match="params.json"):
        M.load_model(folder)
    M.save_model(random_model(), tmp_path / "hf", format="hf")
    (tmp_path / "hf" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        M.load_model(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        M.load_model(tmp_path / "nowhere")


def test_shard_count_must_match_files(tmp_path):
    folder = write_meta_fixture(tmp_path / "a", random_model(), 2)
    (folder / "consolidated.01.pth").unlink()
    with pytest.raises(ValueError, match="1 shard file.*2 shards are expected"):
        M.load_model(folder)
    folder = write_meta_fixture(tmp_path / "b", random_model(), 2)
    (folder / "consolidated.01.pth").rename(folder / "consolidated.02.pth")
    with pytest.raises(ValueError, match="consolidated.01.pth"):
        M.load_model(folder)
    with pytest.raises(ValueError, match="3 model-parallel shards cannot split"):
        M.MetaWriter(tmp_path / "c", tiny(), n_shards=3)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    model = random_model()
    folder = write_meta_fixture(tmp_path / "m", model, 1)
    shard = torch.load(folder / "consolidated.00.pth")
    del shard["layers.1.ffn_norm.weight"]
    shard["layers.1.attention.bias"] = torch.zeros(3)
    torch.save(shard, folder / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"missing keys \['layers.1.ffn_norm.weight'\], unexpected keys "
                                         r"\['layers.1.attention.bias'\]"):
        M.load_model(folder)


def test_shape_that_does_not_match_config_names_file(tmp_path):
    model = random_model()
    folder = write_meta_fixture(tmp_path / "m", model, 1)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "multiple_of": 128}))  # FFN 256, files 192
    with pytest.raises(ValueError, match=r"layers.0.feed_forward.w1.weight: \(192, 64\) in .*consolidated.00.pth"
                                         r", config says \(256, 64\)"):
        M.load_model(folder)


def test_tokenizer_vocab_must_match_embedding(tmp_path):
    folder = write_meta_fixture(tmp_path / "m", random_model(), 1)
    with pytest.raises(ValueError, match="tokenizer has 32000 tokens.*has 512 rows"):
        M.load_model(folder, vocab_size=32000)
    assert M.load_model(folder, vocab_size=512).args.vocab_size == 512


def test_config_fields_that_change_the_model_are_errors(tmp_path):
    folder = write_meta_fixture(tmp_path / "m", random_model(), 1, use_scaled_rope=True)
    with pytest.raises(ValueError, match=r"params.json: fields \['use_scaled_rope'\]"):
        M.load_model(folder)
    folder = write_meta_fixture(tmp_path / "ok", random_model(), 1, max_batch_size=32)  # harmless: ignored
    assert M.load_model(folder).args.vocab_size == 512
    folder = write_hf_bin_fixture(tmp_path / "hf", random_model())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rope_scaling": {"type": "linear", "factor": 2.0}}))
    with pytest.raises(ValueError, match="config.json: rope_scaling"):
        M.load_model(folder)


def test_writers_never_overwrite_or_leave_partial_output(tmp_path):
    model = random_model()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        M.save_model(model, tmp_path / "full", format="hf")
    assert (tmp_path / "full" / "keep.txt").read_text() == "user data"
    with pytest.raises(ValueError, match="tensors missing"):
        with M.MetaWriter(tmp_path / "partial", model.args) as writer:
            writer.write({"tok_embeddings.weight": model.tok_embeddings.weight})
    with pytest.raises(ValueError, match="shape"):
        with M.HFWriter(tmp_path / "bad", model.args) as writer:
            writer.write({"norm.weight": torch.ones(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
