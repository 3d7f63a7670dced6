"""Labelled synthetic PII documents (Faker) for the PII evaluation, the tests and the bench.

Faker is a dev/test dependency: it is imported inside the functions, so importing this module is
free and the scrub never needs it.

A record is ``{"text", "spans": [{"start", "end", "type"}], "negatives": [{"start", "end",
"kind"}], "locale"}``. ``spans`` are the PII the detector must find; ``negatives`` mark the hard
negatives planted on purpose (versions, dates, times, ISBNs, DOIs, hashes, GUIDs, numeric
tables, coordinates, math, phone-/card-/SSN-/IBAN-shaped invalid values, private IPs) so an
evaluation can say which kind caused a false positive.

Labelling rules (independent of the detector's code paths where possible):

* phone: every Faker number that ``phonenumbers`` can parse for its locale's region is labelled,
  whether or not ``is_valid_number`` accepts it (that is the detector's own last check: filtering
  by it made the set agree with the detector by construction). Every number
  follows a cue word ("Call", "Tel.", "mobile"). National formats appear only for regions in
  ``phone_regions``; other locales write numbers internationally, as foreign numbers are written
  in real text. Some numbers are glued to text ("call2125550147now", "Tel:+44..."). The held-out
  set of :mod:`data_pipelines.evaluation.pii_heldout` is the phone bar that does not come from Faker.
* ip: public IPv4 and global-unicast IPv6 are PII; private, loopback and documentation addresses
  are negatives (the default ``redact_private_ips=false``).
* credit_card, iban, ssn: Faker's values (Luhn / mod-97 / valid area-group-serial) in several
  written formats; negatives are the same shapes with a broken checksum or a forbidden part.
* secret, url_credentials: random tokens with each provider's real prefix and length; the
  url_credentials span is the ``user:password`` part.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import string
import uuid

LOCALES: tuple[str, ...] = ("en_US", "en_GB", "de_DE", "fr_FR", "en_IN", "es_ES", "it_IT", "nl_NL")
IBAN_LOCALES = ("de_DE", "fr_FR", "en_GB", "es_ES", "it_IT", "nl_NL")
DEFAULT_PHONE_REGIONS = ("US", "GB", "DE", "FR", "IN")


class _Doc:
    """Accumulates text pieces and their labels."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.pos = 0
        self.spans: list[dict] = []
        self.negatives: list[dict] = []

    def add(self, s: str, label: str | None = None, kind: str | None = None) -> None:
        if label:
            self.spans.append({"start": self.pos, "end": self.pos + len(s), "type": label})
        if kind:
            self.negatives.append({"start": self.pos, "end": self.pos + len(s), "kind": kind})
        self.parts.append(s)
        self.pos += len(s)

    def text(self) -> str:
        return "".join(self.parts)


def _region(locale: str) -> str:
    return locale.split("_")[1]


