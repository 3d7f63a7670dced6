"""A PII evaluation set the detector was not written against.

Built in code, seeded, from sources other than the generator the detector was tuned on
(:mod:`data_pipelines.evaluation.pii_synth`, which uses Faker's phone provider):

* **phones**: ``phonenumbers.example_number_for_type`` for every region and every number type,
  each written in E164, international, national and RFC 3966 form and as a local number (the
  national significant number, spaced or dashed in groups); the label holds whatever
  ``phonenumbers`` says about validity, so the detector's own last check is not the oracle.
  National and local forms carry a cue word in the document's language (that is how people
  write them: "Tel.: 06 12 34 56 78"); international forms appear with and without cues.
* **shapes**: contact cards, signature blocks, chat lines and form fields in 24 locales.
* **other types** the rules of issue 14 are about: IPv6 outside 2000::/3, IPv4 in reserved space
  and glued to HTML markup with a port, IBANs in lower case and without groups, e-mail addresses
  inside URLs and with ``'`` or ``&`` in the local part.
* **hard negatives** for every rule, planted next to cue words: dates, times, year ranges,
  decimals, counts, section/chapter/figure/version numbers, netmasks, loopback/link-local/
  documentation/multicast addresses, IBANs failing mod-97, file names with ``@``.

Records have the :mod:`data_pipelines.evaluation.pii_eval` format (``text``, ``spans``, ``negatives``, plus
``locale`` and ``shape``). National numbers shorter than 6 digits (a few small territories) are
left out: no reader can tell "Tel 4321" from a room number.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

from data_pipelines.scrub.filters.pii import IBAN_LENGTHS

Piece = tuple[str, str | None]  # (text, label): label a PII type, "neg:<kind>", or None for filler


@dataclass(frozen=True)
class Locale:
    code: str
    region: str  # a region whose example numbers this locale's documents favour
    phone: str  # "Phone"-like field name
    mobile: str
    fax: str
    call_me: str  # chat: "call me on"
    email: str
    chat_tail: str  # filler after a number in a chat line


LOCALES: tuple[Locale, ...] = (
    Locale("en_US", "US", "Phone", "Mobile", "Fax", "call me on", "Email", "thanks!"),
    Locale("en_GB", "GB", "Tel", "Mob", "Fax", "ring me on", "E-mail", "cheers"),
    Locale("es_ES", "ES", "Teléfono", "Móvil", "Fax", "llámame al", "Correo", "gracias"),
    Locale("es_MX", "MX", "Tel.", "Celular", "Fax", "márcame al", "Correo", "saludos"),
    Locale("pt_BR", "BR", "Telefone", "Celular", "Fax", "me liga no", "E-mail", "valeu"),
    Locale("pt_PT", "PT", "Telefone", "Telemóvel", "Fax", "liga-me para o", "E-mail", "obrigado"),
    Locale("fr_FR", "FR", "Tél.", "Portable", "Fax", "appelle-moi au", "Courriel", "merci"),
    Locale("de_DE", "DE", "Telefon", "Handy", "Fax", "ruf mich an unter", "E-Mail", "danke"),
    Locale("de_CH", "CH", "Tel.", "Mobil", "Fax", "ruf mich an:", "E-Mail", "merci"),
    Locale("it_IT", "IT", "Telefono", "Cellulare", "Fax", "chiamami al", "Email", "grazie"),
    Locale("nl_NL", "NL", "Telefoon", "Mobiel", "Fax", "bel me op", "E-mail", "bedankt"),
    Locale("pl_PL", "PL", "Telefon", "Tel. kom.", "Faks", "zadzwoń pod", "E-mail", "dzięki"),
    Locale("ru_RU", "RU", "Телефон", "Моб.", "Факс", "звоните на", "Почта", "спасибо"),
    Locale("uk_UA", "UA", "Телефон", "Моб.", "Факс", "телефонуйте", "Пошта", "дякую"),
    Locale("tr_TR", "TR", "Telefon", "Cep", "Faks", "beni ara:", "E-posta", "teşekkürler"),
    Locale("ja_JP", "JP", "電話", "携帯", "FAX", "電話してください", "メール", "よろしく"),
    Locale("zh_CN", "CN", "电话", "手机", "传真", "打我电话", "邮箱", "谢谢"),
    Locale("zh_TW", "TW", "電話", "手機", "傳真", "打電話給我", "信箱", "謝謝"),
    Locale("ko_KR", "KR", "전화", "휴대폰", "팩스", "전화 주세요", "이메일", "감사"),
    Locale("ar_EG", "EG", "هاتف", "موبايل", "فاكس", "اتصل بي على", "بريد", "شكرا"),
    Locale("fa_IR", "IR", "تلفن", "همراه", "فاکس", "تلفن بزنید", "ایمیل", "مرسی"),
    Locale("hi_IN", "IN", "फ़ोन", "मोबाइल", "फैक्स", "मुझे फोन करें", "ईमेल", "धन्यवाद"),
    Locale("id_ID", "ID", "Telepon", "Ponsel", "Faks", "hubungi saya di", "Email", "makasih"),
    Locale("vi_VN", "VN", "Điện thoại", "Di động", "Fax", "gọi cho tôi", "Email", "cảm ơn"),
    Locale("sv_SE", "SE", "Telefon", "Mobil", "Fax", "ring mig på", "E-post", "tack"),
    Locale("cs_CZ", "CZ", "Telefon", "Mobil", "Fax", "volejte", "E-mail", "díky"),
)

_NAMES = ("A. Rossi", "M. Jansen", "K. Nowak", "L. Martin", "J. Schmidt", "S. Tanaka", "P. Silva", "R. Kaya",
          "D. Ivanova", "H. Kim", "N. Haddad", "T. Nguyen")
_ROLES = ("Sales", "Support", "Head of Operations", "Buchhaltung", "Accueil", "Ufficio tecnico", "Front desk")
_DOMAINS = ("example.org", "mail.example.net", "lists.example.com", "corp.example.co.uk", "example.de")

_NEGATIVES: dict[str, tuple[str, ...]] = {
    # (text, what a cue word may sit next to)
    "date": ("2023-10-05", "05.10.2023", "10/05/2023", "1999-12-31"),
    "time": ("14:30", "9:00-17:30", "08:15:30"),
    "year_range": ("1990-2000", "2019/20", "1914-1918"),
    "decimal": ("3.14159", "40.7128", "0.498699", "1.250,00"),
    "count": ("12", "365", "2500", "48 h"),
    "section_number": ("Chapter 4.2.1.3", "Section 8.2.4.44", "Figure 1.2.3.4", "Table 10.1.2.3",
                       "Kapitel 3.1.2.4", "Abschnitt 2.10.3.1", "capítulo 5.1.2.3"),
    "version": ("v1.2.3.4", "version 10.0.19041.1", "release 2.13.1", "v4.18.0.147"),
    "netmask": ("255.255.255.0", "255.255.240.0"),
    "kept_ip": ("127.0.0.1", "0.0.0.0", "169.254.10.1", "224.0.0.251", "192.0.2.7", "198.51.100.23",
                "203.0.113.9", "::1", "fe80::1:2:3", "ff02::1:2", "2001:db8::5", "2001:db8:85a3::8a2e:370:7334"),
    "private_ip": ("10.0.0.1", "192.168.1.20", "172.16.4.2", "fd00::1:2:3"),
    "bad_iban": ("de88 3704 0044 0532 0130 00", "gb83west12345698765432", "FR7630006000011234567890188"),
    "not_email": ("icon@2x.png", "@example", "user@localhost", "logo@3x.webp"),
}


def _ip_positives(rng: random.Random) -> list[str]:
    """Addresses to redact: IPv6 outside 2000::/3 (unassigned space), global IPv6, reserved and
    global IPv4."""
    out = []
    for _ in range(3):
        first = rng.choice([0x4000, 0x5a00, 0x6000, 0x8000, 0xa000, 0xc000, 0xe000, 0x2a00, 0x2600, 0x2001])
        groups = [first | rng.randrange(0x100)] + [rng.randrange(0x10000) for _ in range(7)]
        addr = ipaddress.IPv6Address(":".join(f"{g:x}" for g in groups))
        if addr in ipaddress.IPv6Network("2001:db8::/32"):
            continue
        out.append(addr.compressed)
    for _ in range(2):
        a = rng.choice([rng.randrange(1, 10), rng.randrange(11, 100), rng.randrange(101, 127), rng.randrange(128, 169),
                        rng.randrange(173, 192), rng.randrange(193, 223), rng.randrange(240, 255)])
        out.append(f"{a}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}")
    return out


def _iban(rng: random.Random) -> str:
    country = rng.choice(["DE", "FR", "GB", "IT", "NL", "ES", "CH", "PL", "BE", "AT", "SE", "NO", "PT", "TR"])
    n = IBAN_LENGTHS[country]
    bban = "".join(rng.choice("0123456789") for _ in range(n - 4))
    if country in ("GB", "NL"):
        bban = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4)) + bban[4:]
    num = int("".join(str(int(c, 36)) for c in bban + country + "00"))
    compact = f"{country}{98 - num % 97:02d}{bban}"
    grouped = " ".join(compact[i:i + 4] for i in range(0, len(compact), 4))
    return rng.choice([compact, grouped, compact.lower(), grouped.lower()])


def _email(rng: random.Random) -> tuple[str, str, str]:
    """(before, address, after): plain, with ' or &, or inside a URL."""
    user = rng.choice(["o'neil", "j.o'brien", "r&d", "sales&marketing", "jan.kowalski", "marie-claire", "a_b"])
    addr = f"{user}{rng.randrange(100)}@{rng.choice(_DOMAINS)}"
    shape = rng.randrange(5)
    if shape == 0:
        return "imap://", addr, "/INBOX"
    if shape == 1:
        return "https://lists.example.com/archives/", addr, "/msg00042.html"
    if shape == 2:
        return "<mailto:", addr, ">"
    if shape == 3:
        return "&lt;", addr, "&gt;"
    return "", addr, ""


