import dataclasses
import gzip
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_pipelines.scrub.readers import read_unit, resolve_inputs, wiki_to_text
from pretrain.config import ScrubConfig
from pretrain.errors import UserError

GOOD = [{"id": f"d{i}", "text": f"document number {i}", "lang": "en"} for i in range(3)]


def cfg(inputs, **kw) -> ScrubConfig:
    return dataclasses.replace(ScrubConfig(), inputs=[str(i) for i in inputs], **kw)


def records(c: ScrubConfig) -> list:
    return [r for u in resolve_inputs(c) for r in read_unit(u, c)]


def malformed_jsonl_bytes() -> bytes:
    lines = [json.dumps(d).encode() for d in GOOD]
    lines += [
        b'{"id": "bad", "text": ',  # truncated JSON
        b'{"id": "nt"}',  # missing text
        b'{"id": "num", "text": 42}',  # non-string text
        b'{"id": "null", "text": null}',  # null text counts as missing
        b'[1, 2, 3]',  # JSON but not an object
        b'',  # blank line: not a record
        b'{"id": "big", "text": "' + b"x" * 300 + b'"}',  # over max_doc_bytes=200
        b'{"id": "bytes", "text": "caf\xe9 \xff ok"}',  # invalid UTF-8 inside
    ]
    return b"\n".join(lines) + b"\n"


def test_jsonl_malformed_records_are_reported_not_raised(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(malformed_jsonl_bytes())
    recs = records(cfg([p], max_doc_bytes=200))
    errors = [(r.id, r.error) for r in recs if r.error]
    assert errors == [("a.jsonl:4", "bad_json"), ("nt", "missing_text"), ("num", "non_string_text"),
                      ("null", "missing_text"), ("a.jsonl:8", "bad_json"), ("a.jsonl:10", "too_large")]
    good = [r for r in recs if not r.error]
    assert [r.id for r in good] == ["d0", "d1", "d2", "bytes"]
    assert good[0].text == "document number 0" and good[0].meta == {"lang": "en"}
    # undecodable bytes survive as lone surrogates for normalize to count and repair
    assert "\udce9" in good[3].text and "\udcff" in good[3].text


def test_compressed_jsonl_read_identically(tmp_path):
    raw = malformed_jsonl_bytes()
    (tmp_path / "a.jsonl").write_bytes(raw)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    per_file = {}
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst"):
        per_file[name] = [(r.id.split(":")[-1], r.text, r.error) for r in records(cfg([tmp_path / name], max_doc_bytes=200))]
    assert per_file["a.jsonl"] == per_file["b.jsonl.gz"] == per_file["c.jsonl.zst"]


def test_byte_order_mark_is_not_a_bad_record(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD[0]).encode() + b"\n")
    (rec,) = records(cfg([p]))
    assert rec.error is None and rec.id == "d0"


def test_text_field_and_id_field(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"key": "k1", "content": "hello"}) + "\n" + json.dumps({"content": "bye"}) + "\n")
    recs = records(cfg([p], text_field="content", id_field="key"))
    assert [(r.id, r.text) for r in recs] == [("k1", "hello"), ("x.jsonl:2", "bye")]


def test_parquet_and_text_files(tmp_path):
    pq.write_table(pa.table({"id": ["p0", "p1", "p2"], "text": ["alpha", None, "gamma"], "n": [1, 2, 3]}),
                   tmp_path / "t.parquet")
    pq.write_table(pa.table({"id": ["q0"], "text": [7]}), tmp_path / "u.parquet")
    (tmp_path / "doc.txt").write_bytes(b"line one\nline two\n\xff end\n")
    recs = records(cfg([tmp_path / "t.parquet", tmp_path / "u.parquet", tmp_path / "doc.txt"]))
    assert [(r.id, r.error) for r in recs] == [("p0", None), ("p1", "missing_text"), ("p2", None),
                                               ("q0", "non_string_text"), ("doc.txt", None)]
    assert recs[0].meta == {"n": 1}
    assert recs[-1].text == "line one\nline two\n\udcff end\n"


