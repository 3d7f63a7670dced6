"""PII detection and redaction: positives per type, hard negatives, both scan engines, replacement."""

from __future__ import annotations

import dataclasses
import pickle
import re

import pytest

from data_pipelines.scrub.filters.pii import (
    PIIRedactor,
    PIISpan,
    hyperscan_available,
    measure_throughput,
)
from data_pipelines.scrub.filters.pii import redactor as redactor_mod
from data_pipelines.scrub.filters.pii import scan as scan_mod
from data_pipelines.scrub.filters.pii_types import PII_TYPES, PLACEHOLDERS
from pretrain.config import PIIConfig
from pretrain.errors import UserError

ENGINES = ["re"] + (["hyperscan"] if hyperscan_available() else [])


def redactor(engine: str = "auto", **kw) -> PIIRedactor:
    return PIIRedactor(dataclasses.replace(PIIConfig(), engine=engine, **kw))


@pytest.fixture(scope="module", params=ENGINES)
def r(request) -> PIIRedactor:
    return redactor(request.param)


def test_placeholders_are_one_distinct_token_per_type():
    assert list(PLACEHOLDERS) == list(PII_TYPES)
    assert len(set(PLACEHOLDERS.values())) == len(PII_TYPES)
    for t, tok in PLACEHOLDERS.items():
        assert tok == f"<|{t}|>"
    assert set(PIIConfig().types) == set(PII_TYPES)


