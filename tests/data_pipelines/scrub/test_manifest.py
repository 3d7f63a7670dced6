import json

import pytest

from data_pipelines.loaders import source_summaries
from data_pipelines.scrub.manifest import (
    MANIFEST_NAME,
    ManifestError,
    config_hash,
    read_manifest,
    shard_entry,
    shard_files,
    shard_name,
    write_manifest,
)
from pretrain.config import load_config
from pretrain.errors import UserError


def _make(tmp_path, n_shards=2):
    entries = []
    for i in range(n_shards):
        rel = shard_name(0, i, "jsonl.zst")
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x" * (10 + i))
        entries.append(shard_entry(tmp_path, rel, docs=3 + i))
    m = {
        "config_hash": config_hash({"a": 1}),
        "shards": list(reversed(entries)),
        "documents": {"read": 9, "kept": 7, "dropped": 2},
        "pii": {"placeholders": {"email": "<|email|>"}, "counts": {"email": 1}},
        "filters": {"normalize": "1"},
        "inputs": [],
    }
    write_manifest(tmp_path, m)
    return m


def test_round_trip_and_shard_order(tmp_path):
    _make(tmp_path)
    m = read_manifest(tmp_path, verify="sha256")
    assert m["format_version"] == 1 and m["documents"]["kept"] == 7
    assert [s["path"] for s in m["shards"]] == ["shards/part-00000-00000.jsonl.zst", "shards/part-00000-00001.jsonl.zst"]
    assert m["shards"][1]["bytes"] == 11 and len(m["shards"][0]["sha256"]) == 64
    files = shard_files(tmp_path)
    assert [f.name for f in files] == ["part-00000-00000.jsonl.zst", "part-00000-00001.jsonl.zst"]
    assert all(f.is_absolute() for f in files)
    assert not list(tmp_path.glob(".manifest.json.tmp*"))


def test_config_hash_is_stable_and_sensitive():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_missing_directory_and_manifest(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(ManifestError, match=r"manifest\.json is missing") as e:
        read_manifest(tmp_path)
    assert str(tmp_path) in str(e.value)
    assert isinstance(e.value, UserError)


def test_corrupt_json_names_path(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text('{"format_version": 1,')
    with pytest.raises(ManifestError, match="corrupt") as e:
        read_manifest(tmp_path)
    assert str(tmp_path / MANIFEST_NAME) in str(e.value)
    (tmp_path / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(ManifestError, match="expected a JSON object"):
        read_manifest(tmp_path)


def test_missing_keys_and_wrong_version(tmp_path):
    _make(tmp_path)
    m = json.loads((tmp_path / MANIFEST_NAME).read_text())
    del m["config_hash"]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="missing key.*config_hash"):
        read_manifest(tmp_path)
    m["config_hash"] = "x"
    m["format_version"] = 99
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="format_version 99"):
        read_manifest(tmp_path)


def test_missing_truncated_and_tampered_shards(tmp_path):
    _make(tmp_path)
    shard = tmp_path / shard_name(0, 1, "jsonl.zst")
    shard.write_bytes(b"x" * 5)
    with pytest.raises(ManifestError, match="truncated"):
        read_manifest(tmp_path)
    assert read_manifest(tmp_path, verify="none")["documents"]["read"] == 9
    shard.write_bytes(b"y" * 11)  # same size, different content
    read_manifest(tmp_path)  # the cheap check passes
    with pytest.raises(ManifestError, match="sha256"):
        read_manifest(tmp_path, verify="sha256")
    shard.unlink()
    with pytest.raises(ManifestError, match="is missing"):
        shard_files(tmp_path)


def test_shard_path_must_stay_inside(tmp_path):
    _make(tmp_path)
    m = json.loads((tmp_path / MANIFEST_NAME).read_text())
    m["shards"][0]["path"] = "../evil.parquet"
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="must be relative"):
        read_manifest(tmp_path)


def test_source_summaries_record_scrub_results_and_unscrubbed_sources(tmp_path):
    scrubbed = tmp_path / "scrubbed"
    scrubbed.mkdir()
    (scrubbed / "manifest.json").write_text(json.dumps({
        "documents": {"read": 10, "kept": 7, "dropped": 3},
        "pii": {"placeholders": {"email": "<|email|>"}, "counts": {"email": 4}},
        "filters": {"pii": "1"}, "config_hash": "abc",
    }))
    cfg = load_config(None, [f"data.sources=[{{name: a, path: {scrubbed}}}, {{name: b, path: {tmp_path / 'raw.jsonl'}}}]"])
    a, b = source_summaries(cfg)
    assert a["documents"]["dropped"] == 3 and a["pii_counts"] == {"email": 4}
    assert a["manifest_status"] == "ok" and a["config_hash"] == "abc" and len(a["sha256"]) == 64
    assert b["manifest"] is None and "require_scrubbed=false" in b["manifest_status"]
