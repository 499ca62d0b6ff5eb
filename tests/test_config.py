from typing import Union, get_args, get_origin

import pytest

from moelab import config as C
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


# Every numeric field of every config class refuses inf and nan, naming the field (StrictModel: allow_inf_nan=False).


MINIMAL = {  # the least each class needs to validate
    C.SourceConfig: {"path": "x.jsonl"},
    C.DataConfig: {"sources": [{"path": "x.jsonl"}]},
    C.TrainConfig: {"train_tokens": 1e6},
    C.RunConfig: {"model": {}, "data": {"sources": [{"path": "x.jsonl"}]}, "train": {"train_tokens": 1e6}},
}
CLASSES = [C.ModelConfig, C.SoftmaxTopKRouterConfig, C.SigmoidBiasRouterConfig, C.SourceConfig, C.TokenizerConfig,
           C.DataConfig, C.SyntheticConfig, C.TrainConfig, C.GRPOConfig]


def _numeric(annotation) -> str | None:
    """'scalar' / 'tuple' for a field holding numbers (int or float, possibly optional or in a union), else None."""
    if annotation in (int, float):
        return "scalar"
    args = get_args(annotation)
    if get_origin(annotation) is tuple:
        return "tuple" if args and all(_numeric(a) == "scalar" for a in args if a is not Ellipsis) else None
    if args and (get_origin(annotation) is Union or type(annotation).__name__ == "UnionType"):
        kinds = {_numeric(a) for a in args if a is not type(None)}
        return "scalar" if kinds == {"scalar"} else None
    if args and hasattr(annotation, "__metadata__"):  # Annotated[int, Gt(0)] (PositiveInt, ...)
        return _numeric(args[0])
    return None


NUMERIC = [(cls, name, kind) for cls in CLASSES for name, f in cls.model_fields.items()
           if (kind := _numeric(f.annotation)) is not None]


def test_the_numeric_field_scan_finds_the_fields_issue_13_names():
    found = {(cls.__name__, name) for cls, name, _ in NUMERIC}
    named = {("TrainConfig", "lr"), ("TrainConfig", "weight_decay"), ("TrainConfig", "train_tokens"),
             ("TrainConfig", "warmup"), ("TrainConfig", "betas"), ("ModelConfig", "rope_theta"),
             ("SigmoidBiasRouterConfig", "bias_update_rate"), ("GRPOConfig", "learning_rate"),
             ("DataConfig", "val_fraction")}
    assert named <= found
    assert len(NUMERIC) > 60


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("cls,name,kind", NUMERIC, ids=[f"{c.__name__}.{n}" for c, n, _ in NUMERIC])
def test_every_numeric_config_field_refuses_non_finite_values(cls, name, kind, value):
    data = {**MINIMAL.get(cls, {}), name: [value, value] if kind == "tuple" else value}
    if cls is C.SigmoidBiasRouterConfig:
        data["type"] = "sigmoid_bias"
    with pytest.raises(ConfigError) as e:
        cls.parse(data, where="cfg.yaml")
    msg = str(e.value)
    assert msg.startswith(f"cfg.yaml: {name}") and "finite" in msg and "\n" not in msg, msg
