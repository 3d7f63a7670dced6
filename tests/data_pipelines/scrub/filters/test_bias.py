import json

import pytest

from data_pipelines.scrub.filters.bias import (
    BiasAudit,
    GroupMatcher,
    add_counts,
    chosen_for_swap,
    counterfactual_swap,
    disparity_rows,
    load_groups,
)
from pretrain.errors import UserError


def test_bundled_groups_and_matching():
    groups = load_groups()
    assert set(groups) == {"gender", "religion", "ethnicity_nationality", "sexual_orientation", "disability", "age"}
    m = GroupMatcher(groups)
    found = m.names_of(m.mask("An African-American woman met Muslim neighbours; gay rights, the elderly."))
    assert found == ["gender", "religion", "ethnicity_nationality", "sexual_orientation", "age"]
    assert m.mask("Gayle managed the mandate of the mental health board.") == 0  # no substring hits
    assert m.names_of(m.mask("Rules for people who use a WHEELCHAIR.")) == ["disability"]
    assert m.names_of(m.mask("services for old people")) == ["age"]  # phrase


def test_disparity_maths_on_constructed_case():
    audit = BiasAudit(["a", "b"])
    # filter 'quality': 100 docs. Group a: 20 docs, 8 removed (rate 0.4 -> 0.4 / 0.11 = 3.6x).
    # Group b: 30 docs, 3 removed (0.1 -> ~0.9x). Overall: 11 removed.
    for i in range(100):
        mask = (1 if i < 20 else 0) | (2 if 20 <= i < 50 else 0)
        removed = i < 8 or i in (20, 21, 49)  # 8 of group a, 3 of group b
        audit.record("quality", mask, removed)
    rows = {r["group"]: r for r in disparity_rows(audit.data, 2.0, 10) if r["filter"] == "quality"}
    assert audit.data["filters"]["quality"]["removed"] == 11
    overall = 11 / 100
    assert rows["a"]["rate"] == pytest.approx(0.4)
    assert rows["a"]["disparity"] == pytest.approx(0.4 / overall)
    assert rows["a"]["flagged"]
    assert rows["b"]["disparity"] == pytest.approx(0.1 / overall)
    assert not rows["b"]["flagged"]
    # too few documents: reported, never flagged
    few = {r["group"]: r for r in disparity_rows(audit.data, 2.0, 25) if r["filter"] == "quality"}
    assert few["a"]["disparity"] == pytest.approx(0.4 / overall) and not few["a"]["flagged"]
    # a filter that removed nothing has no defined disparity
    lang = [r for r in disparity_rows(audit.data, 2.0, 1) if r["filter"] == "language"]
    assert all(r["disparity"] is None and not r["flagged"] for r in lang)


def test_counts_merge_by_addition():
    a, b = BiasAudit(["g"]), BiasAudit(["g"])
    a.record("dedup", 1, True)
    b.record("dedup", 1, False)
    b.final(1, kept=True)
    merged = add_counts(add_counts({}, a.data), b.data)
    assert merged["filters"]["dedup"]["entered_by_group"]["g"] == 2
    assert merged["filters"]["dedup"]["removed_by_group"]["g"] == 1
    assert merged["kept_by_group"]["g"] == 1


def test_counterfactual_swap():
    assert counterfactual_swap("He gave her book to his Mother. She saw HIM and her.") == \
        "She gave his book to her Father. He saw HER and him."
    assert counterfactual_swap("The chemist mentioned a theme.") == "The chemist mentioned a theme."
    chosen = sum(chosen_for_swap(f"doc{i}", 0.3) for i in range(2000))
    assert 500 < chosen < 700
    assert [chosen_for_swap(f"doc{i}", 0.3) for i in range(50)] == [chosen_for_swap(f"doc{i}", 0.3) for i in range(50)]
    assert not any(chosen_for_swap(f"doc{i}", 0.0) for i in range(100))


def test_user_terms_file(tmp_path):
    p = tmp_path / "terms.json"
    p.write_text(json.dumps({"_about": "x", "fruit": ["apple", "blood orange"]}))
    m = GroupMatcher(load_groups(p))
    assert m.names and m.names_of(m.mask("An Apple and a blood orange.")) == ["fruit"]
    p.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_groups(p)
    p.write_text(json.dumps({"fruit": "apple"}))
    with pytest.raises(UserError, match="list of non-empty strings"):
        load_groups(p)
    with pytest.raises(UserError, match="cannot read"):
        load_groups(tmp_path / "nope.json")
