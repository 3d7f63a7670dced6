import unicodedata

from data_pipelines.scrub.filters.normalize import normalize_text


def test_nfc_and_controls():
    decomposed = "Cafe\u0301 \x00na\x07i\u0308ve\r\nline2\rline3\ttab\x7f\x9f\ufeff"
    out = normalize_text(decomposed)
    assert out.text == "Café naïve\nline2\nline3\ttab"
    assert unicodedata.is_normalized("NFC", out.text)
    assert out.invalid_bytes == 0


def test_surrogate_escaped_bytes_are_repaired_and_counted():
    raw = b"ok \xff\xfe text \xc3"  # two stray bytes and a truncated sequence
    text = raw.decode("utf-8", errors="surrogateescape")
    out = normalize_text(text)
    assert out.text == "ok \ufffd\ufffd text \ufffd"
    assert out.invalid_bytes == 3
    assert abs(out.invalid_ratio(len(text)) - 3 / len(text)) < 1e-12


def test_idempotent_and_ascii_fast_path():
    s = "plain ascii\nkept\ttabs"
    assert normalize_text(s).text == s
    once = normalize_text("x\u0065\u0301\x01").text
    assert normalize_text(once).text == once
