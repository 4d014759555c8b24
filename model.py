"""LLaMA (Touvron et al. 2023, arXiv 2302.13971), Llama 2 (arXiv 2307.09288) and Llama 3 (arXiv 2407.21783) in
plain PyTorch.

Written from scratch in the layout of Meta's reference model.py, so that `state_dict()` keys are exactly
Meta's checkpoint keys. The model holds parameters only (no buffers: the rotary table is computed in
forward), so it can be built on the 'meta' device and filled tensor by tensor, or sharded per parameter.

Reading and writing checkpoints (Meta's and Hugging Face's formats) is checkpoint.py's job.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's RoPE scaling for long contexts ("rope_type": "llama3" in Hugging Face configs; see llama3_scaled)."""
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192  # the context length of pre-training before the extension


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # < n_heads: grouped-query attention (Llama 2 70B, Llama 3)
    vocab_size: int = 32000
    multiple_of: int = 256  # FFN width is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None  # Llama 3.1 and later
    max_seq_len: int = 2048
    tie_embeddings: bool = False  # the output head is the embedding matrix (Llama 3.2 1B / 3B)
    ffn_hidden_dim: Optional[int] = None  # explicit FFN width: a config.json's that Meta's rule does not give
    explicit_head_dim: Optional[int] = None  # explicit head width: a config.json's that is not dim / n_heads

    def __post_init__(self):
        if (self.explicit_head_dim is None and self.dim % self.n_heads) or self.head_dim % 2:
            raise ValueError(f"ModelArgs: dim={self.dim} must split into n_heads={self.n_heads} heads of even size")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"ModelArgs: n_heads={self.n_heads} must be a multiple of n_kv_heads={self.kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width: 2/3 of 4*dim (keeps the FFN's parameter count, LLaMA paper section 2.2), Meta's rounding."""
        if self.ffn_hidden_dim:
            return self.ffn_hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def architecture(self) -> dict:
        """Everything that decides what the model computes, widths resolved: equal for two ModelArgs that build the
        same model however its FFN width is spelled (max_seq_len, only a limit, is left out)."""
        return dict(dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads, kv_heads=self.kv_heads,
                    head_dim=self.head_dim, hidden_dim=self.hidden_dim, vocab_size=self.vocab_size,
                    norm_eps=self.norm_eps, rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
                    tie_embeddings=self.tie_embeddings)

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name.lower() not in _PRESETS:
            raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}")
        return cls(**_PRESETS[name.lower()])


_LLAMA3 = dict(n_kv_heads=8, vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192)
_LLAMA3_1 = dict(_LLAMA3, max_seq_len=131072, rope_scaling=RopeScaling(factor=8.0))
_LLAMA3_2 = dict(_LLAMA3, max_seq_len=131072, rope_scaling=RopeScaling(factor=32.0), tie_embeddings=True)
_PRESETS = {  # Meta's params.json of each release (FFN widths by Meta's rule), plus the context length
    "7b": dict(dim=4096, n_layers=32, n_heads=32),
    "13b": dict(dim=5120, n_layers=40, n_heads=40),
    "30b": dict(dim=6656, n_layers=60, n_heads=52),
    "65b": dict(dim=8192, n_layers=80, n_heads=64, norm_eps=1e-5),
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, norm_eps=1e-5, max_seq_len=4096),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, norm_eps=1e-5, max_seq_len=4096),
    "llama2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                       multiple_of=4096, norm_eps=1e-5, max_seq_len=4096),
    "llama3-8b": dict(_LLAMA3, dim=4096, n_layers=32, n_heads=32, ffn_dim_multiplier=1.3, multiple_of=1024),
    "llama3-70b": dict(_LLAMA3, dim=8192, n_layers=80, n_heads=64, ffn_dim_multiplier=1.3, multiple_of=4096),
    "llama3.1-8b": dict(_LLAMA3_1, dim=4096, n_layers=32, n_heads=32, ffn_dim_multiplier=1.3, multiple_of=1024),
    "llama3.1-70b": dict(_LLAMA3_1, dim=8192, n_layers=80, n_heads=64, ffn_dim_multiplier=1.3, multiple_of=4096),
    "llama3.2-1b": dict(_LLAMA3_2, dim=2048, n_layers=16, n_heads=32, ffn_dim_multiplier=1.5, multiple_of=256),
    "llama3.2-3b": dict(_LLAMA3_2, dim=3072, n_layers=28, n_heads=24, ffn_dim_multiplier=1.0, multiple_of=256),
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=256),
}
MODEL_NAMES: tuple[str, ...] = tuple(_PRESETS)


# ----------------------------------------------------------------------------------------------- model

