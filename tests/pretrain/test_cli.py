"""The command lines: user errors exit 2 with one message and no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def any_config() -> Path:
    configs = sorted((REPO / "configs").rglob("*.yaml"))
    return configs[0] if configs else REPO / "configs" / "demo.yaml"


def test_help_lists_subcommands():
    out = run("-m", "pretrain", "--help").stdout
    for cmd in ("train", "bench", "plan", "audit", "export", "generate"):
        assert cmd in out
    out = run("-m", "data_pipelines", "--help").stdout
    for cmd in ("scrub", "train-tokenizer", "pretokenize", "eval-pii", "bench"):
        assert cmd in out


def test_typo_in_override_exits_2_with_suggestion(any_config):
    p = run("-m", "pretrain", "train", str(any_config), "model.n_layerz=3")
    assert p.returncode == 2
    assert "model.n_layerz" in p.stderr and "model.n_layers" in p.stderr
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["train", "plan"])
def test_validation_happens_before_heavy_imports(any_config, command):
    """A bad config must be rejected without importing torch or deepspeed (seconds, not minutes)."""
    code = (
        "import sys\n"
        "from pretrain.__main__ import main\n"
        "try:\n"
        f"    main([{command!r}, {str(any_config)!r}, 'model.n_layers=-1'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 2, e.code\n"
        "assert 'torch' not in sys.modules and 'deepspeed' not in sys.modules, 'heavy import before validation'\n"
    )
    p = run("-c", code)
    assert p.returncode == 0, p.stderr


def test_missing_config_file_exits_2(tmp_path):
    p = run("-m", "pretrain", "train", str(tmp_path / "missing.yaml"))
    assert p.returncode == 2 and "missing.yaml" in p.stderr and "Traceback" not in p.stderr


def test_audit_without_a_complete_checkpoint_exits_2_naming_it(tmp_path):
    p = run("-m", "pretrain", "audit", str(REPO / "configs" / "demo.yaml"), f"run.dir={tmp_path / 'run'}")
    assert "run/checkpoints" in one_line_error(p) and "does not exist" in p.stderr
    (tmp_path / "run" / "checkpoints" / "step_00000001").mkdir(parents=True)
    p = run("-m", "pretrain", "audit", str(REPO / "configs" / "demo.yaml"), f"run.dir={tmp_path / 'run'}",
            f"audit.checkpoint={tmp_path / 'run'}", f"scrub.output={tmp_path / 'scrubbed'}")
    assert "none is complete" in one_line_error(p)


def test_print_config_prints_resolved_yaml_and_exits(any_config):
    p = run("-m", "pretrain", "train", str(any_config), "run.name=printed", "--print-config")
    assert p.returncode == 0, p.stderr
    assert "name: printed" in p.stdout and "model:" in p.stdout


def test_data_pipelines_config_errors_exit_2(any_config):
    p = run("-m", "data_pipelines", "scrub", str(any_config), "scrub.workerz=2")
    assert p.returncode == 2 and "scrub.workers" in p.stderr


def test_deepspeed_launcher_local_rank_argument_is_accepted(any_config):
    p = run("-m", "pretrain", "--local_rank=0", "train", str(any_config), "run.name=ranked", "--print-config")
    assert p.returncode == 0, p.stderr
    assert "name: ranked" in p.stdout and "model:" in p.stdout and "local_rank" not in p.stdout


def test_overrides_may_follow_options(any_config):
    """`bench loader --config X key=value`: the override after the option is still read."""
    p = run("-m", "data_pipelines", "bench", "loader", "--config", str(any_config), "data.seq_lenn=8")
    assert p.returncode == 2 and "data.seq_lenn" in p.stderr and "data.seq_len" in p.stderr


@pytest.mark.parametrize("cmd", [("pretrain", "train"), ("pretrain", "bench"), ("pretrain", "audit"),
                                 ("data_pipelines", "scrub")])
def test_usage_without_config_names_only_the_config(cmd):
    """Overrides are optional: the usage error must not call them required."""
    p = run("-m", *cmd)
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert last.endswith("error: the following arguments are required: config"), p.stderr
    assert "[overrides ...]" in p.stderr and "Traceback" not in p.stderr


def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    return p.stderr.strip()


@pytest.mark.parametrize("key", ["data.sources[0].path", "data.sources.0.path"])
def test_override_of_one_list_item(tmp_path, key):
    """`data.sources[0].path=...` (both omegaconf forms) changes that item only."""
    cfg = tmp_path / "my_run.yaml"
    cfg.write_text("data:\n  sources:\n    - {name: web, path: /data/web, weight: 3}\n    - {name: books, path: /data/books}\n")
    p = run("-m", "pretrain", "train", str(cfg), f"{key}=/data/other", "--print-config")
    assert p.returncode == 0, p.stderr
    assert "path: /data/other" in p.stdout and "path: /data/web" not in p.stdout
    assert "name: web" in p.stdout and "weight: 3.0" in p.stdout and "path: /data/books" in p.stdout


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.sources[5].path=/x", "config error: override 'data.sources[5].path=/x': index 5 is out of range; data.sources has 1 item(s)"),
        ("data.sources[0].pth=/x", "config error: unknown key 'data.sources[0].pth' (command-line override); did you mean 'data.sources[0].path'?"),
        ("data.sources.0.weight=-2", "config error: data.sources[0].weight: expected a value > 0; got -2.0"),
    ],
)
def test_bad_list_item_override_exits_2_with_one_line(tmp_path, override, expected):
    cfg = tmp_path / "one_source.yaml"
    cfg.write_text("data:\n  sources:\n    - {name: web, path: /data/web}\n")
    msg = one_line_error(run("-m", "pretrain", "train", str(cfg), override))
    assert msg.startswith(expected), msg
    msg = one_line_error(run("-m", "data_pipelines", "scrub", str(cfg), override))
    assert msg.startswith(expected), msg