class _Gen:
    def __init__(self, seed: int, phone_regions: tuple[str, ...]):
        from faker import Faker

        self.rng = random.Random(seed)
        self.fakers = {}
        for i, loc in enumerate(LOCALES):
            f = Faker(loc)
            f.seed_instance(seed * 1000 + i)
            self.fakers[loc] = f
        self.phone_regions = set(phone_regions)

    # ---- positives: each returns (prefix, value, suffix, type[, value_subspan]) -----------------

    def email(self, f) -> list[tuple[str, str | None]]:
        e = self.rng.choice([f.email, f.free_email, f.company_email, f.ascii_safe_email])()
        if self.rng.random() < 0.2:
            e = f"{f.user_name()}.{self.rng.randint(1, 99)}+news@{f.domain_name()}"
        lead = self.rng.choice(["Contact ", "Write to ", "e-mail: ", "Mail: <", "reach her at ", "("])
        tail = {"Mail: <": ">", "(": ")"}.get(lead, self.rng.choice([".", " for details.", ", thanks.", " today."]))
        return [(lead, None), (e, "email"), (tail, None)]

    def phone(self, f, locale: str) -> list[tuple[str, str | None]] | None:
        import phonenumbers as pn

        region = _region(locale)
        for _ in range(30):
            num = f.phone_number()
            body = num.split("x")[0].strip()
            try:
                parsed = pn.parse(body, region)
            except pn.NumberParseException:
                continue
            if region not in self.phone_regions and not body.startswith("+"):
                num = pn.format_number(parsed, self.rng.choice([pn.PhoneNumberFormat.INTERNATIONAL, pn.PhoneNumberFormat.E164]))
            style = self.rng.random()
            if style < 0.12:
                return [(self.rng.choice(["call", "Tel:", "tel.", "ph:"]), None), (num, "phone"), (self.rng.choice(["now", ".", " today"]), None)]
            lead = self.rng.choice(["Call ", "Phone: ", "reach us on ", "Tel. ", "ring ", "mobile "])
            return [(lead, None), (num, "phone"), (self.rng.choice([".", " (office)", ", or write.", " after 6pm."]), None)]
        return None

    def ip(self, f) -> list[tuple[str, str | None]]:
        if self.rng.random() < 0.6:
            ip = f.ipv4_public()
        else:
            groups = [f"{self.rng.randint(0x2001, 0x3fff):x}"] + [f"{self.rng.randint(0, 0xffff):x}" for _ in range(7)]
            ip = ":".join(groups)
            if self.rng.random() < 0.4:
                ip = ":".join(groups[:3]) + "::" + groups[7]
        lead = self.rng.choice(["Login from ", "client ", "request from IP ", "src=", "the host at "])
        tail = self.rng.choice([" was blocked.", " failed.", ".", ":443." if "." in ip else "]:443."])
        if tail == "]:443.":
            lead += "["
        return [(lead, None), (ip, "ip"), (tail, None)]

    def credit_card(self, f) -> list[tuple[str, str | None]]:
        kind = self.rng.choice(["visa16", "visa13", "visa19", "mastercard", "amex", "discover", "diners", "jcb16", "jcb15", "maestro"])
        d = f.credit_card_number(card_type=kind)
        style = self.rng.random()
        if style < 0.4:
            s = d
        else:
            sep = " " if style < 0.75 else "-"
            # How issuers print them: Amex 4-6-5, Diners 4-6-4, 13 digits 4-4-5, else blocks of 4.
            if len(d) in (14, 15) and d[:2] in ("34", "37", "30", "36", "38"):
                blocks = [d[:4], d[4:10], d[10:]]
            elif len(d) == 13:
                blocks = [d[:4], d[4:8], d[8:]]
            else:
                blocks = [d[i:i + 4] for i in range(0, len(d), 4)]
            s = sep.join(blocks)
        lead = self.rng.choice(["card number ", "paid with ", "CC: ", "Kartennummer ", "charged to "])
        return [(lead, None), (s, "credit_card"), (self.rng.choice([".", " exp 04/27.", " on file."]), None)]

    def ssn(self) -> list[tuple[str, str | None]]:
        s = self.fakers["en_US"].ssn()
        return [(self.rng.choice(["SSN ", "social security number ", "SSN: "]), None), (s, "ssn"), (".", None)]

    def iban(self) -> list[tuple[str, str | None]]:
        v = self.fakers[self.rng.choice(IBAN_LOCALES)].iban()
        if self.rng.random() < 0.5:
            v = " ".join(v[i:i + 4] for i in range(0, len(v), 4))
        return [(self.rng.choice(["IBAN ", "transfer to ", "account: "]), None), (v, "iban"), (self.rng.choice([".", " (BIC on request)."]), None)]

    def _tok(self, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
        return "".join(self.rng.choice(alphabet) for _ in range(n))

    def secret(self, f) -> list[tuple[str, str | None]]:
        r = self.rng
        up = string.ascii_uppercase + string.digits
        kind = r.randrange(10)
        if kind == 0:
            return [("aws_access_key_id = ", None), ("AKIA" + self._tok(16, up), "secret"), ("\n", None)]
        if kind == 1:
            return [("aws_secret_access_key = ", None), (self._tok(40, string.ascii_letters + string.digits + "/+"), "secret"), ("\n", None)]
        if kind == 2:
            tok = r.choice(["ghp_", "gho_", "ghs_"]) + self._tok(36) if r.random() < 0.7 else "github_pat_" + self._tok(82, string.ascii_letters + string.digits + "_")
            return [("export GITHUB_TOKEN=", None), (tok, "secret"), ("\n", None)]
        if kind == 3:
            return [("Use ", None), ("glpat-" + self._tok(20, string.ascii_letters + string.digits + "-_"), "secret"), (" for the CI.", None)]
        if kind == 4:
            return [("SLACK_BOT=", None), ("xoxb-" + "-".join(self._tok(n, string.digits) for n in (12, 13)) + "-" + self._tok(24), "secret"), ("\n", None)]
        if kind == 5:
            return [("stripe.api_key = '", None), (r.choice(["sk_live_", "rk_live_"]) + self._tok(24), "secret"), ("'\n", None)]
        if kind == 6:
            return [("maps key ", None), ("AIza" + self._tok(35, string.ascii_letters + string.digits + "-_"), "secret"), (" in the page.", None)]
        if kind == 7:
            def b64(obj: dict) -> str:
                return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")
            jwt = ".".join([b64({"alg": "HS256", "typ": "JWT"}), b64({"sub": str(r.randrange(10**9)), "name": f.name()}), self._tok(43, string.ascii_letters + string.digits + "-_")])
            return [("Authorization: Bearer ", None), (jwt, "secret"), ("\n", None)]
        if kind == 8:
            body = "\n".join(self._tok(64, string.ascii_letters + string.digits + "+/") for _ in range(r.randint(3, 8)))
            kt = r.choice(["RSA ", "EC ", "OPENSSH ", ""])
            return [("key file:\n", None), (f"-----BEGIN {kt}PRIVATE KEY-----\n{body}\n-----END {kt}PRIVATE KEY-----", "secret"), ("\n", None)]
        name = r.choice(["password", "db_password", "API_KEY", "secret", "client_secret", "auth_token"])
        pw = f.password(length=r.randint(12, 20), special_chars=r.random() < 0.5)
        q = r.choice(['"', "'", ""])
        return [(f"{name} = {q}", None), (pw, "secret"), (f"{q}\n", None)]

    def url_credentials(self, f) -> list[tuple[str, str | None]]:
        user = f.user_name()
        pw = f.password(length=self.rng.randint(8, 16), special_chars=False)
        scheme = self.rng.choice(["https", "http", "ftp", "postgres", "mongodb+srv", "redis"])
        return [(f"Connect with {scheme}://", None), (f"{user}:{pw}", "url_credentials"), (f"@{f.domain_name()}/{f.uri_path()} today.", None)]

    def pii_item(self, kind: str, f, locale: str) -> list[tuple[str, str | None]] | None:
        if kind == "phone":
            return self.phone(f, locale)
        if kind in ("ssn", "iban"):
            return getattr(self, kind)()
        return getattr(self, kind)(f)

    # ---- hard negatives -----------------------------------------------------------------

    def negative(self, f) -> tuple[str, str, str, str]:
        """(prefix, value, suffix, kind)."""
        r = self.rng
        kind = r.choice(NEGATIVE_KINDS)
        if kind == "version":
            v = r.choice([
                f"v{r.randint(0, 12)}.{r.randint(0, 30)}.{r.randint(0, 99)}",
                f"{r.randint(1, 5)}.{r.randint(0, 20)}.{r.randint(0, 9)}",
                f"version {r.randint(1, 11)}.{r.randint(0, 9)}.{r.randint(10000, 22000)}.{r.randint(1, 900)}",
                f"v{r.randint(1, 9)}.{r.randint(0, 9)}.{r.randint(0, 9)}.{r.randint(0, 99)}",
            ])
            return "Upgrade to ", v, " first.", kind
        if kind == "date":
            d = f.date_between("-80y", "+5y")
            v = r.choice([d.isoformat(), d.strftime("%d.%m.%Y"), d.strftime("%m/%d/%Y"), d.strftime("%d/%m/%Y"), d.strftime("%Y/%m/%d"), f"{d.year}-{d.year + r.randint(1, 30)}"])
            return "On ", v, " it changed.", kind
        if kind == "time":
            v = r.choice([f.time(), f.iso8601(), f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}", f.date_time().strftime("%Y-%m-%d %H:%M:%S")])
            return "at ", v, " UTC.", kind
        if kind == "isbn":
            v = r.choice([f.isbn13(), f.isbn10(), "ISBN " + f.isbn13(), "ISBN " + f.isbn10().replace("-", "")])
            return "See ", v, ".", kind
        if kind == "doi":
            v = r.choice([f"10.{r.randint(1000, 99999)}/{self._tok(8).lower()}", f"doi:10.{r.randint(1000, 9999)}/{r.randint(100000, 9999999)}",
                          f"https://doi.org/10.{r.randint(1000, 9999)}/s{r.randint(10000, 99999)}-{r.randint(100, 999)}-{r.randint(1000, 9999)}-{r.randint(1, 9)}"])
            return "Cited as ", v, ".", kind
        if kind == "hash":
            data = self._tok(20).encode()
            v = r.choice([hashlib.md5(data).hexdigest(), hashlib.sha1(data).hexdigest(), hashlib.sha256(data).hexdigest(),
                          "commit " + hashlib.sha1(data).hexdigest()[: r.randint(7, 12)], "sha256:" + hashlib.sha256(data).hexdigest()])
            return "checksum ", v, " verified.", kind
        if kind == "guid":
            u = uuid.UUID(int=r.getrandbits(128), version=4)
            v = r.choice([str(u), str(u).upper(), "{" + str(u).upper() + "}", u.hex])
            return "id ", v, " created.", kind
        if kind == "table":
            rows = []
            for _ in range(r.randint(2, 4)):
                cells = [str(r.randint(1900, 2024)), f"{r.randint(1, 999):,}", f"{r.uniform(0, 100):.1f}", str(r.randint(10, 99999))]
                rows.append(r.choice([" | ".join(cells), " ".join(cells), "\t".join(cells)]))
            return "Results:\n", "\n".join(rows), "\n", kind
        if kind == "coordinates":
            lat, lon = f.latitude(), f.longitude()
            v = r.choice([f"{lat}, {lon}", f"{abs(float(lat)):.4f}° N, {abs(float(lon)):.4f}° W", f"({lat} {lon})"])
            return "Located at ", v, ".", kind
        if kind == "math":
            a, b = r.randint(2, 9999), r.randint(2, 9999)
            v = r.choice([f"{a} + {b} = {a + b}", f"{a} * {b} = {a * b}", f"2^{r.randint(20, 40)} = {2 ** r.randint(20, 40)}",
                          f"x = {a} - {b} / {r.randint(2, 99)}", f"{a}.{b} x 10^{r.randint(2, 9)}"])
            return "We get ", v, ".", kind
        if kind == "invalid_phone":
            v = r.choice([f"{r.randint(100, 199)}-{r.randint(200, 999)}-{r.randint(1000, 9999)}",
                          f"(0{r.randint(10, 99)}) {r.randint(1, 9)}-{r.randint(10, 99)}",
                          f"+44 20 {r.randint(1000, 9999)}", f"+1 {r.randint(200, 999)} {r.randint(100, 999)}",
                          f"{r.randint(10, 99)}-{r.randint(100, 999)}-{r.randint(10, 99)}"])
            return "ref ", v, " noted.", kind
        if kind == "private_ip":
            v = r.choice([f.ipv4_private(), "127.0.0.1", f"192.0.2.{r.randint(1, 254)}", f"10.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}", "::1", f"fe80::{r.randint(1, 0xffff):x}", f"2001:db8::{r.randint(1, 0xffff):x}"])
            return "local host ", v, " only.", kind
        if kind == "invalid_card":
            while True:
                d = str(r.choice([4, 5, 3, 6])) + "".join(str(r.randint(0, 9)) for _ in range(15))
                if not _luhn_valid(d):
                    break
            return "order ", r.choice([d, " ".join(d[i:i + 4] for i in range(0, 16, 4))]), " shipped.", kind
        if kind == "invalid_ssn":
            v = r.choice([f"000-{r.randint(10, 99)}-{r.randint(1000, 9999)}", f"666-{r.randint(10, 99)}-{r.randint(1000, 9999)}",
                          f"9{r.randint(10, 99)}-{r.randint(10, 99)}-{r.randint(1000, 9999)}", f"{r.randint(100, 599)}-00-{r.randint(1000, 9999)}"])
            return "form ", v, " rejected.", kind
        if kind == "invalid_iban":
            v = self.fakers[r.choice(IBAN_LOCALES)].iban()
            broken = v[:2] + f"{(int(v[2:4]) + r.randint(1, 90)) % 97 + 2:02d}"[-2:] + v[4:]
            if broken[2:4] == v[2:4]:
                broken = v[:2] + ("01" if v[2:4] != "01" else "02") + v[4:]
            return "bad account ", broken, ".", kind
        raise AssertionError(kind)


# Phones appear twice: they come in the most formats and are the hardest type.
_PII_KINDS = ("email", "phone", "phone", "ip", "credit_card", "ssn", "iban", "secret", "url_credentials")


def _luhn_valid(d: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(d)):
        x = int(c) * (2 if i % 2 else 1)
        total += x - 9 if x > 9 else x
    return total % 10 == 0


NEGATIVE_KINDS: tuple[str, ...] = (
    "version", "date", "time", "isbn", "doi", "hash", "guid", "table", "coordinates", "math",
    "invalid_phone", "private_ip", "invalid_card", "invalid_ssn", "invalid_iban",
)


def make_labelled_set(
    n_docs: int = 400,
    seed: int = 0,
    pii_per_doc: int = 4,
    negatives_per_doc: int = 4,
    phone_regions: tuple[str, ...] = DEFAULT_PHONE_REGIONS,
) -> list[dict]:
    """Labelled documents: locale prose with PII and hard negatives planted at random places."""
    g = _Gen(seed, tuple(phone_regions))
    r = g.rng
    records = []
    for i in range(n_docs):
        locale = LOCALES[i % len(LOCALES)]
        f = g.fakers[locale]
        items: list[tuple[str, list]] = []
        for _ in range(pii_per_doc):
            pieces = g.pii_item(r.choice(_PII_KINDS), f, locale)
            if pieces:
                items.append(("pii", pieces))
        for _ in range(negatives_per_doc):
            items.append(("neg", list(g.negative(f))))
        for _ in range(r.randint(2, 6)):
            items.append(("prose", [f.paragraph(nb_sentences=r.randint(1, 4))]))
        r.shuffle(items)
        doc = _Doc()
        doc.add(f.sentence() + " ")
        for what, pieces in items:
            if what == "prose":
                doc.add(pieces[0])
            elif what == "neg":
                pre, value, post, kind = pieces
                doc.add(pre)
                doc.add(value, kind=kind)
                doc.add(post)
            else:
                for s, label in pieces:
                    doc.add(s, label=label)
            doc.add(r.choice([" ", "\n", "\n\n", " "]))
        records.append({"text": doc.text(), "spans": doc.spans, "negatives": doc.negatives, "locale": locale})
    return records


# ------------------------------------------------------------------------------------------
# Bench corpus: real prose (gensim's bundled Wikipedia sample) with sparse synthetic PII.
# ------------------------------------------------------------------------------------------


def wikipedia_sample_texts() -> list[str]:
    """Plain text of the ~100 articles of gensim's bundled Wikipedia sample (offline)."""
    import bz2
    from pathlib import Path

    import gensim
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = Path(gensim.__file__).parent / "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    texts = []
    with bz2.open(path, "rb") as fh:
        for _title, raw, _pid in extract_pages(fh):
            text = filter_wiki(raw)
            if len(text) > 200:
                texts.append(text)
    return texts


def bench_texts(target_mb: float = 20.0, seed: int = 0, pii_every_bytes: int = 2000) -> list[str]:
    """~target_mb of Wikipedia prose (repeated) with one synthetic PII sentence per ~pii_every_bytes."""
    base = wikipedia_sample_texts()
    pii_docs = make_labelled_set(n_docs=200, seed=seed, negatives_per_doc=2)
    snippets = [r["text"][s["start"] - 20 if s["start"] >= 20 else 0: s["end"] + 20] for r in pii_docs for s in r["spans"]]
    rng = random.Random(seed)
    out: list[str] = []
    total = 0
    while total < target_mb * 1e6:
        for text in base:
            paras = text.split("\n")
            pos, budget = [], 0
            for p in paras:
                pos.append(p)
                budget += len(p)
                if budget >= pii_every_bytes:
                    pos.append(rng.choice(snippets))
                    budget = 0
            doc = "\n".join(pos)
            out.append(doc)
            total += len(doc.encode())
            if total >= target_mb * 1e6:
                break
    return out
