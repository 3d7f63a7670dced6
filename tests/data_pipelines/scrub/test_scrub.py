import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import zstandard

import data_pipelines.scrub.runner as scrub_mod
from data_pipelines.scrub.manifest import read_manifest, shard_files
from data_pipelines.scrub.runner import SCRUB_FAULT_ENV, lease_name, run_scrub
from pretrain.config import load_config
from pretrain.errors import EXIT_DISK_FULL, EXIT_LEASE_LOST, DiskFullError, UserError
from pretrain.run_lease import (
    LEASE_NAME,
    RunLease,
    generation_file,
    generations,
    holder_of,
    read_holder,
)

REPO = Path(__file__).resolve().parents[3]
NOUNS = ("river valley farmer village town coast trade idea tool crop scholar record harbour bridge market "
         "church castle forest mountain road railway school library museum garden island lake mill").split()
ADJS = "old new small large busy quiet northern southern famous local ancient modern wooden stone".split()
VERBS = "grew changed supported connected replaced served attracted protected linked described".split()


def prose(seed: int, sentences: int = 12) -> str:
    rng = random.Random(seed)
    out = []
    for _ in range(sentences):
        out.append(f"The {rng.choice(ADJS)} {rng.choice(NOUNS)} of the {rng.choice(NOUNS)} {rng.choice(VERBS)} "
                   f"the {rng.choice(ADJS)} {rng.choice(NOUNS)} and the {rng.choice(NOUNS)} in {1700 + rng.randint(0, 300)}.")
    return "\n".join(" ".join(out[i : i + 3]) for i in range(0, len(out), 3))


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else json.dumps(r).encode())
            f.write(b"\n")
    return path


def make_corpus(tmp_path: Path) -> tuple[Path, Path]:
    a = [{"id": f"a{i}", "text": prose(i)} for i in range(6)]
    a[1]["text"] += "\nWrite to jane.doe@example.org for the archive of the old mill."
    a.append({"id": "de", "text": "Das ist ein deutscher Text über das Wetter und die Berge. " * 10})
    a.append({"id": "short", "text": "This is one long sentence about the history of the river valley and its farmers. "
              "This is a second long sentence about the old mill and the market town nearby."})
    a.append(b'{"id": "broken", "text": "no end')
    a.append({"id": "notext", "body": "x"})
    near = prose(3).replace("in 17", "in 18", 1)  # one token differs
    b = [
        {"id": "b0", "text": prose(100)},
        {"id": "b_exact", "text": " ".join(prose(2).split())},  # a2 reflowed: same normalized text
        {"id": "b_near", "text": near},  # near copy of a3
        {"id": "b_toxic", "text": TOXIC},
        {"id": "b_empty", "text": "   \n  "},
        {"id": "b_lang", "text": "Le renard brun rapide saute par-dessus le chien paresseux. " * 10
         + "Contact: jean@example.fr"},
    ]
    d = tmp_path / "in"
    d.mkdir()
    return write_jsonl(d / "a.jsonl", a), write_jsonl(d / "b.jsonl", b)


TOXIC = ("You are a fucking idiot. Shut the fuck up, you worthless piece of shit. Nobody cares about your "
         "stupid damn opinion, asshole. Go to hell and take your crap with you. What a pathetic loser you are, "
         "bitch. This shit is the dumbest thing I have ever read. Fuck off with your bullshit lies, moron, and "
         "never come back to this forum again with that garbage.")

EXPECTED_DROPS = {
    "malformed.bad_json": 1, "malformed.missing_text": 1, "malformed.empty_text": 1,
    "language": 2, "quality.c4_too_few_sentences": 1, "dedup.exact": 1, "dedup.near": 1,
    "toxicity.classifier": 1,
}


def config(tmp_path: Path, out: str = "out", *extra: str):
    return load_config(None, [f"scrub.inputs=[{tmp_path}/in]", f"scrub.output={tmp_path / out}", *extra])


def kept_docs(out: Path) -> dict[str, str]:
    docs = {}
    for f in shard_files(out):
        for r in pq.read_table(f).to_pylist():
            docs[r["id"]] = r["text"]
    return docs


