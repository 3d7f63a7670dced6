"""Crash-safe small-file writes: readers see the old file or the whole new one."""

import json
import os

import pytest

from pretrain.fileio import json_sha256, write_json_atomic, write_text_atomic


def test_atomic_write_never_leaves_a_partial_file(tmp_path, monkeypatch):
    target = write_text_atomic(tmp_path / "sub" / "report.json", "old")
    assert target.read_text() == "old"

    def crash(src, dst):  # the process dies between writing the temp file and the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(target, "new and much longer")
    assert target.read_text() == "old"  # readers still see the complete old file
    monkeypatch.undo()
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]  # no temp file left behind


def test_write_json_atomic_round_trips_and_passes_options(tmp_path):
    path = write_json_atomic(tmp_path / "m.json", {"b": 1, "a": "é"}, ensure_ascii=False)
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == {"a": "é", "b": 1}
    assert text.index('"a"') < text.index('"b"') and "é" in text  # sorted keys, options honoured


def test_json_sha256_is_the_content_not_the_formatting():
    doc = {"model": {"vocab": {"a": 0, "é": 1}, "merges": ["a b", "b c"]}, "added_tokens": [{"id": 0}]}
    compact = json.dumps(doc).encode()
    resaved = json.dumps(dict(reversed(doc.items())), indent=4, ensure_ascii=True).encode()  # other order, escapes
    assert json_sha256(compact) == json_sha256(resaved)
    # What the file says is the identity: a swapped id or a reordered merge list is another tokenizer.
    swapped = json.dumps({**doc, "model": {**doc["model"], "vocab": {"a": 1, "é": 0}}}).encode()
    reordered = json.dumps({**doc, "model": {**doc["model"], "merges": ["b c", "a b"]}}).encode()
    assert len({json_sha256(compact), json_sha256(swapped), json_sha256(reordered)}) == 3
    with pytest.raises(ValueError):
        json_sha256(b"{not json")