def test_directories_globs_order_and_errors(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    for name in ("b.jsonl", "a.jsonl", "sub/c.jsonl"):
        (d / name).write_text(json.dumps({"text": name}) + "\n")
    units = resolve_inputs(cfg([d]))
    assert [u.path.split("corpus/")[1] for u in units] == ["a.jsonl", "b.jsonl", "sub/c.jsonl"]
    assert [u.index for u in units] == [0, 1, 2] and len({u.key for u in units}) == 3
    assert len(resolve_inputs(cfg([f"{d}/*.jsonl"]))) == 2
    with pytest.raises(UserError, match="does not exist"):
        resolve_inputs(cfg([tmp_path / "missing.jsonl"]))
    with pytest.raises(UserError, match="matches no files"):
        resolve_inputs(cfg([f"{d}/*.parquet"]))
    (d / "weird.bin").write_text("x")
    with pytest.raises(UserError, match="weird.bin"):
        resolve_inputs(cfg([d]))
    with pytest.raises(UserError, match="unknown builtin"):
        resolve_inputs(cfg(["builtin:nope"]))


def test_hf_dataset_name_path_offline(tmp_path):
    """The hf: code path (load_dataset(NAME, streaming=True)) on a local dataset directory."""
    d = tmp_path / "my_dataset"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    c = cfg([f"hf:{d}"], hf_split="train")
    (unit,) = resolve_inputs(c)
    assert unit.kind == "hf"
    assert [(r.id, r.text) for r in read_unit(unit, c)] == [(g["id"], g["text"]) for g in GOOD]
    # a dataset with several data files becomes one unit per file (shared out to workers)
    (d / "train-2.jsonl").write_text(json.dumps({"id": "e", "text": "extra", "lang": "en"}) + "\n")
    units = resolve_inputs(c)
    assert [(u.part, u.parts) for u in units] == [(0, 2), (1, 2)] and len({u.key for u in units}) == 2
    assert sorted(r.id for u in units for r in read_unit(u, c)) == ["d0", "d1", "d2", "e"]
    with pytest.raises(UserError, match="hf:"):
        resolve_inputs(cfg([f"hf:{tmp_path / 'nothing_here'}"]))


def test_wiki_markup_stripped():
    markup = "'''Bold''' and ''italic'' text ( ) here.\n\n==History==\nSome [[link|words]] {{cite}} remain.\n\n\n\nEnd."
    text = wiki_to_text(markup)
    assert "'''" not in text and "''" not in text and "==" not in text and "( )" not in text
    assert "Bold and italic text" in text and "\nHistory\n" in text and "words" in text
    assert "\n\n\n" not in text


def test_text_file_over_the_cap_is_counted_without_being_loaded(tmp_path, monkeypatch):
    body = ("word " * 100).encode()  # 500 bytes
    (tmp_path / "big.txt").write_bytes(body)
    (tmp_path / "big.txt.gz").write_bytes(gzip.compress(body))
    (tmp_path / "big.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(body))
    (tmp_path / "ok.txt.gz").write_bytes(gzip.compress(b"line one\r\nline two\n\xff end\n"))
    import data_pipelines.scrub.readers as readers

    def no_hf():
        raise AssertionError("an oversized plain text file must not be opened")

    monkeypatch.setattr(readers, "_hf", no_hf)
    recs = records(cfg([tmp_path / n for n in ("big.txt", "big.txt.gz", "big.txt.zst", "ok.txt.gz")], max_doc_bytes=499))
    assert [(r.error, r.nbytes) for r in recs[:3]] == [("too_large", 500)] * 3
    # compressed and plain text files give the same text (line breaks and bad bytes kept for normalize)
    assert recs[3].error is None and recs[3].text == "line one\r\nline two\n\udcff end\n"
    assert [r.error for r in records(cfg([tmp_path / "big.txt.gz"], max_doc_bytes=500))] == [None]


def test_corrupt_or_truncated_file_is_a_user_error_naming_it(tmp_path):
    rows = b"".join(json.dumps({"id": i, "text": "hello world " * 50}).encode() + b"\n" for i in range(2000))
    gz = gzip.compress(rows)
    (tmp_path / "cut.jsonl.gz").write_bytes(gz[: len(gz) // 2])  # an interrupted download
    zst = zstandard.ZstdCompressor().compress(rows)
    (tmp_path / "cut.jsonl.zst").write_bytes(zst[: len(zst) // 2])
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really parquet")
    for name in ("cut.jsonl.gz", "cut.jsonl.zst", "bad.parquet"):
        with pytest.raises(UserError, match=rf"{tmp_path / name} is corrupt or truncated after \d+ record"):
            records(cfg([tmp_path / name]))
    # an intact file of two zstd frames (as `cat a.zst b.zst` makes) is read to the end
    half = rows.index(b"\n", len(rows) // 2) + 1
    c = zstandard.ZstdCompressor()
    (tmp_path / "two.jsonl.zst").write_bytes(c.compress(rows[:half]) + c.compress(rows[half:]))
    assert [r.id for r in records(cfg([tmp_path / "two.jsonl.zst"]))] == [str(i) for i in range(2000)]


def test_oversized_parquet_row_without_id_is_named_by_position(tmp_path):
    pq.write_table(pa.table({"id": ["a", None], "text": ["x" * 300, "y" * 300]}), tmp_path / "t.parquet")
    recs = records(cfg([tmp_path / "t.parquet"], max_doc_bytes=200))
    assert [(r.id, r.error) for r in recs] == [("a", "too_large"), ("t.parquet:1", "too_large")]  # not "None"


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_multi_mb_line_is_too_large_without_being_held(tmp_path, suffix):
    """A 40 MB record with max_doc_bytes=1000 is counted as too_large while Python never holds
    more than a few MB (tracemalloc peak), and the records around it still read."""
    big = b'{"id": "big", "text": "' + b"x" * (40 << 20) + b'"}'
    body = b'{"id": "a", "text": "first"}\n' + big + b'\n{"id": "b", "text": "after"}\n'
    path = tmp_path / f"big{suffix}"
    path.write_bytes(gzip.compress(body, 1) if suffix.endswith(".gz") else body)
    size = len(big)
    del big, body
    c = cfg([path], max_doc_bytes=1000)
    tracemalloc.start()
    try:
        recs = [(r.id, r.error, r.nbytes) for r in read_unit(resolve_inputs(c)[0], c)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert recs == [("a", None, 28), (f"big{suffix}:2", "too_large", size), ("b", None, 28)]
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MB while reading a 40 MB line"


# ---------------------------------------------------------------------------------------------
# A hub dataset that cannot be opened is one line naming the input, exit status 2.
# Offline only: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE and an empty HF_HOME (nothing cached).

REPO = Path(__file__).resolve().parents[3]


def scrub_cli(tmp_path, inputs: list[str], *overrides: str) -> subprocess.CompletedProcess:
    config = tmp_path / "tiny.yaml"
    config.write_text(f"scrub:\n  output: {tmp_path / 'out'}\n  workers: 1\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf_home"),
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "data_pipelines", "scrub", str(config),
                           f"scrub.inputs={json.dumps(inputs)}", *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("spec", ["hf:allenai/c4:en", "hf:alenai/c4s"])  # not cached; misspelt
def test_unreachable_hub_dataset_is_one_line_exit_2(tmp_path, spec):
    p = scrub_cli(tmp_path, ["builtin:enwiki-sample", spec])
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    msg = p.stderr.strip()
    assert msg.startswith(f"error: scrub.inputs: cannot open {spec} (Couldn't reach"), msg
    for cause in ("HF_DATASETS_OFFLINE and HF_HUB_OFFLINE set", "misspelt", "gated", "HF_TOKEN"):
        assert cause in msg, msg
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_misspelt_config_or_split_names_the_input(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    d = tmp_path / "local_ds"
    d.mkdir()
    (d / "train.jsonl").write_text(json.dumps(GOOD[0]) + "\n")
    with pytest.raises(UserError) as e:
        resolve_inputs(cfg([f"hf:{d}:englsh"]))
    assert str(e.value).startswith(f"scrub.inputs: cannot open hf:{d}:englsh (BuilderConfig 'englsh' not found")
    assert "scrub.hf_split" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError) as e:
        resolve_inputs(cfg([f"hf:{d}"], hf_split="validaton"))
    assert f"cannot open hf:{d} (" in str(e.value) and "validaton" in str(e.value) and "\n" not in str(e.value)


def test_hub_unreachable_without_offline_flags_says_no_network(monkeypatch):
    """Online the same error comes after datasets' own retries; the message names the network."""
    from data_pipelines.scrub import readers

    class NoNetwork:
        @staticmethod
        def load_dataset(*args, **kwargs):
            raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(readers, "_hf", lambda: NoNetwork)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(UserError) as e:
        resolve_inputs(cfg(["hf:allenai/c4:en"]))
    msg = str(e.value)
    assert msg.startswith("scrub.inputs: cannot open hf:allenai/c4:en (Couldn't reach 'allenai/c4' on the Hub")
    assert "no network" in msg and "OFFLINE and" not in msg and "\n" not in msg
