import pytest

from moelab.config import ModelConfig, load_yaml
from moelab.errors import ConfigError


@pytest.mark.parametrize(
    "fields,needle",
    [
        ({"n_experts": 2, "top_k": 4}, "top_k (4) must be <= n_experts (2)"),
        ({"d_model": 100, "n_heads": 3}, "d_model (100) must be divisible by n_heads (3)"),
        ({"n_heads": 4, "n_kv_heads": 3}, "n_heads (4) must be divisible by n_kv_heads (3)"),
        ({"d_model": 0}, "d_model:"),
        ({"top_k": -1}, "top_k:"),
        ({"vocab_size": "many"}, "vocab_size:"),
        ({"d_model": 12, "n_heads": 4}, "head_dim (3) must be even"),
        ({"moe_backend": "cuda_magic"}, "moe_backend:"),
        ({"n_expert": 8}, "n_expert: unknown key"),
    ],
)
def test_invalid_configs_name_the_field(fields, needle):
    with pytest.raises(ConfigError) as e:
        ModelConfig.parse(fields)
    msg = str(e.value)
    assert needle in msg
    assert "\n" not in msg


def test_replace_revalidates():
    cfg = ModelConfig()
    assert cfg.replace(top_k=4).top_k == 4
    with pytest.raises(ConfigError):
        cfg.replace(top_k=16)


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_yaml(lst)
