"""model.py against independent references: the parameter counts published for LLaMA / Llama 2 / Llama 3,
RoFormer's complex-number RoPE, Meta's Llama 3.1 RoPE scaling loop, and an unfused block written here."""
import dataclasses
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


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


# ----------------------------------------------------------------------------------- presets, structure

@pytest.mark.parametrize("name, ffn, count", [  # counts as published for LLaMA / Llama 2 (32,000-token vocab)
    ("7b", 11008, 6_738_415_616), ("13b", 13824, 13_015_864_320), ("30b", 17920, 32_528_943_616),
    ("65b", 22016, 65_285_660_672), ("llama2-7b", 11008, 6_738_415_616),
    ("llama2-13b", 13824, 13_015_864_320), ("llama2-70b", 28672, 68_976_648_192),
    # Llama 3 (128,256-token vocab; the 3.2 models tie the output layer to the embedding: counted once)
    ("llama3-8b", 14336, 8_030_261_248), ("llama3-70b", 28672, 70_553_706_496),
    ("llama3.1-8b", 14336, 8_030_261_248), ("llama3.1-70b", 28672, 70_553_706_496),
    ("llama3.2-1b", 8192, 1_235_814_400), ("llama3.2-3b", 8192, 3_212_749_824)])
def test_preset_parameter_counts(name, ffn, count):
    args = M.ModelArgs.from_name(name)
    assert args.hidden_dim == ffn
    with torch.device("meta"):
        model = M.Transformer(args)
    assert sum(p.numel() for p in model.parameters()) == count
    assert list(model.buffers()) == []
    if name == "llama2-70b":
        assert model.layers[0].attention.wk.weight.shape == (8 * 128, 8192)


def test_llama3_presets_follow_the_release_table():
    for name, factor, tied, context in [("llama3-8b", None, False, 8192), ("llama3-70b", None, False, 8192),
                                        ("llama3.1-8b", 8, False, 131072), ("llama3.1-70b", 8, False, 131072),
                                        ("llama3.2-1b", 32, True, 131072), ("llama3.2-3b", 32, True, 131072)]:
        a = M.ModelArgs.from_name(name)
        assert (a.vocab_size, a.kv_heads, a.rope_theta, a.norm_eps) == (128256, 8, 500000.0, 1e-5), name
        assert (a.tie_embeddings, a.max_seq_len) == (tied, context), name
        assert a.rope_scaling == (None if factor is None else M.RopeScaling(factor, 1.0, 4.0, 8192)), name
    with torch.device("meta"):
        tied = M.Transformer(M.ModelArgs.from_name("llama3.2-1b"))
    assert tied.output is None and "output.weight" not in M.param_shapes(tied.args)


def test_presets_and_names():
    assert set(M.MODEL_NAMES) >= {"7b", "13b", "30b", "65b", "llama2-7b", "llama2-13b", "llama2-70b", "tiny",
                                  "llama3-8b", "llama3-70b", "llama3.1-8b", "llama3.1-70b", "llama3.2-1b",
                                  "llama3.2-3b"}
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


def meta_apply_scaling(freqs, factor, low=1.0, high=4.0, old_context=8192):
    """Meta's first apply_scaling (llama-models, Llama 3.1 release), written as its per-frequency loop."""
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            out.append(freq)
        elif wavelen > old_context / low:
            out.append(freq / factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("head_dim, factor", [(128, 8.0), (64, 32.0)])  # Llama 3.1 8B, Llama 3.2 1B
def test_llama3_rope_scaling_matches_meta_loop(head_dim, factor):
    T = 64
    scaling = M.RopeScaling(factor)
    freqs = M.precompute_freqs_cis(head_dim, T, 500000.0, scaling=scaling)
    plain = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    expected = meta_apply_scaling(plain, factor)
    assert (expected < plain.double()).any() and (expected == plain.double()).any()  # both regimes are hit
    assert ((expected > plain.double() / factor) & (expected < plain.double())).any()  # and the band between
    torch.testing.assert_close(M.llama3_scaled(plain, scaling).double(), expected, rtol=1e-6, atol=0)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * expected[None]
    torch.testing.assert_close(freqs, torch.polar(torch.ones_like(angles), angles).to(torch.complex64),
                               rtol=0, atol=5e-5)


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
@pytest.mark.parametrize("overrides", [{}, {"explicit_head_dim": 24}])  # 4 heads of 24 in a dim-64 model
def test_block_matches_unfused_reference(overrides):
    args = tiny(rope_theta=1000.0, **overrides)
    model = random_model(args)
    block, x = model.layers[0], torch.randn(1, 10, args.dim)
    assert block.attention.wq.weight.shape == (args.n_heads * args.head_dim, args.dim)
    assert block.attention.wo.weight.shape == (args.dim, args.n_heads * args.head_dim)
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


def test_tied_model_has_one_weight_whose_hook_sees_both_gradients_summed():
    """A tied model against an untied one whose output layer holds a copy of the embedding: same logits, and
    the tied weight's gradient is the sum of the untied pair's, delivered to its hook once per backward pass."""
    tied = random_model(tiny(tie_embeddings=True))
    untied = M.Transformer(tiny())
    state = tied.state_dict()
    untied.load_state_dict({**state, "output.weight": state["tok_embeddings.weight"].clone()})
    assert "output.weight" not in state and len(list(tied.parameters())) == len(list(untied.parameters())) - 1
    tokens = torch.randint(0, 512, (2, 12))
    calls = []
    tied.tok_embeddings.weight.register_post_accumulate_grad_hook(lambda p: calls.append(p.grad.clone()))
    for model in (tied, untied):
        M.cross_entropy(model(tokens), tokens).backward()
    assert len(calls) == 1
    summed = untied.tok_embeddings.weight.grad + untied.output.weight.grad
    torch.testing.assert_close(calls[0], summed, rtol=1e-5, atol=1e-7)
    assert (untied.output.weight.grad.abs().sum() > 0) and (untied.tok_embeddings.weight.grad.abs().sum() > 0)
    with torch.no_grad():
        torch.testing.assert_close(tied(tokens), untied(tokens), rtol=0, atol=0)


def test_architecture_ignores_how_the_ffn_width_is_spelled():
    meta_rule = M.ModelArgs.from_name("llama3-8b")
    explicit = dataclasses.replace(meta_rule, multiple_of=256, ffn_dim_multiplier=None, ffn_hidden_dim=14336)
    assert meta_rule != explicit and meta_rule.architecture() == explicit.architecture()
    assert dataclasses.replace(meta_rule, max_seq_len=4).architecture() == meta_rule.architecture()
    for change in ({"tie_embeddings": True}, {"rope_scaling": M.RopeScaling(8.0)}, {"explicit_head_dim": 64}):
        assert dataclasses.replace(meta_rule, **change).architecture() != meta_rule.architecture(), change


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
    tied = random_model(tiny(tie_embeddings=True), seed=3)  # the same draws, less the output layer's
    assert list(tied.state_dict()) == [n for n in a.state_dict() if n != "output.weight"]
    for name, t in tied.state_dict().items():
        assert torch.equal(t, a.state_dict()[name]), name
