from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import pytest

from jaxlora.io.configfile import (ConfigError, apply_overrides, dump_config, from_dict, load_config,
                                parse_override, to_dict)


@dataclasses.dataclass(frozen=True)
class Train:
    batch_size: int = 8
    learning_rate: float = 1e-4
    optimizer: Literal["adamw", "sgd"] = "adamw"
    use_bf16: bool = True

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")


@dataclasses.dataclass(frozen=True)
class Lora:
    rank: int = 8
    target_modules: str | list[str] | None = None
    shape: tuple[int, ...] = (1, 2)
    pair: tuple[int, str] = (0, "a")
    alphas: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Eval:
    every: int


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    train: Train = Train()
    lora: Lora = Lora()
    eval: Optional[Eval] = None


def write(tmp_path, text, name="x.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_round_trip(tmp_path):
    cfg = Config(name="run", train=Train(batch_size=4, learning_rate=3e-4, optimizer="sgd"),
                 lora=Lora(target_modules=["q_proj", "v_proj"], shape=(3, 4, 5), pair=(2, "b"),
                           alphas={"q": 1}),
                 eval=Eval(every=10))
    d = to_dict(cfg)
    assert d["lora"]["shape"] == [3, 4, 5] and d["eval"] == {"every": 10}
    assert from_dict(Config, d) == cfg
    path = tmp_path / "out" / "config.yaml"
    dump_config(cfg, path)
    assert load_config(Config, str(path)) == cfg


def test_defaults_and_nested_types():
    cfg = from_dict(Config, {"name": "n", "lora": {"target_modules": "all", "shape": [7]}})
    assert cfg.lora.target_modules == "all" and cfg.lora.shape == (7,)
    assert cfg.train == Train() and cfg.eval is None
    assert from_dict(Config, {"name": "n", "eval": {"every": 2}}).eval == Eval(2)


def test_unknown_key_message(tmp_path):
    path = write(tmp_path, "name: a\ntrain:\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(Config, path)
    msg = str(e.value)
    assert "'train.lerning_rate'" in msg and path in msg
    assert "did you mean 'train.learning_rate'" in msg
    assert "known keys of train: batch_size, learning_rate" in msg


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match="unknown key 'nmae' in c.yaml.*name"):
        from_dict(Config, {"nmae": "x"}, where="c.yaml")


def test_wrong_type_message(tmp_path):
    path = write(tmp_path, "name: a\ntrain:\n  learning_rate: abc\n")
    with pytest.raises(ConfigError) as e:
        load_config(Config, path)
    assert str(e.value) == f"train.learning_rate in {path}: expected float, got str 'abc'"


def test_bool_rejected_for_int_and_float():
    with pytest.raises(ConfigError, match="train.batch_size: expected int, got bool True"):
        from_dict(Config, {"name": "a", "train": {"batch_size": True}})
    with pytest.raises(ConfigError, match="expected float, got bool"):
        from_dict(Config, {"name": "a", "train": {"learning_rate": False}})
    with pytest.raises(ConfigError, match="expected int, got float 2.0"):
        from_dict(Config, {"name": "a", "train": {"batch_size": 2.0}})
    with pytest.raises(ConfigError, match="expected int, got str '2'"):
        from_dict(Config, {"name": "a", "train": {"batch_size": "2"}})


def test_int_accepted_for_float():
    lr = from_dict(Config, {"name": "a", "train": {"learning_rate": 1}}).train.learning_rate
    assert lr == 1.0 and type(lr) is float


def test_literal_union_tuple_dict_errors():
    with pytest.raises(ConfigError, match="train.optimizer: expected one of 'adamw', 'sgd', got str 'adam'"):
        from_dict(Config, {"name": "a", "train": {"optimizer": "adam"}})
    with pytest.raises(ConfigError, match=r"lora.target_modules: expected str \| list\[str\] \| null, got int 5"):
        from_dict(Config, {"name": "a", "lora": {"target_modules": 5}})
    with pytest.raises(ConfigError, match=r"lora.target_modules\[1\]: expected str, got int 3"):
        from_dict(Config, {"name": "a", "lora": {"target_modules": ["q", 3]}})
    with pytest.raises(ConfigError, match=r"lora.shape\[0\]: expected int"):
        from_dict(Config, {"name": "a", "lora": {"shape": ["x"]}})
    with pytest.raises(ConfigError, match="lora.pair: expected 2 items"):
        from_dict(Config, {"name": "a", "lora": {"pair": [1, "a", 2]}})
    with pytest.raises(ConfigError, match="lora.alphas.q: expected int"):
        from_dict(Config, {"name": "a", "lora": {"alphas": {"q": 0.5}}})
    with pytest.raises(ConfigError, match="unknown key 'eval.evry'.*did you mean 'eval.every'"):
        from_dict(Config, {"name": "a", "eval": {"evry": 1}})
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        from_dict(Config, {"name": "a", "train": 3})


def test_missing_required_key():
    with pytest.raises(ConfigError, match="missing required key 'name' in c.yaml"):
        from_dict(Config, {}, where="c.yaml")
    with pytest.raises(ConfigError, match="missing required key 'eval.every'"):
        from_dict(Config, {"name": "a", "eval": {}})


def test_scientific_floats_in_yaml_and_set(tmp_path):
    path = write(tmp_path, "name: a\ntrain:\n  learning_rate: 3e-4\n")
    assert load_config(Config, path).train.learning_rate == pytest.approx(3e-4)
    cfg = load_config(Config, path, ["train.learning_rate=1e-5"])
    assert cfg.train.learning_rate == pytest.approx(1e-5)
    for text, value in [("3e-4", 3e-4), ("5E+2", 500.0), ("1.0e5", 1e5), ("-2e3", -2000.0), (".5", 0.5)]:
        assert parse_override(f"x={text}") == (["x"], value)
    assert parse_override("x=3") == (["x"], 3)
    assert parse_override("x=1e") == (["x"], "1e")


def test_parse_override():
    assert parse_override("train.learning_rate=3e-4") == (["train", "learning_rate"], 3e-4)
    assert parse_override("lora.target_modules=[q_proj,v_proj]") == (
        ["lora", "target_modules"], ["q_proj", "v_proj"])
    assert parse_override("x=null") == (["x"], None)
    assert parse_override("name=a=b") == (["name"], "a=b")
    with pytest.raises(ConfigError, match=r"expected the form --set section.key=value"):
        parse_override("train.learning_rate")
    with pytest.raises(ConfigError, match="expected the form"):
        parse_override("train..lr=1")


def test_apply_overrides_does_not_mutate():
    data = {"train": {"batch_size": 2}, "eval": None}
    out = apply_overrides(data, ["train.batch_size=4", "a.b.c=1", "eval.every=3"])
    assert out == {"train": {"batch_size": 4}, "a": {"b": {"c": 1}}, "eval": {"every": 3}}
    assert data == {"train": {"batch_size": 2}, "eval": None}
    with pytest.raises(ConfigError, match="'train.batch_size' is a int, not a section"):
        apply_overrides(data, ["train.batch_size.x=1"])


def test_list_override(tmp_path):
    path = write(tmp_path, "name: a\nlora:\n  target_modules: all\n")
    cfg = load_config(Config, path, ["lora.target_modules=[q_proj,v_proj]", "lora.shape=[4,4]"])
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.lora.shape == (4, 4)


def test_override_errors_name_set(tmp_path):
    path = write(tmp_path, "name: a\n")
    with pytest.raises(ConfigError) as e:
        load_config(Config, path, ["train.lerning_rate=0.1"])
    assert "unknown key 'train.lerning_rate' in --set train.lerning_rate=0.1" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(Config, path, ["train.learning_rate=abc"])
    assert str(e.value) == ("train.learning_rate in --set train.learning_rate=abc: "
                            "expected float, got str 'abc'")
    cfg = load_config(Config, None, ["name=b", "eval.every=5"])
    assert cfg.name == "b" and cfg.eval == Eval(5)


def test_post_init_error_prefixed(tmp_path):
    path = write(tmp_path, "name: a\ntrain:\n  learning_rate: -1\n")
    with pytest.raises(ConfigError) as e:
        load_config(Config, path)
    assert str(e.value) == f"train in {path}: learning_rate must be positive, got -1.0"
    with pytest.raises(ConfigError, match=r"^train in --set train.learning_rate=-2: learning_rate must be"):
        load_config(Config, None, ["name=a", "train.learning_rate=-2"])
    assert issubclass(ConfigError, ValueError)


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "name: a\ntrain:\n  batch_size: [1, 2\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(Config, path)
    assert str(e.value).startswith(f"{path}:") and "invalid YAML" in str(e.value)
    path = write(tmp_path, "name: a\n  bad: indent\n", "y.yaml")
    with pytest.raises(ConfigError, match=r"y.yaml:2:\d+: invalid YAML"):
        load_config(Config, path)


def test_missing_file_and_bad_top_level(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(Config, str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="top level must be a mapping.*got list"):
        load_config(Config, write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="missing required key 'name'"):
        load_config(Config, write(tmp_path, "", "empty.yaml"))


def test_set_hints_name_real_run_config_keys():
    """Every dotted `--set KEY=...` shown to users (messages, CLI help, docstrings, configs, README, docs) names a
    field of jaxlora.config.RunConfig: a hint with a stale key would send users to an 'unknown key' error."""
    import re
    import typing
    from pathlib import Path

    from jaxlora.config import RunConfig

    def resolve(key: str) -> bool:
        cls = RunConfig
        for part in key.split("."):
            if not dataclasses.is_dataclass(cls):
                return False
            fields = {f.name: f for f in dataclasses.fields(cls)}
            if part not in fields:
                return False
            cls = typing.get_type_hints(cls)[part]
            # an optional section (`corda_config: CordaConfig | None`): its dataclass
            cls = next((a for a in typing.get_args(cls) if dataclasses.is_dataclass(a)), cls)
        return True

    root = Path(__file__).resolve().parent.parent
    files = [*(root / "jaxlora").rglob("*.py"), *(root / "configs").glob("*.yaml"), *(root / "scripts").glob("*.py"),
             *(root / "docs").rglob("*.md"), root / "README.md"]
    try:
        parse_override("optim.learning_rate")
    except ConfigError as e:
        message = str(e)  # the hint a malformed --set gets
    texts = {str(p.relative_to(root)): p.read_text() for p in files if p.exists()}
    texts["parse_override's error"] = message
    hints = {(where, key) for where, text in texts.items()
             for key in re.findall(r"--set[ =]([A-Za-z_][\w]*(?:\.[\w]+)+)=", text) if key != "section.key"}
    assert any(where == "parse_override's error" for where, _ in hints)  # the scan sees the message's example
    assert [h for h in sorted(hints) if not resolve(h[1])] == []


@pytest.mark.parametrize("override,needle", [
    ("train.save_every=-1", "save_every must be >= 0 (0 = only at the end), got -1"),
    ("train.epochs=0", "epochs must be positive, got 0.0"),
    ("train.epochs=-2", "epochs must be positive, got -2.0"),
    ("optim.b2=1.5", "b2 must be in [0, 1), got 1.5"),
    ("optim.b1=-0.1", "b1 must be in [0, 1), got -0.1"),
    ("lora.lora_alpha=0", "lora_alpha must be positive (the adapter's scale is lora_alpha / r), got 0.0"),
])
def test_run_config_refuses_bad_values(override, needle):
    """Values that would be accepted silently and train nonsense (issue 16 items 9 and 13): one clear error each."""
    from jaxlora.config import load_run_config
    with pytest.raises(ConfigError) as e:
        load_run_config(None, [override])
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
