"""HF Mixtral interop: our model and transformers' MixtralForCausalLM compute the same logits, both directions.

Why these hold on any x86-64 CPU: untrained, seeded models; logits compared within 1e-5; before each comparison
``assert_router_margin`` checks that no routing decision is within 1e-6 of a tie (tests/routerlib.py), so the
two implementations' different rounding cannot send a token to different experts.
"""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

from moelab.errors import CheckpointError
from moelab.hf import from_hf_config, to_hf_config
from moelab.model import MoETransformer

from conftest import tiny_config
from routerlib import assert_router_margin

CONFIGS = [
    dict(),  # GQA 4/2, E=8, k=2
    dict(n_kv_heads=None, n_experts=4, top_k=1),  # full MHA, top-1
    dict(vocab_size=257, n_experts=16, top_k=4, n_layers=3),  # odd vocab, more experts
    dict(n_kv_heads=1, n_experts=3, top_k=3, ffn_hidden=40),  # MQA, dense-equivalent routing (k = E)
    dict(head_dim=24, n_heads=2, n_kv_heads=2),  # head_dim != d/heads (like Mixtral 8x7B's explicit head_dim)
]


def _rand_ids(cfg, B=3, T=17):
    return torch.randint(0, cfg.vocab_size, (B, T))


@pytest.mark.parametrize("overrides", CONFIGS)
def test_ours_to_transformers_logits_equal(tmp_path, overrides):
    cfg = tiny_config(**overrides)
    ours = MoETransformer(cfg).eval()
    ours.save_pretrained(tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(theirs, MixtralForCausalLM)
    ids = _rand_ids(cfg)
    assert_router_margin(ours, ids)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides", CONFIGS)
def test_transformers_to_ours_logits_equal(tmp_path, overrides):
    cfg = tiny_config(**overrides)
    hf_cfg = MixtralConfig(**{k: v for k, v in to_hf_config(cfg).items() if k not in ("moelab", "architectures")})
    theirs = MixtralForCausalLM(hf_cfg).eval()  # transformers' own random init
    theirs.save_pretrained(tmp_path)
    ours = MoETransformer.from_pretrained(tmp_path).eval()
    keys = ("d_model", "n_layers", "n_heads", "kv_heads", "head_size", "ffn_hidden", "n_experts", "top_k", "vocab_size",
            "rope_theta", "norm_eps")
    assert [getattr(ours.cfg, k) for k in keys] == [getattr(cfg, k) for k in keys]
    ids = _rand_ids(cfg)
    assert_router_margin(ours, ids)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)


def test_loads_fused_v5_layout_and_sharded_checkpoints(tmp_path):
    cfg = tiny_config()
    theirs = MixtralForCausalLM(MixtralConfig(**{k: v for k, v in to_hf_config(cfg).items() if k != "moelab"})).eval()
    ids = _rand_ids(cfg)
    with torch.no_grad():
        ref = theirs(ids).logits
    # transformers 5's in-memory (fused) names, as some converters write them.
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, fused / "model.safetensors")
    (fused / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    assert any(".mlp.experts.gate_up_proj" in k for k in theirs.state_dict())
    # A sharded directory with an index.
    sharded = tmp_path / "sharded"
    theirs.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    for d in (fused, sharded):
        with torch.no_grad():
            torch.testing.assert_close(MoETransformer.from_pretrained(d).eval()(ids).logits, ref, atol=1e-5, rtol=0)


def test_save_dtype_and_roundtrip_exact(tmp_path):
    cfg = tiny_config()
    m = MoETransformer(cfg)
    m.save_pretrained(tmp_path / "a")
    m2 = MoETransformer.from_pretrained(tmp_path / "a")
    for (n, p), (n2, p2) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert n == n2 and torch.equal(p, p2)
    m.save_pretrained(tmp_path / "b", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "bfloat16"
    m3 = MoETransformer.from_pretrained(tmp_path / "b", dtype=torch.bfloat16)
    assert next(m3.parameters()).dtype == torch.bfloat16
    assert not list((tmp_path / "a").glob("*.tmp")), "no temp files left behind"


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        MoETransformer.from_pretrained(tmp_path)
    cfg = tiny_config()
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        MoETransformer.from_pretrained(tmp_path)
    save_file({"model.embed_tokens.weight": torch.zeros(cfg.vocab_size, cfg.d_model)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor 'model.norm.weight'"):
        MoETransformer.from_pretrained(tmp_path)
    save_file({"model.embed_tokens.weight": torch.zeros(3, 3)}, tmp_path / "model.safetensors")
    m = MoETransformer(cfg)
    m.save_pretrained(tmp_path / "ok")
    bad = to_hf_config(cfg) | {"hidden_size": 32, "head_dim": 16}
    (tmp_path / "ok" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="has shape"):
        MoETransformer.from_pretrained(tmp_path / "ok")


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"sliding_window": 4096}, "sliding_window"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_type"),
        ({"num_experts_per_tok": 9}, "top_k (9) must be <= n_experts (8)"),
        ({"model_type": "llama"}, "model_type"),
    ],
)
def test_unsupported_hf_configs_refused(change, needle):
    hf = to_hf_config(tiny_config()) | change
    with pytest.raises(CheckpointError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        from_hf_config(hf)


def test_special_token_ids_follow_the_tokenizer(tmp_path):
    """config.json carries the tokenizer's eos/pad ids (null without a tokenizer, never MixtralConfig's 1/2), so
    transformers' generate stops at our EOS."""
    from transformers import AutoConfig

    from moelab.data import Tokenizer
    from moelab.hf import copy_tokenizer_files

    tok = Tokenizer.train_bpe([f"line {i} of some text" for i in range(200)], vocab_size=300, min_frequency=1)
    tok_dir = tok.save(tmp_path / "tok")
    model = MoETransformer(tiny_config())
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    bare = AutoConfig.from_pretrained(ckpt)
    assert bare.eos_token_id is None and bare.bos_token_id is None and bare.pad_token_id is None
    copy_tokenizer_files(tok_dir, ckpt)
    cfg = AutoConfig.from_pretrained(ckpt)
    assert (cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id) == (tok.eos_id, tok.pad_id, None)
    assert tok.eos_id != 2  # MixtralConfig defaults to eos 2: the check above must come from the tokenizer
    # and our loader still reads the directory
    assert MoETransformer.from_pretrained(ckpt).cfg == model.cfg
