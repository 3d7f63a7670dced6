"""Canaries: their spaces and registry, and what the scrub does to every planted copy.

The demo corpus (the session fixture scrubs it with the demo config, canaries on) is the main
case: control copies must reach the shards verbatim in as many different documents as were
planted (dedup keeps them), PII-shaped ones must be gone from every shard, and planting must not
change which documents any filter keeps.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_scrub import config, kept_docs, make_corpus, prose, write_jsonl

from data_pipelines.scrub import canaries as cn
from data_pipelines.scrub.manifest import read_manifest, shard_files
from data_pipelines.scrub.planting import CopyTracker, UnitCanaries, plant
from data_pipelines.scrub.runner import run_scrub
from pretrain.config import CANARY_PII_KINDS, load_config
from pretrain.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[3]
FORMATS = {
    "digits": r" \d( \d){7}",
    "email": r" [a-z]{6}\d\d@[a-z.]+",
    "phone": r" \(\d{3}\) [2-9]\d\d-\d{4}",
    "credit_card": r" 4\d{3}( \d{4}){3}",
    "ssn": r" \d{3}-\d{2}-\d{4}",
    "api_key": r" AKIA[A-Z0-9]{16}",
}


def luhn_ok(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()][::-1]
    return sum(d if i % 2 == 0 else (2 * d - 9 if d > 4 else 2 * d) for i, d in enumerate(digits)) % 10 == 0


# ---------------------------------------------------------------------------------------------
# Spaces, canaries, references, registry


def test_every_kind_is_a_bijection_onto_its_stated_format():
    assert set(cn.PII_KINDS) == set(CANARY_PII_KINDS) and set(cn.KINDS) == {"digits", *CANARY_PII_KINDS}
    for name, kind in cn.KINDS.items():
        idx = [0, 1, kind.size - 1] + [(kind.size * k) // 997 for k in range(1, 997)]
        secrets = [kind.decode(i) for i in idx]
        assert len(set(secrets)) == len(set(idx)), name  # distinct indices, distinct secrets
        for s in secrets:
            assert re.fullmatch(FORMATS[name], s), (name, s)
    assert all(luhn_ok(cn.KINDS["credit_card"].decode(i)) for i in range(0, 10**14, 10**11 + 7))
    assert {cn.KINDS["ssn"].decode(i)[1:4] for i in range(0, cn.KINDS["ssn"].size, 9999 * 99)} == \
        {f"{a:03d}" for a in range(1, 900) if a != 666}
    assert cn.KINDS["digits"].size == 10**8 and cn.KINDS["api_key"].size == 36**16


def test_make_canaries_levels_kinds_in_turn_and_distinct_prefixes():
    cs = cn.make_canaries(3, [1, 4, 16], secrets_per_level=2, pii_per_level=3, pii_kinds=list(CANARY_PII_KINDS))
    assert cs == cn.make_canaries(3, [1, 4, 16], 2, 3, list(CANARY_PII_KINDS))  # deterministic
    assert cs != cn.make_canaries(4, [1, 4, 16], 2, 3, list(CANARY_PII_KINDS))
    assert collections.Counter(c.repetitions for c in cs) == {1: 5, 4: 5, 16: 5}
    pii = [c.kind for c in cs if c.family == "pii"]
    assert pii == ["email", "phone", "credit_card", "ssn", "api_key", "email", "phone", "credit_card", "ssn"]
    assert len({c.id for c in cs}) == len({c.prefix for c in cs}) == len(cs)
    for c in cs:
        assert re.fullmatch(FORMATS[c.kind], c.secret) and c.text == c.prefix + c.secret and c.sentence.endswith(".")


def test_references_are_uniform_draws_without_the_canary():
    (c,) = cn.make_canaries(0, [1], 1, 0, [])
    refs = cn.references(c, 5000, seed=1)
    assert refs == cn.references(c, 5000, seed=1) and refs != cn.references(c, 5000, seed=2)
    assert c.secret not in refs and len(set(refs)) > 4990
    # Every digit position uniform: chi-square with 9 degrees of freedom, far below its 1e-6 tail (~50).
    for pos in range(8):
        counts = collections.Counter(r.split()[pos] for r in refs)
        chi2 = sum((counts[str(d)] - 500) ** 2 / 500 for d in range(10))
        assert chi2 < 50, (pos, counts)


def test_registry_round_trip_and_refusals(tmp_path):
    cs = cn.make_canaries(0, [1, 2], 1, 1, ["ssn"])
    reg = cn.Registry("h" * 64, cs, {cs[0].id: [{"unit": "u", "record": 3, "id": "x", "line": 0}]})
    path = cn.write_registry(tmp_path / "r.json", reg)
    back = cn.read_registry(path)
    assert back.canaries == cs and back.hosts[cs[0].id][0]["record"] == 3 and back.outcomes is None
    with pytest.raises(UserError, match="no scrub outcome"):
        back.present_after_scrub(cs[0].id)
    reg.outcomes = {c.id: {"kept": c.repetitions} for c in cs}
    assert cn.read_registry(cn.write_registry(path, reg)).present_after_scrub(cs[1].id)
    with pytest.raises(UserError, match="not found"):
        cn.read_registry(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text('{"format": "something-else"}')
    with pytest.raises(UserError, match="is not a canary registry"):
        cn.read_registry(tmp_path / "other.json")


@pytest.mark.parametrize("overrides,message", [
    (["scrub.output=/data/out", "scrub.canaries.registry=/data/out/reg.json"], "must lie outside scrub.output"),
    (["scrub.canaries.pii_kinds=[email, passport]"], "unknown kind"),
    (["scrub.canaries.levels=[1, 1]"], "distinct positive"),
    (["scrub.canaries.host_pool=10"], "more than scrub.canaries.host_pool"),
])
def test_config_refuses_bad_canary_settings(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["scrub.canaries.enabled=true", *overrides])


def test_registry_lies_beside_the_output_by_default():
    cfg = load_config(None, ["scrub.output=/data/run/scrubbed"])
    assert cn.registry_path(cfg.scrub) == Path("/data/run/scrubbed.canaries.json")


def test_plant_and_tracker_give_every_copy_one_outcome():
    a, b = cn.make_canaries(0, [2], 2, 0, [])
    text = "First line ends here.\nSecond line.  \nThird."
    planted = plant(text, [(1, a), (1, b)])
    assert planted.split("\n")[1] == f"Second line. {a.sentence} {b.sentence}  "
    t = CopyTracker(UnitCanaries(placements={5: [(1, a), (1, b)]}))
    assert t.plant(4, text) == text and t.current == []
    assert t.plant(5, text) == planted
    t.check(planted.replace(b.secret, " <|redacted|>"), "redacted.pii")
    t.survive(0)
    assert t.survivors == {"0": [a.id]} and t.to_dict() == {b.id: {"redacted.pii": 1}}
    t3 = CopyTracker(UnitCanaries(by_id={a.id: a, b.id: b}), hosts={"0": [a.id, b.id], "1": [a.id]})
    t3.enter(0)
    t3.dropped("dedup.near")
    t3.enter(1)
    t3.keep()
    assert t3.to_dict() == {a.id: {"dropped.dedup.near": 1, "kept": 1}, b.id: {"dropped.dedup.near": 1}}


# ---------------------------------------------------------------------------------------------
# The scrub with canaries: the demo corpus (session fixture) and a corpus that drops hosts


def _shard_texts(out: Path) -> dict[str, str]:
    return {r["id"]: r["text"] for f in shard_files(out) for r in pq.read_table(f).to_pylist()}


def test_demo_corpus_control_copies_survive_and_pii_copies_are_gone(scrubbed_corpus):
    reg_path = cn.registry_path(load_config(REPO / "configs" / "demo.yaml", [f"scrub.output={scrubbed_corpus}"]).scrub)
    assert reg_path.parent == scrubbed_corpus.parent and not reg_path.is_relative_to(scrubbed_corpus)
    reg = cn.read_registry(reg_path)
    docs = _shard_texts(scrubbed_corpus)
    assert {c.family for c in reg.canaries} == {"control", "pii"} and reg.outcomes is not None
    for c in reg.canaries:
        hosts = [h["id"] for h in reg.hosts[c.id]]
        assert len(set(hosts)) == len(hosts) == c.repetitions  # every copy in a different document
        holding = {i for i, t in docs.items() if c.text in t}
        if c.family == "control":  # verbatim in every host: no filter (dedup included) removed one
            assert holding == set(hosts), c.id
            assert reg.outcomes[c.id] == {"kept": c.repetitions} and reg.present_after_scrub(c.id)
        else:  # redacted everywhere: neither the sentence nor the bare secret is in any shard
            assert not holding and not any(c.secret.strip() in t for t in docs.values()), c.id
            assert reg.outcomes[c.id] == {"redacted.pii": c.repetitions} and not reg.present_after_scrub(c.id)
            assert all(c.prefix + " <|" in docs[h] for h in hosts)  # the placeholder took its place
    report = json.loads((scrubbed_corpus / "report.json").read_text())
    fams = report["canaries"]["families"]
    copies = {f: sum(c.repetitions for c in reg.canaries if c.family == f) for f in ("control", "pii")}
    assert copies["control"] > 0 and copies["pii"] > 0
    assert fams["control"]["copies"] == {"planted": copies["control"], "kept": copies["control"]}
    assert fams["pii"]["copies"] == {"planted": copies["pii"], "redacted.pii": copies["pii"]}
    assert "## Canaries" in (scrubbed_corpus / "report.md").read_text()


@pytest.mark.slow
def test_planting_changes_no_filter_decision_on_the_demo_corpus(scrubbed_corpus, tmp_path):
    """The same scrub without canaries keeps exactly the same documents for the same reasons:
    no host was dropped (or rescued) by language, quality, dedup or toxicity because of a copy."""
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"scrub.output={tmp_path / 'plain'}", "scrub.workers=1",
                                                       "scrub.canaries.enabled=false"])
    assert run_scrub(cfg) == 0
    assert not cn.registry_path(cfg.scrub).exists()
    plain, planted = read_manifest(tmp_path / "plain"), read_manifest(scrubbed_corpus)
    assert sorted(_shard_texts(tmp_path / "plain")) == sorted(_shard_texts(scrubbed_corpus))
    assert plain["dropped_by_reason"] == planted["dropped_by_reason"]


def test_copies_in_dropped_hosts_are_accounted_with_the_drop_reason(tmp_path):
    """Every possible host gets every canary, so copies meet a near duplicate and a toxic page:
    each copy's outcome must be its host's fate, and the outcomes must add up. Exact duplicates
    host nothing (a planted sentence would make them differ)."""
    make_corpus(tmp_path)
    long = prose(500, 60)
    write_jsonl(tmp_path / "in" / "c.jsonl", [{"id": "long", "text": long},
                                               {"id": "long_near", "text": long.replace("in 1", "in 2", 1)}])
    extra = ["scrub.canaries.enabled=true", "scrub.canaries.min_host_words=50", "scrub.canaries.secrets_per_level=2",
             "scrub.canaries.pii_per_level=2", "scrub.audit_sample=50"]
    with pytest.raises(UserError, match=r"only (\d+) of the first 18 documents can host") as e:
        run_scrub(config(tmp_path, "out", *extra, "scrub.canaries.levels=[18]"))
    hosts = int(re.search(r"only (\d+) of", str(e.value)).group(1))
    assert not (tmp_path / "out.canaries.json").exists()  # a plan that failed wrote nothing...
    assert run_scrub(config(tmp_path, "out", *extra, f"scrub.canaries.levels=[{hosts}]")) == 0  # ...nor tied out/
    reg = cn.read_registry(tmp_path / "out.canaries.json")
    hosts_of_all = {h["id"] for c in reg.canaries for h in reg.hosts[c.id]}
    assert {"long", "long_near", "b_toxic"} <= hosts_of_all and not {"a2", "b_exact"} & hosts_of_all
    docs = kept_docs(tmp_path / "out")
    rows = [json.loads(line) for line in (tmp_path / "out" / "audit" / "dropped.jsonl").read_text().splitlines()]
    dropped = {r["id"]: r["reason"] for r in rows}
    fates = collections.Counter()
    for c in reg.canaries:
        expected = collections.Counter()
        for h in reg.hosts[c.id]:
            if h["id"] in docs:
                expected["kept" if c.family == "control" else "redacted.pii"] += 1
            else:
                expected[f"dropped.{dropped[h['id']]}"] += 1
        assert reg.outcomes[c.id] == expected, c.id
        fates.update(expected)
    assert sum(fates.values()) == 4 * hosts
    assert fates["dropped.toxicity.classifier"] == fates["dropped.dedup.near"] == 4
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["canaries"]["families"]["control"]["copies"]["planted"] == 2 * hosts


def test_two_ranks_in_stages_plant_and_account_like_one(tmp_path):
    """Every rank makes the same plan (or reads it from the registry); copies planted by either
    rank are followed through dedup across both and summed at the merge as in a one-rank scrub."""
    make_corpus(tmp_path)
    extra = ["scrub.canaries.enabled=true", "scrub.canaries.min_host_words=50", "scrub.canaries.levels=[2, 5]",
             "scrub.canaries.secrets_per_level=1", "scrub.canaries.pii_per_level=1"]
    assert run_scrub(config(tmp_path, "single", *extra)) == 0
    ranks = [("scrub.world_size=2", f"scrub.rank={r}") for r in (0, 1)]
    for stage in ("signatures", "write"):
        for r in reversed(ranks):
            assert run_scrub(config(tmp_path, "multi", *extra, *r, f"scrub.stage={stage}")) == 0
    assert run_scrub(config(tmp_path, "multi", *extra, *ranks[0], "scrub.stage=merge")) == 0
    single, multi = cn.read_registry(tmp_path / "single.canaries.json"), cn.read_registry(tmp_path / "multi.canaries.json")
    assert multi.canaries == single.canaries and multi.hosts == single.hosts
    assert multi.outcomes == single.outcomes and sum(sum(o.values()) for o in multi.outcomes.values()) == 14
    units = {h["unit"] for hosts in multi.hosts.values() for h in hosts}
    assert len(units) == 2  # both ranks planted
    assert kept_docs(tmp_path / "multi") == kept_docs(tmp_path / "single")
