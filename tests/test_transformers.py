"""checkpoint.py and model.py against transformers' LlamaForCausalLM, the independent reference: folders that
transformers saves load here with its logits, folders written here load in transformers with ours. transformers is
a test-only dependency (requirements-test.txt): without it these tests skip."""
import dataclasses

import pytest
import torch

import checkpoint as C
import model as M

transformers = pytest.importorskip("transformers")

# A tiny LLaMA. Weights are drawn 10x larger than transformers' default (0.02), so that attention is far from
# uniform and a wrong RoPE shows in the logits (each test checks that it does).
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.2)
SCALED = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}  # a short original context: the scaling acts on 32 tokens
TOKENS = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))

CONFIGS = {
    "gqa": dict(num_key_value_heads=2),
    "tied": dict(tie_word_embeddings=True),
    "rope-theta-in-rope-parameters": dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "llama3-rope-scaling": dict(rope_parameters={**SCALED, "rope_theta": 10000.0}),
    "explicit-head-dim": dict(head_dim=32, num_key_value_heads=2),
    "llama3.2-like": dict(num_key_value_heads=2, tie_word_embeddings=True,
                          rope_parameters={**SCALED, "rope_theta": 500000.0}),
}


def save_hf_model(folder, **overrides):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**BASE, **overrides})).eval()
    model.save_pretrained(folder)
    return model


def hf_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits.float()


def our_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_checkpoint_loads_with_equal_logits(tmp_path, name):
    reference = save_hf_model(tmp_path, **CONFIGS[name])
    ours = C.load_model(tmp_path)
    expected = hf_logits(reference)
    torch.testing.assert_close(our_logits(ours), expected, rtol=0, atol=1e-4)
    a = ours.args
    assert a.tie_embeddings == (name in ("tied", "llama3.2-like"))
    if a.rope_theta != 10000.0 or a.rope_scaling is not None:  # the RoPE read from the file is what matters
        plain = M.Transformer(dataclasses.replace(a, rope_theta=10000.0, rope_scaling=None))
        plain.load_state_dict(ours.state_dict())
        assert (our_logits(plain) - expected).abs().max() > 1e-2


def test_transformers_5_config_has_rope_theta_only_in_rope_parameters(tmp_path):
    save_hf_model(tmp_path, **CONFIGS["rope-theta-in-rope-parameters"])
    config = (tmp_path / "config.json").read_text()
    assert '"rope_parameters"' in config and '"rope_theta": 500000.0' in config
    assert C.open_checkpoint(tmp_path).args.rope_theta == 500000.0


@pytest.mark.parametrize("overrides, field", [
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "rope type 'linear'"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}), "rope type 'dynamic'"),
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(mlp_bias=True), "mlp_bias=True"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
])
def test_transformers_checkpoints_we_cannot_compute_are_refused(tmp_path, overrides, field):
    save_hf_model(tmp_path, **overrides)
    with pytest.raises(C.CheckpointError, match=f"config.json: {field}"):
        C.load_model(tmp_path)


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True},
                                       {"tie_embeddings": True, "rope_theta": 500000.0,
                                        "rope_scaling": M.RopeScaling(8.0, 1.0, 4.0, 64)},
                                       {"explicit_head_dim": 32}])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, overrides):
    args = M.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, **overrides)
    ours = M.Transformer(args)
    M.init_weights(ours, seed=1, std=0.2)
    C.save_model(ours, tmp_path / "hf", format="hf")
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tied = reference.lm_head.weight.data_ptr() == reference.model.embed_tokens.weight.data_ptr()
    assert tied == args.tie_embeddings
    torch.testing.assert_close(our_logits(ours), hf_logits(reference), rtol=0, atol=1e-4)


@pytest.mark.parametrize("preset", ["llama3.1-8b", "llama3.2-1b", "llama3.2-3b"])
def test_llama3_frequencies_equal_transformers(preset):
    """Our scaled RoPE frequencies against transformers' _compute_llama3_parameters, for each release's config."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    a = M.ModelArgs.from_name(preset)
    s = a.rope_scaling
    config = transformers.LlamaConfig(
        hidden_size=a.dim, num_attention_heads=a.n_heads, max_position_embeddings=a.max_seq_len,
        rope_parameters={"rope_type": "llama3", "rope_theta": a.rope_theta, "factor": s.factor,
                         "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                         "original_max_position_embeddings": s.original_max_seq_len})
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = M.precompute_freqs_cis(a.head_dim, 2, a.rope_theta, scaling=s)[1].angle()  # angles at position 1
    torch.testing.assert_close(ours, inv_freq.float(), rtol=1e-6, atol=0)