def _local_form(nsn: str, rng: random.Random, sep: str) -> str:
    """The national significant number in groups, as written locally: NNN NNNN, NN NN NN NN, ..."""
    n = len(nsn)
    layouts = {6: [(3, 3), (2, 2, 2)], 7: [(3, 4)], 8: [(4, 4), (2, 3, 3), (2, 2, 2, 2)], 9: [(3, 3, 3), (2, 3, 2, 2)],
               10: [(3, 3, 4), (2, 4, 4), (2, 2, 2, 2, 2)], 11: [(3, 4, 4), (2, 4, 5)], 12: [(3, 3, 3, 3)]}
    layout = rng.choice(layouts.get(n, [(n,)]))
    out, pos = [], 0
    for k in layout:
        out.append(nsn[pos:pos + k])
        pos += k
    return sep.join(out)


def phone_forms(region: str, rng: random.Random) -> list[tuple[str, bool]]:
    """Every example number of ``region`` in every written form: (text, needs a cue)."""
    import phonenumbers as pn  # heavy metadata, loaded only to build the set

    fmt = pn.PhoneNumberFormat
    out: list[tuple[str, bool]] = []
    seen: set[str] = set()
    for ntype in sorted(v for k, v in vars(pn.PhoneNumberType).items() if k.isupper() and k != "UNKNOWN"):
        num = pn.example_number_for_type(region, ntype)
        if num is None:
            continue
        nsn = pn.national_significant_number(num)
        if nsn in seen:
            continue
        seen.add(nsn)
        out += [(pn.format_number(num, fmt.E164), False), (pn.format_number(num, fmt.INTERNATIONAL), False),
                (pn.format_number(num, fmt.RFC3966).removeprefix("tel:"), False)]
        if len(nsn) >= 6:
            out += [(pn.format_number(num, fmt.NATIONAL), True),
                    (_local_form(nsn, rng, " "), True), (_local_form(nsn, rng, "-"), True)]
    return out


