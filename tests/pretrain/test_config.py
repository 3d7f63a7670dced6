"""The config schema and loader: inheritance, overrides, and every class of user error."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pretrain.config import Config, deep_merge, load_config, reference_markdown, save_resolved
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



def test_deep_merge_semantics():
    """The one merge (YAML extends, overrides, deepspeed.extra over the DeepSpeed config)."""
    base = {"a": 1, "nested": {"x": 1, "deep": {"p": 1, "q": 2}}, "lst": [1, 2], "swap": {"k": 1}}
    top = {"a": 2, "nested": {"deep": {"q": 3}, "y": 5}, "lst": [9], "swap": 7, "new": {"n": [1]}}
    out = deep_merge(base, top)
    assert out == {"a": 2, "nested": {"x": 1, "y": 5, "deep": {"p": 1, "q": 3}}, "lst": [9], "swap": 7,
                   "new": {"n": [1]}}  # scalars and lists replaced, dicts merged key by key
    assert deep_merge({"k": 1}, {"k": {"d": 1}}) == {"k": {"d": 1}}  # a dict replaces a scalar
    # Neither input changes, and the result shares no container with them (the engine edits it).
    assert base["nested"] == {"x": 1, "deep": {"p": 1, "q": 2}} and base["lst"] == [1, 2]
    out["nested"]["x"] = 100
    out["new"]["n"].append(2)
    out["lst"].append(3)
    assert base["nested"]["x"] == 1 and top["new"] == {"n": [1]} and top["lst"] == [9]
    assert deep_merge(base, {})["nested"] is not base["nested"]


@pytest.mark.parametrize("form", ["data.sources[{i}].{k}={v}", "data.sources.{i}.{k}={v}"])
def test_override_one_list_item_both_forms(tmp_path, form):
    f = write(tmp_path / "c.yaml", "data:\n  sources:\n    - {name: a, path: /d/a, weight: 2}\n    - {name: b, path: /d/b}\n")
    cfg = load_config(f, [form.format(i=1, k="path", v="/data/other"), form.format(i=0, k="weight", v="0.5")])
    assert [(s.name, s.path, s.weight) for s in cfg.data.sources] == [("a", "/d/a", 0.5), ("b", "/data/other", 1.0)]
    # without a file the schema's default list is the base
    assert load_config(None, [form.format(i=0, k="path", v="/x")]).data.sources[0].path == "/x"


def test_list_item_override_sees_earlier_overrides():
    cfg = load_config(None, ["data.validation=[{name: v, path: /v}]", "data.validation[0].weight=3",
                             "data.sources[0]={path: /p, text_field: body}"])
    assert [(s.name, s.path, s.weight) for s in cfg.data.validation] == [("v", "/v", 3.0)]
    assert (cfg.data.sources[0].path, cfg.data.sources[0].text_field, cfg.data.sources[0].name) == ("/p", "body", "main")



def test_override_one_item_of_a_list_of_values():
    cfg = load_config(None, ["scrub.inputs=[a.jsonl, b.jsonl]", "scrub.inputs[1]=c.jsonl",
                             "scrub.quality.max_top_ngram_char_frac.2=0.5"])
    assert cfg.scrub.inputs == ["a.jsonl", "c.jsonl"]
    assert cfg.scrub.quality.max_top_ngram_char_frac == [0.20, 0.18, 0.5]
    msg = errors_of(lambda: load_config(None, ["scrub.quality.max_top_ngram_char_frac[0]=abc"]))
    assert msg == "config error: scrub.quality.max_top_ngram_char_frac[0]: expected float; got 'abc' (str)"

@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.sources[0].weight=-1", "data.sources[0].weight: expected a value > 0; got -1.0"),
        ("data.sources[0].weight=abc", "data.sources[0].weight: expected float; got 'abc' (str)"),
        ("data.sources.0.weight=abc", "data.sources[0].weight: expected float; got 'abc' (str)"),
        ("data.sources=[{name: a}, {weight: abc}]", "data.sources[1].weight: expected float; got 'abc' (str)"),
        ("data.sources[1].path=/x", "override 'data.sources[1].path=/x': index 1 is out of range; data.sources has 1 item(s)"),
        ("data.validation.0.path=/x", "index 0 is out of range; data.validation has 0 item(s)"),
        ("data.sources[0].pth=/x", "unknown key 'data.sources[0].pth' (command-line override); did you mean 'data.sources[0].path'?"),
        ("data.sources.0.pth=/x", "unknown key 'data.sources[0].pth'"),
        ("data.sources[0]=5", "data.sources[0]: expected SourceConfig; got 5 (int)"),
        ("data.sources=[{name: a}, x]", "data.sources[1]: expected SourceConfig; got 'x' (str)"),
        ("data.sources.path=/x", "data.sources is a list; address one item by its index, e.g. data.sources[0].path"),
    ],
)
def test_list_item_override_errors_name_the_item(override, expected):
    msg = errors_of(lambda: load_config(None, [override]))
    assert expected in msg and "\n" not in msg


def test_type_error_in_a_file_list_item_names_the_index(tmp_path):
    f = write(tmp_path / "c.yaml", "data:\n  sources:\n    - {name: a, path: /a}\n    - {name: b, weight: heavy}\n")
    msg = errors_of(lambda: load_config(f, ["data.sources[0].path=/other"]))
    assert msg == "config error: data.sources[1].weight: expected float; got 'heavy' (str)"  # once, not per override

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


def test_checkpoint_allow_changes_takes_only_the_allowable_settings():
    from pretrain.config import RESUME_ALLOWABLE

    assert load_config(None, ["checkpoint.allow_changes=[data.tokenizer,model.rope_theta]"]).checkpoint.allow_changes \
        == ["data.tokenizer", "model.rope_theta"]
    msg = errors_of(lambda: load_config(None, ["checkpoint.allow_changes=[data.tokenizer,model.n_layers,data.tokeniser]"]))
    assert "checkpoint.allow_changes: model.n_layers, data.tokeniser cannot be allowed" in msg
    assert all(k in msg for k in RESUME_ALLOWABLE)  # the message lists what may be allowed


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
    msg = errors_of(lambda: load_config(bad))
    assert "bad.yaml" in msg and "line 1" in msg and "\n" not in msg  # where, on one line
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


def test_configuration_reference_is_current():
    """docs/configuration.md embeds the generated reference; regenerate with `make docs-config`."""
    readme = (REPO / "docs" / "configuration.md").read_text()
    begin, end = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"
    assert begin in readme and end in readme
    embedded = readme.split(begin, 1)[1].split(end, 1)[0].strip()
    assert embedded == reference_markdown().strip(), "docs/configuration.md is stale: run `make docs-config`"


def test_every_shipped_config_loads():
    configs = sorted((REPO / "configs").rglob("*.yaml"))
    assert configs, "configs/ holds no YAML"
    for path in configs:
        load_config(path, world_size=1)