def precompute_freqs_cis(head_dim: int, seq_len: int, theta: float = 10000.0, device=None,
                         scaling: Optional[RopeScaling] = None) -> torch.Tensor:
    """e^{i m theta_j} for positions m < seq_len, theta_j = theta^(-2j/head_dim) (RoFormer, Su et al. 2021, eq. 15),
    with Llama 3.1's scaling of the theta_j when given. Returns complex64 (seq_len, head_dim // 2)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    if scaling is not None:
        freqs = llama3_scaled(freqs, scaling)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def llama3_scaled(freqs: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1's frequency scaling, from Meta's reference code (apply_scaling; the paper gives no formula) and
    transformers' _compute_llama3_parameters. Wavelengths above original_max_seq_len / low_freq_factor are divided
    by `factor` (stretched to the longer context), those below original_max_seq_len / high_freq_factor are kept,
    and the band between is interpolated smoothly."""
    wavelen = 2 * math.pi / freqs
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * freqs / s.factor + smooth * freqs
    scaled = torch.where(wavelen > s.original_max_seq_len / s.low_freq_factor, freqs / s.factor, freqs)
    in_band = (wavelen >= s.original_max_seq_len / s.high_freq_factor) & \
              (wavelen <= s.original_max_seq_len / s.low_freq_factor)
    return torch.where(in_band, smoothed, scaled)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair (x[2j], x[2j+1]) of x (B, T, H, head_dim) by angle m*theta_j (Meta's layout)."""
    x_complex = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, T, H, head_dim/2)
    rotated = x_complex * freqs_cis[None, :, None, :]
    return torch.view_as_real(rotated).flatten(3).type_as(x)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019), normalised in fp32 as Meta does."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, freqs_cis):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if self.n_kv_heads < self.n_heads:  # grouped-query attention: each kv head serves n_rep query heads
            n_rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, n_heads, T, head_dim)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        """x (B, T, dim), freqs_cis (T, head_dim/2) -> (B, T, dim); causal, no KV cache."""
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))


class TiedLogits(torch.autograd.Function):
    """F.linear(h, weight) for a weight that is also the embedding, h (..., dim) -> (..., vocab), whose weight
    gradient is a tensor of its own (F.linear's is a transposed view), so that autograd adds the embedding's into it
    in place: 2 gradients of the tied weight's size at the end of the backward pass, not 3 (tests/test_plan.py)."""

    @staticmethod
    def forward(ctx, h, weight):
        ctx.save_for_backward(h, weight)
        return F.linear(h, weight)

    @staticmethod
    def backward(ctx, grad):  # grad (..., vocab)
        h, weight = ctx.saved_tensors
        return grad @ weight, grad.flatten(0, -2).t().mm(h.flatten(0, -2))  # (B, T, dim), (vocab, dim)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, checkpointing: bool = False):
        super().__init__()
        self.args = args
        self.checkpointing = checkpointing  # recompute each block's activations in backward
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # Tied: no output layer; the logits use the embedding matrix, one parameter with two uses (autograd sums
        # both gradients before its post-accumulate-grad hook fires, once).
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, logits_at: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab_size) in float32. With logits_at, flat indices b * T + t (N,) of
        the positions wanted, only their logits (N, vocab_size): scoring an answer needs a few of them."""
        a, T = self.args, tokens.shape[1]
        if T > a.max_seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than max_seq_len={a.max_seq_len}")
        freqs_cis = precompute_freqs_cis(a.head_dim, T, a.rope_theta, tokens.device, a.rope_scaling)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer in self.layers:
            if self.checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, freqs_cis, use_reentrant=False)
            else:
                h = layer(h, freqs_cis)
        if logits_at is not None:
            h = h.flatten(0, 1)[logits_at]  # (N, dim)
        if self.output is None:
            return TiedLogits.apply(self.norm(h), self.tok_embeddings.weight).float()
        return self.output(self.norm(h)).float()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean",
                  max_token_loss: Optional[float] = None) -> torch.Tensor:
    """Next-token loss in fp32: logits[:, t] predicts labels[:, t+1]; labels == -100 are ignored.
    labels has the shape of the tokens (B, T). reduction "sum" lets the caller divide by a global token count.
    max_token_loss: each token's loss is clamped to at most this value first (token-loss clipping): a clamped token
    adds the value and no gradient."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)  # (B * (T-1), vocab), (B * (T-1),)
    if max_token_loss is None:
        return F.cross_entropy(logits, labels, ignore_index=-100, reduction=reduction)
    losses = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none").clamp(max=max_token_loss)
    return losses.sum() if reduction == "sum" else losses.sum() / (labels != -100).sum()


@torch.no_grad()
def generate(model: Transformer, tokens: list[int], max_new_tokens: int, temperature: float = 0.0,
             eos_id: Optional[int] = None) -> list[int]:
    """Greedy (temperature 0) or sampled continuation. Returns prompt + new tokens. Recomputes the whole
    (cropped) context each step: slow, but simple and enough to check a checkpoint by eye."""
    if not tokens:
        raise ValueError("generate() needs at least one prompt token (e.g. the BOS id)")
    device = model.tok_embeddings.weight.device
    out = list(tokens)
    for _ in range(max_new_tokens):
        context = torch.tensor([out[-model.args.max_seq_len:]], device=device)
        logits = model(context)[0, -1]
        if temperature > 0:
            next_id = int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1))
        else:
            next_id = int(logits.argmax())
        out.append(next_id)
        if next_id == eos_id:
            break
    return out


def random_weights(args: ModelArgs, seed: int = 0, std: float = 0.02):
    """Yield (name, tensor) in model order: N(0, std) weights, norms 1, drawn one tensor at a time on the CPU
    from one seeded generator, so every device and every sharding gets the same model."""
    gen = torch.Generator().manual_seed(seed)
    for name, shape in param_shapes(args).items():
        yield name, torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=gen) * std


@torch.no_grad()
def init_weights(model: Transformer, seed: int = 0, std: float = 0.02) -> None:
    """Fill `model` with random_weights(model.args, seed, std)."""
    params = dict(model.named_parameters())
    for name, tensor in random_weights(model.args, seed, std):
        params[name].copy_(tensor)


def param_shapes(args: ModelArgs) -> dict[str, torch.Size]:
    """Meta checkpoint key -> shape, in model order (built on 'meta', allocates nothing). A tied model has no
    output.weight."""
    with torch.device("meta"):
        return {name: p.shape for name, p in Transformer(args).named_parameters()}