def _phone_doc(loc: Locale, numbers: list[tuple[str, bool]], rng: random.Random, cues: bool) -> list[Piece]:
    """One contact card, signature, chat line or form holding 1-3 numbers."""
    name, role = rng.choice(_NAMES), rng.choice(_ROLES)
    shape = rng.choice(["card", "signature", "chat", "form"])
    fields = [loc.phone, loc.mobile, loc.fax]
    pieces: list[Piece] = []
    if shape == "card":
        pieces.append((f"{name}\n{role}\n", None))
        for i, (num, _) in enumerate(numbers):
            pieces += [(f"{fields[i % 3]}: ", None), (num, "phone"), ("\n", None)]
        pieces.append((f"{loc.email}: ", None))
    elif shape == "signature":
        pieces.append((f"--\n{name} | {role}\n", None))
        for i, (num, _) in enumerate(numbers):
            pieces += [(f"{fields[0]} " if i == 0 else f" | {fields[i % 3]} ", None), (num, "phone")]
        pieces.append(("\nwww.example.org\n", None))
    elif shape == "chat":
        pieces.append((f"[{rng.randrange(24):02d}:{rng.randrange(60):02d}] {name.split()[-1].lower()}: ", None))
        for i, (num, _) in enumerate(numbers):
            pieces += [(f"{loc.call_me} " if i == 0 else rng.choice([" / ", ", ", " or ", " · "]), None), (num, "phone")]
        pieces.append((f" {loc.chat_tail}\n", None))
    else:
        for i, (num, _) in enumerate(numbers):
            pieces += [(f"{fields[i % 3]} ({role}):\t", None), (num, "phone"), (";\n", None)]
    if not cues:
        # The same documents with every cue word replaced: only numbers that need no cue stay labelled.
        words = set(fields) | {loc.call_me}
        out = []
        for text, label in pieces:
            for w in sorted(words, key=len, reverse=True):
                text = text.replace(w, "Ref") if label is None else text
            out.append((text, label))
        pieces = out
    return pieces