def test_filters_accounting_and_outputs(tmp_path):
    make_corpus(tmp_path)
    assert run_scrub(config(tmp_path)) == 0
    out = tmp_path / "out"
    m = read_manifest(out, verify="sha256")
    assert m["documents"] == {"read": 16, "kept": 7, "dropped": 9}
    assert m["dropped_by_reason"] == EXPECTED_DROPS
    docs = kept_docs(out)
    assert sorted(docs) == ["a0", "a1", "a2", "a3", "a4", "a5", "b0"]  # first copies kept, later dropped
    assert "<|email|>" in docs["a1"] and "jane.doe" not in docs["a1"]
    assert m["pii"]["counts"] == {"email": 1} and m["pii"]["placeholders"]["email"] == "<|email|>"
    assert [s["docs"] for s in m["shards"]] == [6, 1]
    assert [s["path"] for s in m["shards"]] == ["shards/part-00000-00000.parquet", "shards/part-00000-00001.parquet"]
    meta = json.loads(pq.read_table(shard_files(out)[0]).to_pylist()[0]["meta"])
    assert meta["scrub"]["lang"] == "en" and "toxicity" in meta["scrub"]
    report = json.loads((out / "report.json").read_text())
    assert report["accounting"]["holds"] and report["dropped_by_filter"]["dedup"] == 2
    assert "kept (7) + dropped (9) = read (16): **holds**" in (out / "report.md").read_text()
    audit = [json.loads(x) for x in (out / "audit" / "dropped.jsonl").read_text().splitlines()]
    assert {a["reason"] for a in audit} == set(EXPECTED_DROPS)
    fr = next(a for a in audit if a["id"] == "b_lang")
    assert "<|email|>" in fr["text"] and "jean@" not in fr["text"]  # audit samples are redacted too
    assert {i["input"].rsplit("/", 1)[1] for i in m["inputs"]} == {"a.jsonl", "b.jsonl"}
    assert all(len(i["sha256"]) == 64 for i in m["inputs"])
    # a rerun of a finished scrub only re-merges, and gives the same shards
    assert run_scrub(config(tmp_path)) == 0
    assert [s["sha256"] for s in read_manifest(out)["shards"]] == [s["sha256"] for s in m["shards"]]


