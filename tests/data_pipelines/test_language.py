import dataclasses

from data_pipelines.filters.language import LanguageFilter, bundled_model_path, detect_language
from pretrain.config import LanguageConfig


def test_bundled_model_is_used():
    p = bundled_model_path()
    assert p.name == "lid.176.ftz" and p.is_file()


def test_detects_languages():
    assert detect_language("The quick brown fox jumps over the lazy dog and runs into the forest.").lang == "en"
    assert detect_language("Der schnelle braune Fuchs springt über den faulen Hund und läuft weg.").lang == "de"
    assert detect_language("Le renard brun rapide saute par-dessus le chien paresseux ce matin.").lang == "fr"
    r = detect_language("Line one in English.\nLine two, also plainly English text here.")
    assert r.lang == "en" and 0.5 < r.score <= 1.0


def test_filter_keeps_configured_languages_above_threshold():
    cfg = LanguageConfig()
    en = "This is a perfectly ordinary English sentence about the weather today."
    de = "Das ist ein ganz gewöhnlicher deutscher Satz über das Wetter heute."
    assert LanguageFilter(cfg).keep(en)[0]
    assert not LanguageFilter(cfg).keep(de)[0]
    assert LanguageFilter(dataclasses.replace(cfg, languages=["en", "de"])).keep(de)[0]
    assert not LanguageFilter(dataclasses.replace(cfg, threshold=1.0)).keep(en)[0]
