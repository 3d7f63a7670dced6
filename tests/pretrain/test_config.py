"""The config schema and loader: inheritance, overrides, and every class of user error."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pretrain.config import Config, load_config, reference_markdown, save_resolved
from pretrain.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def errors_of(fn) -> str:
    with pytest.raises(ConfigError) as e:
        fn()
    return str(e.value)


def test_defaults_are_valid():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert cfg.model.n_layers == 6
    assert cfg.run.dir == "runs/run"  # interpolation resolved
    assert cfg.checkpoint.dir == "runs/run/checkpoints"


def test_yaml_inheritance_and_override_order(tmp_path):
    write(tmp_path / "base.yaml", "model: {n_layers: 2, d_model: 64, n_heads: 4}\nrun: {name: base}\n")
    write(tmp_path / "mid/mid.yaml", "extends: ../base.yaml\nmodel: {n_layers: 3}\ntrain: {max_steps: 7}\n")
    child = write(tmp_path / "child.yaml", "extends: [mid/mid.yaml]\nmodel: {n_heads: 8}\n")
    cfg = load_config(child, ["model.n_layers=5", "run.name=x"])
    assert cfg.model.n_layers == 5  # command line wins over every file
    assert cfg.model.n_heads == 8  # child wins over parents
    assert cfg.model.d_model == 64  # inherited from the grandparent
    assert cfg.train.max_steps == 7
    assert cfg.run.dir == "runs/x"  # interpolation sees the override


def test_lists_of_sources_and_passthrough_dict(tmp_path):
    f = write(
        tmp_path / "c.yaml",
        "data:\n  sources:\n    - {name: a, path: /d/a, weight: 2}\n    - {name: b, path: /d/b}\n"
        "deepspeed:\n  extra: {zero_optimization: {round_robin_gradients: true}}\n",
    )
    cfg = load_config(f)
    assert [s.name for s in cfg.data.sources] == ["a", "b"]
    assert cfg.data.sources[0].weight == 2.0 and cfg.data.sources[1].weight == 1.0
    assert cfg.deepspeed.extra == {"zero_optimization": {"round_robin_gradients": True}}


def test_unknown_key_names_full_key_and_suggests():
    msg = errors_of(lambda: load_config(None, ["model.n_layerz=3"]))
    assert "model.n_layerz" in msg and "did you mean 'model.n_layers'" in msg


def test_unknown_key_in_file_names_file(tmp_path):
    f = write(tmp_path / "c.yaml", "optim:\n  lr_min: 0.1\n")
    msg = errors_of(lambda: load_config(f))
    assert "optim.lr_min" in msg and str(f) in msg and "optim.min_lr" in msg


def test_unknown_key_inside_list_item():
    msg = errors_of(lambda: load_config(None, ["data.sources=[{name: a, pth: x}]"]))
    assert "data.sources[0].pth" in msg and "data.sources[0].path" in msg


def test_unknown_section():
    msg = errors_of(lambda: load_config(None, ["modle.n_layers=3"]))
    assert "modle" in msg


def test_wrong_type_names_key_expected_and_given():
    msg = errors_of(lambda: load_config(None, ["model.n_layers=abc"]))
    assert "model.n_layers" in msg and "expected int" in msg and "'abc'" in msg


def test_out_of_range_and_choices():
    msg = errors_of(lambda: load_config(None, ["model.n_layers=0", "train.precision=bf32"]))
    assert "model.n_layers: expected a value >= 1; got 0" in msg
    assert "train.precision" in msg and "bf16, fp16, fp32" in msg and "bf32" in msg


@pytest.mark.parametrize(
    "overrides, keys",
    [
        (["model.d_model=100", "model.n_heads=6"], ["model.d_model", "model.n_heads"]),
        (["model.n_heads=6", "model.n_kv_heads=4"], ["model.n_heads", "model.n_kv_heads"]),
        (["data.seq_len=2048", "model.max_seq_len=1024"], ["data.seq_len", "model.max_seq_len"]),
        (
            ["train.global_batch_size=32", "train.micro_batch_size=8", "train.grad_accum_steps=2"],
            ["train.global_batch_size", "train.micro_batch_size", "train.grad_accum_steps", "data-parallel size"],
        ),
        (["deepspeed.offload_params=true", "deepspeed.zero_stage=2"], ["deepspeed.offload_params", "deepspeed.zero_stage"]),
        (["optim.min_lr=0.1", "optim.lr=0.01"], ["optim.min_lr", "optim.lr"]),
    ],
)
def test_cross_field_rules_name_every_key(overrides, keys):
    msg = errors_of(lambda: load_config(None, overrides, world_size=1))
    for k in keys:
        assert k in msg


def test_global_batch_uses_world_size():
    ok = ["train.global_batch_size=32", "train.micro_batch_size=8", "train.grad_accum_steps=2"]
    assert load_config(None, ok, world_size=2).train.global_batch_size == 32
    with pytest.raises(ConfigError):
        load_config(None, ok, world_size=1)


def test_all_problems_reported_at_once():
    msg = errors_of(lambda: load_config(None, ["model.n_layers=0", "optim.lr=-1", "model.n_kv_heads=4"]))
    assert "3 problems" in msg or msg.count("\n  - ") >= 3


def test_missing_and_unreadable_files(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert str(missing) in errors_of(lambda: load_config(missing))
    parent_missing = write(tmp_path / "c.yaml", "extends: gone.yaml\n")
    msg = errors_of(lambda: load_config(parent_missing))
    assert "gone.yaml" in msg and "c.yaml" in msg
    bad = write(tmp_path / "bad.yaml", "model: [unclosed\n")
    assert "bad.yaml" in errors_of(lambda: load_config(bad))
    listy = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    assert "mapping" in errors_of(lambda: load_config(listy))


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    assert "cycle" in errors_of(lambda: load_config(tmp_path / "a.yaml"))


def test_malformed_override():
    assert "key=value" in errors_of(lambda: load_config(None, ["model.n_layers"]))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.n_layers=3", "run.name=rt"])
    path = save_resolved(cfg, tmp_path)
    again = load_config(path)
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_every_key_has_help():
    ref = reference_markdown()
    assert "| `model.n_layers` | `6` |" in ref
    assert "||" not in ref.replace("|---|---|---|", "")  # no empty help cell


def test_readme_reference_is_current():
    """README.md embeds the generated reference; regenerate with `make readme-config`."""
    readme = (REPO / "README.md").read_text()
    begin, end = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"
    assert begin in readme and end in readme
    embedded = readme.split(begin, 1)[1].split(end, 1)[0].strip()
    assert embedded == reference_markdown().strip(), "README config reference is stale: run `make readme-config`"


def test_every_shipped_config_loads():
    configs = sorted((REPO / "configs").rglob("*.yaml"))
    assert configs, "configs/ holds no YAML"
    for path in configs:
        load_config(path, world_size=1)