def test_resume_after_crash_redoes_only_unfinished_units(tmp_path, monkeypatch):
    make_corpus(tmp_path)
    assert run_scrub(config(tmp_path, "clean")) == 0
    calls = []
    real_p1 = scrub_mod.phase1_unit

    def crashing(unit, cfg, out_dir, *rest):
        calls.append(unit.index)
        if unit.index == 1:
            # a killed worker leaves a half-written temp file and no marker
            Path(out_dir, "_work", "p1", unit.key + ".arrow.tmp").write_bytes(b"\x00garbage")
            raise KeyboardInterrupt
        return real_p1(unit, cfg, out_dir, *rest)

    monkeypatch.setattr(scrub_mod, "phase1_unit", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_scrub(config(tmp_path, "out"))
    assert not (tmp_path / "out" / "manifest.json").exists()
    calls.clear()
    monkeypatch.setattr(scrub_mod, "phase1_unit", lambda u, c, o, *r: (calls.append(u.index), real_p1(u, c, o, *r))[1])
    assert run_scrub(config(tmp_path, "out")) == 0
    assert calls == [1]  # unit 0 finished before the crash and was skipped
    assert kept_docs(tmp_path / "out") == kept_docs(tmp_path / "clean")
    a, b = read_manifest(tmp_path / "out"), read_manifest(tmp_path / "clean")
    assert a["documents"] == b["documents"] and a["dropped_by_reason"] == b["dropped_by_reason"]
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_two_machines_staged_equals_one_machine(tmp_path):
    make_corpus(tmp_path)
    assert run_scrub(config(tmp_path, "single")) == 0
    ranks = [("scrub.world_size=2", f"scrub.rank={r}") for r in (0, 1)]
    assert run_scrub(config(tmp_path, "multi", *ranks[1], "scrub.stage=signatures")) == 0
    with pytest.raises(UserError, match=r"phase 1 .* not finished for 1 unit\(s\) \(00000-a.jsonl\)"):
        run_scrub(config(tmp_path, "multi", *ranks[1], "scrub.stage=write"))  # rank 0 has not run yet
    for stage in ("signatures", "write"):
        for r in ranks:
            assert run_scrub(config(tmp_path, "multi", *r, f"scrub.stage={stage}")) == 0
    assert not (tmp_path / "multi" / "manifest.json").exists()
    assert run_scrub(config(tmp_path, "multi", *ranks[0], "scrub.stage=merge")) == 0
    m = read_manifest(tmp_path / "multi")
    assert [s["path"] for s in m["shards"]] == ["shards/part-00000-00000.parquet", "shards/part-00001-00001.parquet"]
    assert kept_docs(tmp_path / "multi") == kept_docs(tmp_path / "single")  # dedup saw both machines' shards
    assert m["dropped_by_reason"] == EXPECTED_DROPS


def test_changed_settings_refused_and_jsonl_zst_output(tmp_path):
    make_corpus(tmp_path)
    assert run_scrub(config(tmp_path, "out", "scrub.output_format=jsonl.zst")) == 0
    with pytest.raises(UserError, match="different settings"):
        run_scrub(config(tmp_path, "out", "scrub.output_format=jsonl.zst", "scrub.dedup.threshold=0.5"))
    files = shard_files(tmp_path / "out")
    assert files[0].name == "part-00000-00000.jsonl.zst"
    with open(files[0], "rb") as f:
        rows = [json.loads(x) for x in zstandard.ZstdDecompressor().stream_reader(f).read().decode().splitlines()]
    assert [r["id"] for r in rows] == ["a0", "a1", "a2", "a3", "a4", "a5"]
    assert set(rows[0]) == {"id", "text", "source", "meta"}


def test_builtin_corpus(scrubbed_corpus):
    """The session fixture ran the real scrub on the 106 embedded Wikipedia articles."""
    m = read_manifest(scrubbed_corpus, verify="sha256")
    d = m["documents"]
    assert d["read"] == 106 and d["kept"] + d["dropped"] == 106 and d["kept"] >= 90
    rows = [r for f in shard_files(scrubbed_corpus) for r in pq.read_table(f).to_pylist()]
    assert len(rows) == d["kept"] == sum(s["docs"] for s in m["shards"])
    meta = json.loads(rows[0]["meta"])
    assert meta["title"] == "Anarchism" and meta["license"].startswith("CC BY-SA")
    assert all("'''" not in r["text"] and "[[" not in r["text"] for r in rows)
    assert (scrubbed_corpus / "report.md").is_file()


@pytest.mark.slow
def test_worker_pool_matches_in_process(tmp_path):
    make_corpus(tmp_path)
    assert run_scrub(config(tmp_path, "one")) == 0
    assert run_scrub(config(tmp_path, "two", "scrub.workers=2")) == 0
    assert kept_docs(tmp_path / "two") == kept_docs(tmp_path / "one")
    assert read_manifest(tmp_path / "two")["dropped_by_reason"] == EXPECTED_DROPS


def test_cli_bad_input_exits_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "data_pipelines", "scrub", str(REPO / "configs/scrub/enwiki.yaml"),
                        f"scrub.inputs=[{tmp_path}/nope.jsonl]", f"scrub.output={tmp_path}/o"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2
    assert "nope.jsonl does not exist" in r.stderr and "Traceback" not in r.stderr


def test_filters_off_keep_everything_well_formed_and_counterfactual(tmp_path):
    make_corpus(tmp_path)
    off = ["scrub.normalize.enabled=false", "scrub.language.enabled=false", "scrub.quality.enabled=false",
           "scrub.dedup.enabled=false", "scrub.toxicity.enabled=false", "scrub.pii.enabled=false",
           "scrub.bias.counterfactual_rate=1.0"]
    assert run_scrub(config(tmp_path, "out", *off)) == 0
    m = read_manifest(tmp_path / "out")
    assert m["dropped_by_reason"] == {"malformed.bad_json": 1, "malformed.missing_text": 1, "malformed.empty_text": 1}
    assert m["documents"]["kept"] == 13 and m["filters"]["dedup"] == "off" and m["filters"]["pii"] == "off"
    docs = kept_docs(tmp_path / "out")
    assert "jane.doe@example.org" in docs["a1"]  # PII off: left as is
    assert docs["b_toxic"].startswith("You are a fucking idiot.")
    assert "the old mill" in docs["short"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["counterfactual_swapped"] == 13


def test_toxicity_mask_action(tmp_path):
    make_corpus(tmp_path)
    mixed = prose(7) + "\n" + TOXIC + "\n" + prose(8)
    write_jsonl(tmp_path / "in" / "c.jsonl", [{"id": "mixed", "text": mixed}])
    assert run_scrub(config(tmp_path, "out", "scrub.toxicity.action=mask", "scrub.toxicity.chunk_chars=100")) == 0
    docs = kept_docs(tmp_path / "out")
    assert "fuck" not in docs["mixed"]
    assert prose(7).split(". ")[0] in docs["mixed"] and prose(8).split(". ")[-1] in docs["mixed"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["toxicity_masked_docs"] >= 1


def test_every_malformed_reason_counted_and_zero_kept_is_a_finished_scrub(tmp_path):
    """Each malformed kind has its own reason; a scrub that keeps nothing still writes a manifest
    (no shards) that downstream steps refuse by name instead of crashing."""
    from data_pipelines.loading.sources import Source

    d = tmp_path / "in"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [
        b'{"id": "bad", "text": ',  # bad_json
        {"id": "nt"},  # missing_text
        {"id": "num", "text": 42},  # non_string_text
        {"id": "big", "text": "x" * 3000},  # too_large (max_doc_bytes=2000)
        b'{"id": "bin", "text": "\xff\xfe\xfd\xfc\xfb\xfa"}',  # undecodable
        {"id": "ws", "text": " \t\n"},  # empty_text
        {"id": "uni", "text": "Grüße aus Köln, wo das Wetter heute schön ist. " * 8},  # language (de)
    ])
    (d / "huge.txt").write_text("word " * 1000)  # a one-document text file over the cap
    assert run_scrub(config(tmp_path, "out", "scrub.max_doc_bytes=2000")) == 0
    m = read_manifest(tmp_path / "out")
    assert m["documents"] == {"read": 8, "kept": 0, "dropped": 8} and m["shards"] == []
    assert m["dropped_by_reason"] == {"language": 1, "malformed.bad_json": 1, "malformed.empty_text": 1,
                                      "malformed.missing_text": 1, "malformed.non_string_text": 1,
                                      "malformed.too_large": 2, "malformed.undecodable": 1}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["accounting"]["holds"] and report["dropped_by_filter"]["malformed"] == 7
    with pytest.raises(UserError, match=f"{tmp_path / 'out'} holds no documents"):
        Source("s", str(tmp_path / "out"), 1.0, "text", "data.sources[0]", True, 16)


def test_resume_refuses_an_input_changed_since_it_was_read(tmp_path):
    a, _ = make_corpus(tmp_path)
    assert run_scrub(config(tmp_path, "out", "scrub.stage=signatures")) == 0
    with open(a, "ab") as f:
        f.write(json.dumps({"id": "late", "text": prose(55)}).encode() + b"\n")
    with pytest.raises(UserError, match=f"{a} changed since this scrub read it"):
        run_scrub(config(tmp_path, "out"))


def test_invalid_unicode_in_ids_and_metadata_is_repaired_not_fatal(tmp_path):
    """A lone surrogate escape (valid JSON) or an undecodable byte outside the text field must not
    crash the parquet writer, the markers or the audit file."""
    d = tmp_path / "in"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [
        b'{"id": "s\\ud800", "text": "%s", "title": "t\\udcff"}' % prose(1).replace("\n", "\\n").encode(),
        b'{"id": "raw\xff", "text": "%s", "title": "caf\xe9"}' % prose(2).replace("\n", "\\n").encode(),
        b'{"id": "bad\xfe", "text": 7}',  # malformed, goes to the audit sample with its id
    ])
    assert run_scrub(config(tmp_path, "out", "scrub.language.enabled=false")) == 0
    rows = [r for f in shard_files(tmp_path / "out") for r in pq.read_table(f).to_pylist()]
    assert [r["id"] for r in rows] == ["s\ufffd", "raw\ufffd"]
    assert [json.loads(r["meta"])["title"] for r in rows] == ["t\ufffd", "caf\ufffd"]
    audit = [json.loads(x) for x in (tmp_path / "out" / "audit" / "dropped.jsonl").read_text().splitlines()]
    assert [(a["id"], a["reason"]) for a in audit] == [("bad\ufffd", "malformed.non_string_text")]


def planted_corpus(tmp_path: Path, clusters: tuple[int, ...] = (2, 3, 4, 6), singles: int = 9, files: int = 3) -> int:
    """Near-duplicate clusters of known sizes (one word changed per member, every third member an
    exact reflowed copy) dealt round-robin over several input files, so clusters span files, ranks
    and buckets. Returns the number of documents a correct dedup keeps."""
    docs = []
    for c, size in enumerate(clusters):
        base = prose(1000 + c, 15)
        for k in range(size):
            words = base.split(" ")
            if k % 3 == 1:
                words[4 + 7 * k] = "zebra"
            text = " ".join(words)
            docs.append({"id": f"c{c}m{k}", "text": "  ".join(text.split()) if k % 3 == 2 else text})
    docs += [{"id": f"s{i}", "text": prose(2000 + i, 15)} for i in range(singles)]
    random.Random(5).shuffle(docs)
    d = tmp_path / "in"
    d.mkdir()
    for f in range(files):
        write_jsonl(d / f"p{f}.jsonl", docs[f::files])
    return len(clusters) + singles


def test_bucketed_dedup_equals_in_memory_across_ranks_and_buckets(tmp_path, monkeypatch):
    expected_kept = planted_corpus(tmp_path)
    quiet = ("scrub.toxicity.enabled=false", "scrub.pii.enabled=false")
    assert run_scrub(config(tmp_path, "memory", *quiet)) == 0
    mem = read_manifest(tmp_path / "memory")
    assert mem["documents"]["kept"] == expected_kept  # the planted clusters are what the dedup removes
    assert mem["dropped_by_reason"].keys() == {"dedup.exact", "dedup.near"}
    ranks = [("scrub.world_size=2", f"scrub.rank={r}") for r in (0, 1)]
    bucketed = (*quiet, "scrub.dedup.method=bucketed", "scrub.dedup.buckets=5")
    assert run_scrub(config(tmp_path, "b", *bucketed, *ranks[1], "scrub.stage=signatures")) == 0
    with pytest.raises(UserError, match=r"phase 1 .* not finished for 2 unit\(s\)"):
        run_scrub(config(tmp_path, "b", *bucketed, *ranks[1], "scrub.stage=buckets"))  # rank 0 has not run yet
    assert run_scrub(config(tmp_path, "b", *bucketed, *ranks[0], "scrub.stage=signatures")) == 0
    assert run_scrub(config(tmp_path, "b", *bucketed, *ranks[0], "scrub.stage=buckets")) == 0
    with pytest.raises(UserError, match=r"dedup step 'buckets' is not finished for 2 bucket\(s\) \(00001, 00003\)"):
        run_scrub(config(tmp_path, "b", *bucketed, *ranks[0], "scrub.stage=pairs"))
    # a crash in the middle of one pairs bucket: the rerun redoes only that bucket
    real, calls = scrub_mod.db.pairs_bucket, []

    def flaky(layout, keys, bucket, *a):
        calls.append(bucket)
        if bucket == 3 and calls.count(3) == 1:
            raise RuntimeError("killed")
        return real(layout, keys, bucket, *a)

    monkeypatch.setattr(scrub_mod.db, "pairs_bucket", flaky)
    assert run_scrub(config(tmp_path, "b", *bucketed, *ranks[1], "scrub.stage=buckets")) == 0
    with pytest.raises(RuntimeError, match="killed"):
        run_scrub(config(tmp_path, "b", *bucketed, *ranks[1], "scrub.stage=pairs"))
    assert run_scrub(config(tmp_path, "b", *bucketed, *ranks[1], "scrub.stage=pairs")) == 0
    assert calls == [1, 3, 3]
    assert run_scrub(config(tmp_path, "b", *bucketed, *ranks[0], "scrub.stage=pairs")) == 0
    for r in ranks:
        assert run_scrub(config(tmp_path, "b", *bucketed, *r, "scrub.stage=write")) == 0
    assert run_scrub(config(tmp_path, "b", *bucketed, *ranks[0], "scrub.stage=merge")) == 0
    b = read_manifest(tmp_path / "b")
    assert kept_docs(tmp_path / "b") == kept_docs(tmp_path / "memory")
    assert b["dropped_by_reason"] == mem["dropped_by_reason"]
    assert not [p for p in (tmp_path / "b" / "_work" / "dedup").rglob("*") if p.is_file() and "done" not in p.name]


def test_bucketed_dedup_equals_in_memory_on_the_demo_corpus(scrubbed_corpus, tmp_path):
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"scrub.output={tmp_path / 'b'}", "scrub.workers=1",
                                                       "scrub.dedup.method=bucketed", "scrub.dedup.buckets=7"])
    assert run_scrub(cfg) == 0
    assert kept_docs(tmp_path / "b") == kept_docs(scrubbed_corpus)
    assert read_manifest(tmp_path / "b")["dropped_by_reason"] == read_manifest(scrubbed_corpus)["dropped_by_reason"]


