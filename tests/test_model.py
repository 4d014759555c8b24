"""model.py against independent references: the parameter counts published for LLaMA / Llama 2, RoFormer's
complex-number RoPE and an unfused block written here."""
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