POSITIVES = [
    # (text, type, exact value that must be the span)
    ("Write to jane.doe+news@mail.example.co.uk today.", "email", "jane.doe+news@mail.example.co.uk"),
    ("call555-123-4567now", "phone", "555-123-4567"),
    ("Tel:+442079460958", "phone", "+442079460958"),
    ("Reach me at (212) 555-0147 after six.", "phone", "(212) 555-0147"),
    ("Büro: +49 (0) 30 901820, Fax folgt.", "phone", "+49 (0) 30 901820"),
    ("Appelez le 01 42 68 53 00 demain.", "phone", "01 42 68 53 00"),
    ("Our London office: 020 7946 0958.", "phone", "020 7946 0958"),
    ("mobile +91 98765 43210 (India)", "phone", "+91 98765 43210"),
    ("Tel. 030 1234567 / 030 7654321", "phone", "030 1234567"),
    ("206.269.0743x9150 is the desk", "phone", "206.269.0743x9150"),
    ("Login from 8.8.4.4 was blocked.", "ip", "8.8.4.4"),
    ("host 2001:4860:4860::8888 answered", "ip", "2001:4860:4860::8888"),
    ("paid with 4111 1111 1111 1111 yesterday", "credit_card", "4111 1111 1111 1111"),
    ("Amex 3782-822463-10005 on file", "credit_card", "3782-822463-10005"),
    ("card 5555555555554444.", "credit_card", "5555555555554444"),
    ("SSN 078-05-1120 on the form", "ssn", "078-05-1120"),
    ("IBAN DE89 3704 0044 0532 0130 00 IN 2020", "iban", "DE89 3704 0044 0532 0130 00"),
    ("account GB82WEST12345698765432.", "iban", "GB82WEST12345698765432"),
    ("aws_access_key_id = AKIAIOSFODNN7EXAMPLE", "secret", "AKIAIOSFODNN7EXAMPLE"),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "secret", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("export GITHUB_TOKEN=ghp_16C7e42F292c6912E7710c838347Ae178B4a", "secret", "ghp_16C7e42F292c6912E7710c838347Ae178B4a"),
    ("use glpat-aB3dE6gH9jK2mN5pQ8rS now", "secret", "glpat-aB3dE6gH9jK2mN5pQ8rS"),
    ("long glpat-" + "aB3" * 20 + " token", "secret", "glpat-" + "aB3" * 20),
    ("SLACK=xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx", "secret", "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"),
    ("stripe.api_key = 'sk_live_4eC39HqLyjWDarjtT1zdp7dc'", "secret", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    ("key=AIzaSyA1234567890abcdefghijklmnopqrstuv", "secret", "AIzaSyA1234567890abcdefghijklmnopqrstuv"),
    ("Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
     "secret", "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"),
    ('db_password = "Xk9#mP2qL7zR"', "secret", "Xk9#mP2qL7zR"),
    ("password: Summer2024", "secret", "Summer2024"),
    ("clone https://bob:hunter2@git.example.com/repo.git", "url_credentials", "bob:hunter2"),
]


@pytest.mark.parametrize("text,pii_type,value", POSITIVES, ids=[f"{p[1]}-{i}" for i, p in enumerate(POSITIVES)])
def test_detects_each_type_with_exact_span(r, text, pii_type, value):
    spans = r.detect(text)
    assert [(s.type, text[s.start:s.end]) for s in spans if s.type == pii_type][:1] == [(pii_type, value)], spans
    assert all(s.type == pii_type for s in spans), spans  # nothing else flagged in the sentence


def test_pem_private_key_block_is_one_span(r):
    body = "\n".join(["MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj"] * 4)
    block = f"-----BEGIN RSA PRIVATE KEY-----\n{body}\n-----END RSA PRIVATE KEY-----"
    text = f"key file:\n{block}\nend"
    assert [(s.type, text[s.start:s.end]) for s in r.detect(text)] == [("secret", block)]


HARD_NEGATIVES = [
    "Upgrade to v2.13.1 or version 10.0.19041.1 (build 1.2.3.4) first.",
    "Released 2023-10-05, revised 05.10.2023 and 10/05/2023, covering 1990-2000.",
    "Logged at 2023-10-05T14:30:05.123456Z and 14:30:05 UTC.",
    "See ISBN 978-3-16-148410-0, ISBN 0-306-40615-2 and 0-682-73084-X.",
    "Cited as doi:10.1038/nphys1170 and https://doi.org/10.1000/182-4567-8901-2.",
    "md5 5d41402abc4b2a76b9719d911017c592 sha1 aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d commit 3fa9c2d.",
    "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
    "GUID 123e4567-e89b-12d3-a456-426614174000 and {2362DBC1-8024-4320-80CB-D3132BDB5720}.",
    "Results:\n1990 | 2,345 | 12.5 | 88264\n2000 3456 45.0 29177\n010 0000    040    32    20",
    "Located at 40.7128, -74.0060 and 40.7128° N, 74.0060° W.",
    "We get 2^33 = 8589934592 and x = 6380 - 7293 / 90 and 3 + 4 = 7.",
    "ref 123-456-7890 and +44 20 7946 noted; 4111 1111 1111 1112 failed Luhn.",
    "forms 000-12-3456, 666-12-3456, 900-12-3456 and 123-00-4567 were rejected.",
    "bad account DE88 3704 0044 0532 0130 00 and GB83WEST12345698765432.",
    "Local only: 192.168.1.20, 10.0.0.1, 127.0.0.1, 192.0.2.7, ::1, fe80::1 and 2001:db8::5.",
    "MAC 00:1A:2B:3C:4D:5E; C++ std::vector and Foo::Bar; icon@2x.png; Tokenization: Byte-pair.",
    "password = getpass.getpass(); token = os.environ.get(\"T\"); API_KEY=settings.SECRET_KEY; secret: ********",
    "Population 1,234,567 (2011); 12 345 678 people; Flickr photo (4316108409).jpg",
    # Found in package metadata and the standard library while tuning:
    "Requires lz4>=1.7.4.2; Versions after 1.11.1.1; see section 8.2.4.44; 016.016.016.016",
    "numchars = '0123456789'; microsecond (0-999999); e.g. aix-6107-1415-32; 32768-65535 bytes",
    "Grant No. 0757627; NNTP says 223 3000234 <45223423@example>",
    "tokenizer = Tokenizer(models.BPE()); token = self._fp.read(1)[0]",
    'open("s3://access_key_id:secret_access_key@bucket/key"); url = "http://User:Pass@www.python.org"',
]


@pytest.mark.parametrize("text", HARD_NEGATIVES, ids=[f"neg-{i}" for i in range(len(HARD_NEGATIVES))])
def test_no_false_positives_on_hard_negatives(r, text):
    spans = r.detect(text)
    assert spans == [], [(s.type, text[s.start:s.end]) for s in spans]


def test_offsets_hold_in_non_ascii_text(r):
    text = "Grüße — écrivez à jean.dupont@exemple.fr ou appelez le\u00a001\u00a042\u00a068\u00a053\u00a000 ☎ 日本"
    found = [(s.type, text[s.start:s.end]) for s in r.detect(text)]
    assert found == [("email", "jean.dupont@exemple.fr"), ("phone", "01\u00a042\u00a068\u00a053\u00a000")]
    # Digits of other scripts are not ASCII digits for either engine (hyperscan scans bytes).
    assert r.detect("call ０２０ ７９４６ ０９５８ now") == []


def test_truncated_pem_block_still_redacted(r):
    text = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj"
    out, counts = r.redact(text)
    assert out == "<|secret|>" and counts == {"secret": 1}


def test_private_ips_redacted_only_when_asked():
    text = "hosts 192.168.1.20 and fd00::1:2:3 and 8.8.8.8"
    assert [text[s.start:s.end] for s in redactor().detect(text)] == ["8.8.8.8"]
    found = [text[s.start:s.end] for s in redactor(redact_private_ips=True).detect(text)]
    assert found == ["192.168.1.20", "fd00::1:2:3", "8.8.8.8"]


def test_engines_agree():
    from data_pipelines.evaluation.pii_heldout import make_heldout_set
    from data_pipelines.evaluation.pii_synth import make_labelled_set

    if not hyperscan_available():
        pytest.skip("hyperscan is not installed (x86 only): there is no second engine to compare")
    records = make_labelled_set(n_docs=60, seed=99) + make_heldout_set(seed=5)[::7]
    hs, fallback = redactor("hyperscan"), redactor("re")
    assert hs.engine == "hyperscan" and fallback.engine == "re"
    for rec in records:
        assert hs.detect(rec["text"]) == fallback.detect(rec["text"]), rec["text"]


def test_fallback_is_chosen_without_hyperscan(monkeypatch):
    monkeypatch.setattr(scan_mod, "hyperscan_available", lambda: False)
    assert redactor("auto").engine == "re"
    with pytest.raises(UserError, match="hyperscan"):
        redactor("hyperscan")


@pytest.mark.skipif(not hyperscan_available(), reason="hyperscan not installed")
def test_pathological_digit_runs_fall_back_to_regex_scan(monkeypatch):
    hs = redactor("hyperscan")
    calls = []
    real = hs.scanner.fallback.scan
    monkeypatch.setattr(hs.scanner.fallback, "scan", lambda text: calls.append(1) or real(text))
    text = ("1234567890" * 500 + " call (212) 555-0147 now ") * 20
    spans = hs.detect(text)
    assert calls == [1]  # too many hyperscan reports: the document went to the regex scanner
    assert [text[s.start:s.end] for s in spans] == ["(212) 555-0147"] * 20
    assert spans == redactor("re").detect(text)


def test_clean_prose_yields_no_candidates(r):
    text = "The quick brown fox jumps over the lazy dog, as it did in the year 1999 and again later. " * 50
    assert list(r.scanner.scan(text)) == []


def test_redact_placeholders_counts_and_idempotence(r):
    text = "Mail a.b@example.org or call +1 212-555-0147; card 4111-1111-1111-1111, ip 8.8.8.8."
    out, counts = r.redact(text)
    assert out == "Mail <|email|> or call <|phone|>; card <|credit_card|>, ip <|ip|>."
    assert counts == {"email": 1, "phone": 1, "credit_card": 1, "ip": 1}
    assert r.redact(out) == (out, {})
    # Detection is separate from replacement: redact exactly the spans given.
    spans = [s for s in r.detect(text) if s.type == "email"]
    assert r.redact(text, spans)[0].startswith("Mail <|email|> or call +1 212-555-0147")
    with pytest.raises(ValueError):
        r.redact(text, [PIISpan(0, 4, "email"), PIISpan(2, 6, "email")])


def test_types_subset_only_redacts_those():
    text = "a.b@example.org and 8.8.8.8"
    assert redactor(types=["ip"]).redact(text)[0] == "a.b@example.org and <|ip|>"
    assert redactor(types=[]).redact(text) == (text, {})


def test_pseudonyms_are_keyed_consistent_and_typed(monkeypatch):
    monkeypatch.delenv("PII_TEST_KEY", raising=False)
    with pytest.raises(UserError, match="PII_TEST_KEY"):
        redactor(replacement="pseudonym", secret_env="PII_TEST_KEY")
    monkeypatch.setenv("PII_TEST_KEY", "k1-very-secret")
    r1 = redactor(replacement="pseudonym", secret_env="PII_TEST_KEY")
    text = "Mail Jane.Doe@Example.org or call (212) 555-0147; later jane.doe@example.org, 212.555.0147, x@example.org"
    out, counts = r1.redact(text)
    assert counts == {"email": 3, "phone": 2}
    tags = re.findall(r"<\|(\w+):([0-9a-f]{8})\|>", out)
    assert [t for t, _ in tags] == ["email", "phone", "email", "phone", "email"]
    assert tags[0] == tags[2] and tags[1] == tags[3]  # the same value in another spelling, same tag
    assert tags[4] != tags[0]  # another address, another tag
    # The key is never part of the object's pickled state or of the output.
    assert b"k1-very-secret" not in pickle.dumps(r1) and "k1-very-secret" not in out
    monkeypatch.setenv("PII_TEST_KEY", "another-key")
    r2 = redactor(replacement="pseudonym", secret_env="PII_TEST_KEY")
    assert r2.redact("jane.doe@example.org")[0] != r1.redact("jane.doe@example.org")[0]


def test_picklable_for_worker_processes(r):
    text = "Tel:+442079460958 and a.b@example.org"
    clone = pickle.loads(pickle.dumps(r))
    assert clone.engine == r.engine and clone.detect(text) == r.detect(text)


def test_config_errors_name_the_key():
    from pretrain.config import load_config
    from pretrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"scrub.pii.types: unknown type\(s\) \['passport'\]"):
        load_config(None, ["scrub.pii.types=[email,passport]"])
    with pytest.raises(UserError, match="scrub.pii.types"):
        redactor(types=["email", "passport"])
    with pytest.raises(UserError, match="scrub.pii.phone_regions"):
        redactor(phone_regions=["US", "XX"])


def test_measure_throughput_counts_utf8_bytes(monkeypatch):
    r = redactor()
    texts = ["Grüße aus München, schreib an a.b@example.org. "] * 10
    clock = iter([10.0, 12.0])
    monkeypatch.setattr(redactor_mod.time, "perf_counter", lambda: next(clock))
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    assert nbytes > sum(len(t) for t in texts)
    assert measure_throughput(r, texts) == pytest.approx(nbytes / 1e6 / 2.0)