@pytest.mark.parametrize("half", ["scrub.dedup.exact=false", "scrub.dedup.near=false"])
def test_bucketed_dedup_with_one_half_off_equals_in_memory(tmp_path, half):
    planted_corpus(tmp_path)
    quiet = ("scrub.toxicity.enabled=false", "scrub.pii.enabled=false", half)
    assert run_scrub(config(tmp_path, "memory", *quiet)) == 0
    assert run_scrub(config(tmp_path, "b", *quiet, "scrub.dedup.method=bucketed", "scrub.dedup.buckets=3")) == 0
    mem = read_manifest(tmp_path / "memory")["dropped_by_reason"]
    assert list(mem) == (["dedup.near"] if "exact" in half else ["dedup.exact"])
    assert read_manifest(tmp_path / "b")["dropped_by_reason"] == mem
    assert kept_docs(tmp_path / "b") == kept_docs(tmp_path / "memory")


def test_a_second_scrub_on_a_live_output_exits_2_naming_the_holder(tmp_path):
    make_corpus(tmp_path)
    out = tmp_path / "out"
    cli = [sys.executable, "-m", "data_pipelines", "scrub", str(REPO / "configs/scrub/enwiki.yaml"),
           f"scrub.inputs=[{tmp_path}/in]", f"scrub.output={out}"]
    with RunLease.acquire(out, 10, 120, what="scrub.output", start_heartbeat=False):  # a live scrub: this process
        r = subprocess.run(cli, capture_output=True, text=True, cwd=REPO, timeout=120)
        assert r.returncode == 2, r.stderr[-2000:]
        assert f"scrub.output {out} is in use by another job (host " in r.stderr and "Traceback" not in r.stderr
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [LEASE_NAME, f"{LEASE_NAME}/gen-000001"]
        # several ranks share one output directory: each rank holds its own lease
        with RunLease.acquire(out, 10, 120, name=lease_name(0, 2), start_heartbeat=False):
            assert run_scrub(config(tmp_path, "out", "scrub.world_size=2", "scrub.rank=1",
                                    "scrub.stage=signatures")) == 0
            with pytest.raises(UserError, match=rf"scrub.output {out} is in use .*\.lease-rank-0/gen-000001"):
                run_scrub(config(tmp_path, "out", "scrub.world_size=2", "scrub.rank=0", "scrub.stage=signatures"))
    assert holder_of(out, lease_name(1, 2)) is None  # released at the end of the scrub