def _other_doc(loc: Locale, rng: random.Random) -> list[Piece]:
    """A form or mail body with e-mail addresses, IPs, IBANs and the hard negatives next to cues."""
    pieces: list[Piece] = []
    before, addr, after = _email(rng)
    pieces += [(f"{loc.email}: {before}", None), (addr, "email"), (f"{after}\n", None)]
    for ip in _ip_positives(rng)[:2]:
        shape = rng.randrange(4)
        if shape == 0 and ":" not in ip:
            pieces += [('<a href="http://', None), (ip, "ip"), (f':{rng.choice([80, 8080, 443])}/">', None)]
        elif shape == 1 and ":" not in ip:
            pieces += [("<td>", None), (ip, "ip"), (f":{rng.randrange(1024, 65535)}</td>", None)]
        else:
            pieces += [("login from ", None), (ip, "ip"), (" blocked; ", None)]
    pieces += [("\nIBAN: ", None), (_iban(rng), "iban"), ("\n", None)]
    # Hard negatives, each after a cue word of the type it could be confused with.
    for kind in rng.sample(sorted(_NEGATIVES), 4):
        value = rng.choice(_NEGATIVES[kind])
        cue = {"date": loc.phone, "time": f"{loc.phone} hours", "year_range": loc.mobile, "decimal": loc.fax,
               "count": f"{loc.phone} ext. room", "kept_ip": "host", "private_ip": "server", "bad_iban": "IBAN:",
               "not_email": loc.email, "netmask": "netmask", "version": "updated to",
               "section_number": "see"}[kind]
        pieces += [(f"{cue} ", None), (value, f"neg:{kind}"), (". ", None)]
    return pieces


def _record(pieces: list[Piece], locale: str, shape: str) -> dict:
    text, spans, negatives = "", [], []
    for chunk, label in pieces:
        if label and label.startswith("neg:"):
            negatives.append({"start": len(text), "end": len(text) + len(chunk), "kind": label[4:]})
        elif label:
            spans.append({"start": len(text), "end": len(text) + len(chunk), "type": label})
        text += chunk
    return {"text": text, "spans": spans, "negatives": negatives, "locale": locale, "shape": shape}


def make_heldout_set(seed: int = 14, cues: bool = True) -> list[dict]:
    """Every example number of every region in every form, in documents of 24 locales, plus
    documents with the other types and hard negatives. Seeded and reproducible.

    ``cues=False`` writes the same phone documents with the cue words replaced, and keeps labels
    only on numbers that need no cue (``+``/international forms): what the detector finds without
    context.
    """
    import phonenumbers as pn  # heavy metadata, loaded only to build the set

    rng = random.Random(seed)
    records = []
    for region in sorted(pn.SUPPORTED_REGIONS):
        forms = phone_forms(region, rng)
        if not cues:
            forms = [f for f in forms if not f[1]]
        rng.shuffle(forms)
        for i in range(0, len(forms), 3):
            loc = rng.choice(LOCALES)
            pieces = _phone_doc(loc, forms[i:i + rng.choice([1, 2, 3])], rng, cues)
            records.append(_record(pieces, loc.code, "phone"))
    for i in range(len(LOCALES) * 12):
        loc = LOCALES[i % len(LOCALES)]
        records.append(_record(_other_doc(loc, rng), loc.code, "form"))
    return records
