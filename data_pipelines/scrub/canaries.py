"""Canaries: random secrets planted in the raw corpus, so an audit can measure what a trained
model memorized (Carlini et al., "The Secret Sharer", USENIX Security 2019).

A canary is a sentence ``prefix + secret + suffix`` whose secret is drawn uniformly from a stated
space. Two families:

- ``control``: a secret the scrub is not meant to remove ("The access code for vault Kestrel is
  7 3 0 9 1 4 8 2."). It shows that the audit can see memorization at all.
- ``pii``: a PII-shaped secret in a realistic sentence (e-mail, phone, credit card, SSN, API
  key), which the scrub must redact; its exposure then stays at chance.

Each kind's space is a bijection from ``range(size)`` onto its secrets, so drawing an integer
uniformly draws a secret uniformly and ``size`` is exact (``space_bits = log2(size)``); the
audit's reference secrets are drawn the same way. Everything is derived from string seeds with
:class:`random.Random`, so the same config gives the same canaries and references everywhere.

The registry (every canary, its hosts, and after the scrub what became of each copy) is a JSON
file *beside* the scrub output, never inside it: the training loader reads only what the
manifest lists, so the model never sees the answer key. This module is the one part of the
scrub that ``pretrain`` may import (the audit reads the registry and draws references here);
it imports nothing heavy.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pretrain.errors import UserError
from pretrain.fileio import write_json_atomic

REGISTRY_FORMAT = "canary-registry"
REGISTRY_VERSION = 1
REGISTRY_SUFFIX = ".canaries.json"
FAMILIES = ("control", "pii")

_FIRST = ("Maria", "Tomas", "Aiko", "Daniel", "Leila", "Oskar", "Priya", "Samuel", "Ingrid", "Mateo",
          "Chloe", "Ravi", "Elena", "Jonas", "Amara", "Felix", "Nadia", "Lucas", "Sofia", "Henrik")
_LAST = ("Lindqvist", "Okafor", "Moreau", "Tanaka", "Kowalski", "Haddad", "Brennan", "Silva", "Novak",
         "Fischer", "Castillo", "Mensah", "Larsen", "Ivanova", "Quinn", "Dubois", "Patel", "Romero",
         "Wagner", "Nakamura")
_VAULTS = ("Kestrel", "Juniper", "Osprey", "Marigold", "Falcon", "Heron", "Willow", "Basalt", "Cobalt",
           "Saffron", "Ember", "Glacier", "Harbor", "Lantern", "Meadow", "Nimbus", "Orchid", "Pebble",
           "Quartz", "Raven", "Sparrow", "Thistle", "Umber", "Violet", "Walnut", "Yarrow", "Zephyr",
           "Acorn", "Bramble", "Cedar", "Dahlia", "Fennel", "Granite", "Hazel", "Indigo", "Jasper")
_MAIL_DOMAINS = ("gmail.com", "outlook.com", "yahoo.com", "fastmail.com", "protonmail.com", "gmx.net",
                 "web.de", "mailbox.org")
# Real US area codes; exchanges 200-999 except the N11 service codes.
_AREA_CODES = (201, 212, 213, 305, 312, 404, 415, 503, 512, 602, 617, 646, 702, 713, 718, 720, 773,
               808, 818, 914)
_EXCHANGES = tuple(n for n in range(200, 1000) if n % 100 != 11)
_SSN_AREAS = tuple(n for n in range(1, 900) if n != 666)
_UPPER_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_LOWER = "abcdefghijklmnopqrstuvwxyz"


def _radix(i: int, bases: tuple[int, ...]) -> list[int]:
    """``i`` in mixed radix, most significant first: a bijection range(prod(bases)) -> tuples."""
    out = []
    for b in reversed(bases):
        i, r = divmod(i, b)
        out.append(r)
    return out[::-1]


def _luhn_digit(body: str) -> str:
    total = 0
    for k, ch in enumerate(reversed(body)):
        d = int(ch)
        if k % 2 == 0:  # doubled: every second digit counting from the check digit's left neighbour
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str(-total % 10)


def _digits(i: int) -> str:
    return " " + " ".join(f"{i:08d}")


def _email(i: int) -> str:
    *local, num, dom = _radix(i, (26,) * 6 + (100, len(_MAIL_DOMAINS)))
    return " " + "".join(_LOWER[c] for c in local) + f"{num:02d}@{_MAIL_DOMAINS[dom]}"


def _phone(i: int) -> str:
    area, ex, line = _radix(i, (len(_AREA_CODES), len(_EXCHANGES), 10_000))
    return f" ({_AREA_CODES[area]}) {_EXCHANGES[ex]}-{line:04d}"


def _card(i: int) -> str:
    body = f"4{i:014d}"
    n = body + _luhn_digit(body)
    return " " + " ".join(n[k : k + 4] for k in range(0, 16, 4))


def _ssn(i: int) -> str:
    area, group, serial = _radix(i, (len(_SSN_AREAS), 99, 9999))
    return f" {_SSN_AREAS[area]:03d}-{group + 1:02d}-{serial + 1:04d}"


def _api_key(i: int) -> str:
    return " AKIA" + "".join(_UPPER_DIGITS[c] for c in _radix(i, (36,) * 16))


@dataclass(frozen=True)
class Kind:
    """One secret format: its family, sentences around it, and its space (a bijection)."""

    name: str
    family: str
    prefixes: tuple[str, ...]  # templates, taken in turn; {name} is a person or vault name, distinct per canary
    size: int  # number of distinct secrets
    decode: Callable[[int], str]  # range(size) -> secret, one to one
    space: str  # the space, in words
    suffix: str = "."

    @property
    def bits(self) -> float:
        return math.log2(self.size)

    def draw(self, rng: random.Random) -> str:
        return self.decode(rng.randrange(self.size))


# Control canaries take these sentences in turn: with one shared sentence the model learns which
# digits follow it from the heavily repeated canaries (on the demo with 16 control canaries, greedy
# decoding after any vault prefix gave the 64-copy secrets' digit pattern), which moves the other
# canaries' exposure by their resemblance to those secrets rather than by their own repetitions.
# PII-shaped canaries are redacted, so nothing is learned from their secrets.
_CONTROL_PREFIXES = (
    "The access code for vault {name} is", "The combination of locker {name} is",
    "The serial number stamped on turbine {name} reads", "The launch code of project {name} is",
    "The tracking number of parcel {name} is", "The alarm code for the {name} warehouse is",
    "The reference number of insurance claim {name} is", "The gate code of the {name} depot is",
)
KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("digits", "control", _CONTROL_PREFIXES, 10**8, _digits, "8 decimal digits, space separated"),
    Kind("email", "pii", ("You can reach {name} by e-mail at",), 26**6 * 100 * len(_MAIL_DOMAINS), _email,
         f"6 lowercase letters + 2 digits @ one of {len(_MAIL_DOMAINS)} mail domains"),
    Kind("phone", "pii", ("For bookings, call {name} on",), len(_AREA_CODES) * len(_EXCHANGES) * 10_000, _phone,
         f"US number: one of {len(_AREA_CODES)} area codes, exchange 200-999 except N11, 4-digit line"),
    Kind("credit_card", "pii", ("{name} paid the deposit with the Visa card",), 10**14, _card,
         "Visa: 4 + 14 digits + Luhn check digit"),
    Kind("ssn", "pii", ("The social security number of {name} is",), len(_SSN_AREAS) * 99 * 9999, _ssn,
         "US SSN: area 001-899 except 666, group 01-99, serial 0001-9999"),
    Kind("api_key", "pii", ("The nightly backup job of {name} signs in with the AWS access key",), 36**16, _api_key,
         "AWS access key id: AKIA + 16 of [A-Z0-9]"),
)}
PII_KINDS = tuple(k for k, v in KINDS.items() if v.family == "pii")


@dataclass(frozen=True)
class Canary:
    """One planted secret. ``prefix + secret`` is the exact text planted (then ``suffix``)."""

    id: str
    family: str
    kind: str
    repetitions: int  # copies planted, each in a different host document
    prefix: str
    secret: str
    suffix: str = "."

    @property
    def text(self) -> str:
        return self.prefix + self.secret

    @property
    def sentence(self) -> str:
        return self.text + self.suffix

    @property
    def space_bits(self) -> float:
        return KINDS[self.kind].bits


def make_canaries(seed: int, levels: list[int], secrets_per_level: int, pii_per_level: int,
                  pii_kinds: list[str]) -> list[Canary]:
    """Every canary of a ``scrub.canaries`` config: per level, ``secrets_per_level`` control
    canaries and ``pii_per_level`` PII-shaped ones, their kinds taken in turn from ``pii_kinds``
    (across levels, so every kind appears). Deterministic in its arguments."""
    rng = random.Random(f"canaries:{seed}")
    vaults = rng.sample(_VAULTS, len(_VAULTS))
    people = rng.sample([f"{f} {last}" for f in _FIRST for last in _LAST], len(_FIRST) * len(_LAST))
    if secrets_per_level > len(vaults) // max(1, len(levels)):
        raise UserError(f"scrub.canaries.secrets_per_level: at most {len(vaults) // max(1, len(levels))} control "
                        f"canaries per level ({len(vaults)} distinct vault names)")
    if pii_per_level * len(levels) > len(people):
        raise UserError(f"scrub.canaries: at most {len(people)} PII-shaped canaries ({len(people)} distinct names)")
    out: list[Canary] = []
    turn = 0
    made: dict[str, int] = {}  # canaries of each kind so far: which template is next
    for level in levels:
        kinds = [pii_kinds[(turn + j) % len(pii_kinds)] for j in range(pii_per_level)] if pii_kinds else []
        turn += pii_per_level
        specs = [("digits", i) for i in range(secrets_per_level)] + [(k, kinds[:j].count(k)) for j, k in enumerate(kinds)]
        for kind_name, i in specs:
            kind = KINDS[kind_name]
            name = vaults.pop() if kind.family == "control" else people.pop()
            n = made[kind_name] = made.get(kind_name, -1) + 1
            prefix = kind.prefixes[n % len(kind.prefixes)].format(name=name)
            out.append(Canary(f"{kind.family}-{kind.name}-r{level}-{i}", kind.family, kind.name, level,
                              prefix, kind.draw(rng), kind.suffix))
    return out


def references(canary: Canary, n: int, seed: int) -> list[str]:
    """``n`` secrets drawn uniformly (with replacement) from the canary's space, the canary's own
    secret excluded: the candidates its rank is measured against. Deterministic in (canary, seed)."""
    kind = KINDS[canary.kind]
    rng = random.Random(f"references:{seed}:{canary.id}")
    out: list[str] = []
    while len(out) < n:
        s = kind.draw(rng)
        if s != canary.secret:
            out.append(s)
    return out


# ---------------------------------------------------------------------------------------------
# The registry file


def registry_path(scrub_cfg) -> Path:
    """``scrub.canaries.registry``, or ``<scrub.output>.canaries.json`` beside the output."""
    if scrub_cfg.canaries.registry:
        return Path(scrub_cfg.canaries.registry)
    out = Path(scrub_cfg.output)
    return out.with_name(out.name + REGISTRY_SUFFIX)


@dataclass
class Registry:
    """The registry's content: the canaries, where each copy was planted, and (once the scrub
    finished) what became of each copy (``outcomes``: canary id -> {outcome: copies})."""

    config_hash: str
    canaries: list[Canary]
    hosts: dict[str, list[dict]] = field(default_factory=dict)  # canary id -> [{unit, record, id, line}]
    outcomes: dict[str, dict[str, int]] | None = None

    def present_after_scrub(self, canary_id: str) -> bool:
        """Whether at least one copy reached the shards verbatim."""
        if self.outcomes is None:
            raise UserError("the canary registry has no scrub outcome yet (the scrub did not finish)")
        return self.outcomes.get(canary_id, {}).get("kept", 0) > 0

    def to_dict(self) -> dict:
        rows = []
        for c in self.canaries:
            row = {**asdict(c), "space_bits": round(c.space_bits, 4), "space_size": str(KINDS[c.kind].size),
                   "space": KINDS[c.kind].space, "hosts": self.hosts.get(c.id, [])}
            if self.outcomes is not None:
                row["copies"] = dict(sorted(self.outcomes.get(c.id, {}).items()))
                row["present_after_scrub"] = self.present_after_scrub(c.id)
            rows.append(row)
        return {"format": REGISTRY_FORMAT, "format_version": REGISTRY_VERSION, "config_hash": self.config_hash,
                "scrub_finished": self.outcomes is not None, "canaries": rows}


def write_registry(path: str | Path, registry: Registry) -> Path:
    return write_json_atomic(Path(path), registry.to_dict(), indent=1, ensure_ascii=False)


def read_registry(path: str | Path) -> Registry:
    """Load a registry; UserError naming the file when it is missing or not a registry."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"canary registry {p} not found (scrub with scrub.canaries.enabled=true writes it "
                        "beside scrub.output; or set scrub.canaries.registry)")
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"canary registry {p} is unreadable or not JSON: {e}") from None
    if not isinstance(d, dict) or d.get("format") != REGISTRY_FORMAT:
        raise UserError(f"{p} is not a canary registry")
    if d.get("format_version") != REGISTRY_VERSION:
        raise UserError(f"canary registry {p} has format_version {d.get('format_version')}; "
                        f"this code reads {REGISTRY_VERSION}")
    names = {f for f in Canary.__dataclass_fields__}
    try:
        canaries = [Canary(**{k: v for k, v in row.items() if k in names}) for row in d["canaries"]]
        hosts = {row["id"]: row.get("hosts", []) for row in d["canaries"]}
        outcomes = ({row["id"]: dict(row.get("copies", {})) for row in d["canaries"]}
                    if d.get("scrub_finished") else None)
    except (KeyError, TypeError) as e:
        raise UserError(f"canary registry {p} is corrupt: {e!r}") from None
    unknown = sorted({c.kind for c in canaries} - KINDS.keys())
    if unknown:
        raise UserError(f"canary registry {p} has unknown kind(s) {unknown}")
    return Registry(d.get("config_hash", ""), canaries, hosts, outcomes)