TAKEN_OVER_BEFORE_THE_WRITE_PHASE = """
import json, sys, time
from pathlib import Path
import data_pipelines.scrub.runner as runner
from data_pipelines.__main__ import main
from pretrain.run_lease import LEASE_NAME, generation_file, generations

out = Path(sys.argv[1])
real = runner.decide_duplicates

def taken_over_then_decide(cfg, out_dir, units):
    # Another job takes this scrub's lease over (it judged it stale) just before the write phase.
    lease_dir = out / LEASE_NAME
    now = time.time()
    generation_file(lease_dir, generations(lease_dir)[-1] + 1).write_text(json.dumps(dict(
        host="othernode", pid=4242, job_id="777", started=now, heartbeat=now, token="successor")))
    return real(cfg, out_dir, units)

runner.decide_duplicates = taken_over_then_decide
sys.exit(main(sys.argv[2:]))
"""


def test_a_scrub_that_loses_its_lease_stops_at_once_and_writes_nothing_more(tmp_path):
    """Another job takes over between phase 1 and the write phase: the scrub exits EXIT_LEASE_LOST
    with one line naming that job, and writes no shard, no unit marker and no manifest."""
    make_corpus(tmp_path)
    out = tmp_path / "out"
    driver = tmp_path / "driver.py"
    driver.write_text(TAKEN_OVER_BEFORE_THE_WRITE_PHASE)
    cli = [sys.executable, str(driver), str(out), "scrub", str(REPO / "configs/scrub/enwiki.yaml"),
           f"scrub.inputs=[{tmp_path}/in]", f"scrub.output={out}", "scrub.workers=1"]
    r = subprocess.run(cli, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == EXIT_LEASE_LOST, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if "lost the directory's lease" in line]
    assert len(lines) == 1 and lines[0].startswith(f"error: scrub.output {out}: this job lost the directory's lease "
                                                   "to another job (generation 2: host othernode, pid 4242, SLURM job 777")
    assert "Traceback" not in r.stderr
    assert list((out / "_work" / "p1").glob("*.done.json"))  # phase 1 ran (the test would prove nothing otherwise)
    assert not [p for p in out.rglob("*") if "shards" in p.parts] and not (out / "manifest.json").exists()
    assert not [p for p in out.rglob("*.done.json") if "p1" not in p.parts], "a write-phase unit was marked done"
    assert generations(out / LEASE_NAME) == [1, 2] and holder_of(out).token == "successor"
    assert not read_holder(generation_file(out / LEASE_NAME, 1)).released  # its own file left alone too


def test_a_full_output_disk_fails_clearly_and_the_rerun_accounts_for_every_document(tmp_path, monkeypatch):
    make_corpus(tmp_path)
    out = tmp_path / "out"
    monkeypatch.setenv(SCRUB_FAULT_ENV, "enospc@1")  # the second unit's shard write hits a full disk
    with pytest.raises(DiskFullError) as e:
        run_scrub(config(tmp_path))
    assert e.value.exit_status == EXIT_DISK_FULL
    assert f"scrub.output {out}: no space left on device" in str(e.value) and "rerun the same command" in str(e.value)
    assert not (out / "manifest.json").exists() and not list(out.rglob("*.tmp"))  # the partial shard is gone
    assert holder_of(out) is None  # released on the way out: the rerun is not blocked
    monkeypatch.delenv(SCRUB_FAULT_ENV)
    assert run_scrub(config(tmp_path)) == 0  # space freed: the same command
    m = read_manifest(out, verify="sha256")
    assert m["documents"] == {"read": 16, "kept": 7, "dropped": 9} and m["dropped_by_reason"] == EXPECTED_DROPS
    assert "kept (7) + dropped (9) = read (16): **holds**" in (out / "report.md").read_text()
