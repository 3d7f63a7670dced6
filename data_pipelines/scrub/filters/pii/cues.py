"""Where a text says "this number is a phone": cue words before it, a label after it, a label on
the line above it, or a spoken phrase ("call me back on", "stop sending messages to").

People write phones four ways around the number, and each has its own rule:

* **before** (``Tel.: 030 1234567``, ``reach me at 6123 4567``): a label or a speech word at most
  a short gap before the number on its line, no sentence end in between;
* **after** (``555-0147-Office``, ``6123 4567 (mobile)``, ``030 1234567 ext. 12``): a label right
  after the number that ends the field, or an extension;
* **above** (``Phone:`` alone on a line, the number opening the next one);
* a **reference word** right before the number (``Invoice 4521 8890``, ``my registered account
  4521 8890``) says the opposite and wins over all three.

Words match as words: a cue inside a host name, URL or e-mail address (``fax@example.com``,
``sec.example.com``, ``https://example.com/contact``) is no cue. The vocabulary covers 24
languages. Scripts written without spaces between words (Chinese, Japanese, Thai) and scripts
whose words take glued prefixes (Arabic, Persian, Hebrew, Devanagari's vowel signs) are matched
as substrings; the others as words, where ``*`` marks a stem ("telefon*" is "Telefonnummer").
"""

from __future__ import annotations

import re

# Kinds of cue. LABEL names a phone field and works anywhere before the number; FIELD words
# ("home", "office", single letters "T", "M") are phones only where they name a field; SPEECH
# says it in a sentence ("call me back on"); REF says the number is an invoice, order or account.
LABEL, FIELD, SPEECH, REF = "label", "field", "speech", "ref"

_WORDS: dict[str, dict[str, str]] = {
    "en": {
        LABEL: "phone* telephon* mobile* cellphone* cellular* whatsapp* tel ph phn fax* sms mob cel cell "
               "landline* hotline* helpline* ddi tfn",
        FIELD: "office* desk home work direct main private switchboard reception business residence",
        SPEECH: "call* ring ringing dial dialing dialling reach reachable reach_me reach_us contact* answering "
                "not_answer* no_answer nobody_answer* messag* texting text_me text_us my_registered our_registered "
                "your_registered registered_number registered_mobile my_number our_number my_no",
        REF: "invoice* order* account* acct ref reference* ticket* case customer* client* member* policy* "
             "contract* serial* sku item* tracking* shipment* parcel* booking* reservation* confirmation* "
             "transaction* receipt* id pin zip postcode* iban bic swift routing* patient* employee* student* "
             "licen* passport* model* flight* batch lot isbn*",
    },
    "es": {
        LABEL: "teléfono* telefono* tfno telf móvil* movil* celular* fax whatsapp",
        FIELD: "oficina casa trabajo particular directo fijo despacho centralita",
        SPEECH: "llam* llám* márcame marcar contacto* contest* mensaje* escríbeme escribeme localizarme "
                "localizable mi_número mi_numero mi_celular mi_móvil",
        REF: "factura* pedido* cuenta* referencia* cliente* póliza* poliza* contrato* expediente* reserva* albarán*",
    },
    "pt": {
        LABEL: "telefone* telemóvel* telemovel* celular* fax whatsapp",
        FIELD: "escritório escritorio casa trabalho residencial comercial fixo direto",
        SPEECH: "ligue* ligar me_liga liga_me contato* contacto* atend* mensage* falar_comigo meu_número "
                "meu_numero o_meu_número",
        REF: "fatura* factura* pedido* conta* referência* referencia* protocolo* cliente* apólice* contrato* "
             "reserva* encomenda*",
    },
    "fr": {
        LABEL: "téléphone* telephone* tél tel portable* mobile* fax gsm",
        FIELD: "bureau domicile maison travail fixe direct standard accueil perso pro",
        SPEECH: "appel* rappel* joindre joignable répond* repond* messag* sms texto* mon_numéro mon_numero "
                "contact*",
        REF: "facture* commande* compte* référence* reference* réf dossier* client* contrat* réservation* billet*",
    },
    "de": {
        LABEL: "telefon* tel handy* mobil* fax* rufnummer* fon festnetz* durchwahl*",
        FIELD: "büro buero zentrale privat geschäftlich geschaeftlich dienstlich direkt zuhause arbeit",
        SPEECH: "anruf* rufen rückruf* zurückruf* erreichen erreichbar erreichst nachricht* meine_hinterlegte "
                "meine_registrierte meine_nummer meine_handynummer ruf_mich kontakt*",
        REF: "rechnung* bestell* konto* kunden* auftrag* vertrag* aktenzeichen* referenz* vorgang* buchung* "
             "sendung* artikel*",
    },
    "it": {
        LABEL: "telefono* cellulare* cell fax whatsapp",
        FIELD: "ufficio casa lavoro privato diretto fisso centralino sede",
        SPEECH: "chiam* richiam* contatt* rispond* messagg* scrivimi raggiungibil* mio_numero",
        REF: "fattura* ordine* conto* riferimento* rif pratica* cliente* contratto* polizza* prenotazione*",
    },
    "nl": {
        LABEL: "telefoon* mobiel* gsm fax whatsapp",
        FIELD: "kantoor thuis werk privé prive direct vast centrale",
        SPEECH: "bel bellen terugbel* opgenomen opnemen bericht* appen bereikbaar bereiken mijn_geregistreerde "
                "mijn_nummer bel_me",
        REF: "factuur* bestelling* rekening* referentie* klant* contract* polis* dossier* boeking*",
    },
    "pl": {
        LABEL: "telefon* tel komórk* komork* kom fax faks",
        FIELD: "biuro dom praca prywatny służbowy sluzbowy",
        SPEECH: "zadzwo* dzwoń dzwon* oddzwo* kontakt* odbiera* wiadomoś* wiadomosc* mój_zarejestrowany "
                "mój_numer moj_numer pod_numerem",
        REF: "faktur* zamówieni* zamowieni* rachun* referencj* klient* umow* umów* polis* rezerwacj*",
    },
    "cs": {
        LABEL: "telefon* tel mobil* fax",
        FIELD: "kancelář kancelar domácí domaci práce prace soukromý",
        SPEECH: "volejte zavolej* volat nebere* zpráv* zprav* zastihnete kontakt* moje_registrované "
                "moje_číslo mé_číslo na_čísle",
        REF: "faktur* objednáv* objednav* účet ucet referenc* zákazn* zakazn* smlouv* rezervac*",
    },
    "sv": {
        LABEL: "telefon* tel mobil* mob fax tfn tlf",
        FIELD: "kontor hem arbete växel vaxel direkt privat",
        SPEECH: "ringa ring_mig svarar meddeland* mitt_registrerade nå_mig når_mig nås mitt_nummer kontakt*",
        REF: "faktura* order* konto* referens* kund* avtal* bokning*",
    },
    "tr": {
        LABEL: "telefon* tel cep gsm faks fax",
        FIELD: "ofis ev iş merkez sabit",
        SPEECH: "arayın arayin arayabilir* ararsan* beni_ara cevap* açmıyor acmiyor mesaj* numaram* "
                "ulaşabilir* ulasabilir* iletişim* iletisim*",
        REF: "fatura* sipariş* siparis* hesap* hesab* referans* müşteri* musteri* sözleşme* sozlesme* rezervasyon* poliçe*",
    },
    "id": {
        LABEL: "telepon* telp hp handphone ponsel fax faks",
        FIELD: "kantor rumah kerja",
        SPEECH: "hubungi* menghubungi* pesan kirim_pesan mengangkat diangkat menjawab nomor_saya kontak*",
        REF: "faktur* tagihan* pesanan* rekening* referensi* pelanggan* kontrak* polis*",
    },
    "vi": {
        LABEL: "điện_thoại đt sđt di_động fax zalo",
        FIELD: "văn_phòng nhà_riêng cơ_quan",
        SPEECH: "gọi nghe_máy nhắn liên_hệ số_đã_đăng_ký số_của_tôi theo_số",
        REF: "khoản đơn hàng",
    },
    "ru": {
        LABEL: "телефон* тел моб* мобильн* сотов* факс* тлф",
        FIELD: "офис дом домашн* рабоч* служебн*",
        SPEECH: "звон* позвон* перезвон* дозвон* отвечает отвечают сообщени* смс пишите напишите "
                "мой_зарегистрированный связаться мой_номер по_номеру",
        REF: "счет* счёт* заказ* договор* квитанц* лицев*",
    },
    "uk": {
        LABEL: "телефонуйте",
        FIELD: "офіс домашній робочий",
        SPEECH: "дзвон* подзвон* передзвон* відповіда* повідомлен* мій_зареєстрований язатися мій_номер "
                "за_номером",
        REF: "рахун* замовлен* договір*",
    },
    "el": {
        LABEL: "τηλ* κινητ* φαξ",
        FIELD: "γραφείο σπίτι εργασία",
        SPEECH: "καλέστε καλέσ* απαντ* μηνύμ* μηνυμ* καταχωρημένος_αριθμός επικοινων* αριθμός_μου με_βρείτε",
        REF: "τιμολόγι* τιμολογι* παραγγελ* λογαριασμ*",
    },
}

# Substring cues: scripts without spaces between words, or whose words take glued prefixes.
_SUBSTRINGS: dict[str, dict[str, str]] = {
    "ar": {LABEL: "هاتف جوال فاكس موبايل تلفون واتساب",
           FIELD: "مكتب منزل",
           SPEECH: "اتصل يرد الرسائل رسائل رسالة رقمي المسجل التواصل تواصل",
           REF: "فاتورة طلب حساب مرجع"},
    "fa": {LABEL: "تلفن همراه فاکس موبایل",
           FIELD: "دفتر خانه",
           SPEECH: "تماس پیام جواب شماره ثبت",
           REF: "فاکتور سفارش حساب"},
    "he": {LABEL: "טלפון נייד פקס טל.",
           FIELD: "משרד בית",
           SPEECH: "עונים עונה הודעות הודעה הרשום המספר שלי תחזרו להשיג התקשר חייג",
           REF: "חשבונית הזמנה חשבון"},
    "hi": {LABEL: "फ़ोन फोन मोबाइल फैक्स दूरभाष व्हाट्सएप",
           FIELD: "कार्यालय ऑफिस घर",
           SPEECH: "कॉल संपर्क जवाब मैसेज संदेश नंबर रजिस्टर्ड पंजीकृत",
           REF: "चालान ऑर्डर खाता"},
    "th": {LABEL: "โทร มือถือ แฟกซ์",
           FIELD: "สำนักงาน บ้าน",
           SPEECH: "เบอร์ ติดต่อ ข้อความ รับสาย",
           REF: "ใบแจ้งหนี้ คำสั่งซื้อ บัญชี"},
    "zh": {LABEL: "电话 電話 手机 手機 传真 傳真 微信",
           FIELD: "办公室 辦公室 住宅 住家",
           SPEECH: "联系 聯絡 聯繫 联络 短信 簡訊 号码 號碼 回电 回電 回拨 回撥 没人接 沒人接 致电 拨打 撥打 打给 打給",
           REF: "订单 訂單 发票 發票 账号 帳號 账户 帳戶"},
    "ja": {LABEL: "携帯 ファックス ファクス",
           FIELD: "会社 自宅 事務所",
           SPEECH: "連絡 メッセージ 番号 折り返し 出ません 登録 ショートメール",
           REF: "注文 請求書 口座 伝票"},
    "ko": {LABEL: "전화 휴대폰 핸드폰 팩스",
           FIELD: "사무실 자택",
           SPEECH: "문자 연락 번호 등록된 안 받",
           REF: "주문 계좌 송장 청구서"},
    "symbols": {LABEL: "☎ 📞 📱 ✆"},
}

# Single capital letters name a phone field in signatures ("T: +44 20 ...", "M. 0612 345678").
_LETTERS = "TMFPOHWC"
_LETTER_TOKEN = re.compile(rf"(?<![^\W\d_])[{_LETTERS}](?![^\W\d_])")


def _build() -> tuple[dict[str, str], dict[str, list[tuple[str, str]]], dict[str, list[tuple[tuple[str, ...], str]]]]:
    """Whole words, stems by their first three letters (longest first: "pesanan" is a reference
    where "pesan" is a message), and phrases by their first word."""
    words: dict[str, str] = {}
    stems: dict[str, list[tuple[str, str]]] = {}
    phrases: dict[str, list[tuple[tuple[str, ...], str]]] = {}
    for table in _WORDS.values():
        for kind, entries in table.items():
            for entry in entries.split():
                parts = tuple(entry.lower().split("_"))
                if len(parts) > 1:
                    phrases.setdefault(parts[0], []).append((parts[1:], kind))
                elif entry.endswith("*"):
                    stem = entry[:-1].lower()
                    assert len(stem) >= 3, entry  # looked up by its first three letters
                    stems.setdefault(stem[:3], []).append((stem, kind))
                else:
                    words[entry.lower()] = kind
    for bucket in stems.values():
        bucket.sort(key=lambda sk: -len(sk[0]))
    for bucket in phrases.values():
        bucket.sort(key=lambda pk: -len(pk[0]))
    return words, stems, phrases


def _word_matches(word: str, entry: str) -> bool:
    return word.startswith(entry[:-1]) if entry.endswith("*") else word == entry


_WORD_KIND, _STEMS, _PHRASES = _build()
_SUBSTRING_KIND = {w: kind for table in _SUBSTRINGS.values() for kind, entries in table.items() for w in entries.split()}
# "المسجل" must win over "رقم": longest first, so a longer cue is not read as its prefix.
_SUBSTRING = re.compile("|".join(re.escape(w) for w in sorted(_SUBSTRING_KIND, key=len, reverse=True)))
_WORD = re.compile(r"[^\W\d_]+")
_NON_LATIN = "\u0590"  # Hebrew and every script after it in Unicode order: substring cues


_TLD_LIKE = re.compile(r"[A-Za-z]{2,24}")
_COMMON_TLDS = frozenset("com net org edu gov info biz mil int".split())


def _word_script(ch: str) -> bool:
    """Latin (Vietnamese's letters included), Cyrillic, Greek: scripts whose cues are words."""
    return ch < _NON_LATIN or "\u1e00" <= ch < "\u2000"


def _kind_of_word(w: str) -> str | None:
    kind = _WORD_KIND.get(w)
    if kind is not None:
        return kind
    for stem, k in _STEMS.get(w[:3], ()):
        if w.startswith(stem):
            return k
    return None


def _in_address(text: str, s: int, e: int) -> bool:
    """Is text[s:e] a piece of a host name, URL or e-mail address rather than a word?"""
    before = text[s - 1] if s else " "
    if before in ".@/\\_=" or (before == ":" and s >= 2 and text[s - 2] == "/"):
        return True  # adsl.ch.example.net, user@fax.example.com, https://example.com/contact
    j = e
    n = len(text)
    while j < n and (text[j].isalnum() or text[j] in ".-_+%"):
        j += 1
    if j < n and text[j] == "@":
        return True  # fax@example.com, phone.support@example.com
    if e < n and text[e] == "." and e + 1 < n and text[e + 1].isalnum():
        labels = text[s:j].rstrip(".").split(".")
        last = labels[-1]
        if len(labels) >= 3 or (_TLD_LIKE.fullmatch(last) and (last.lower() in _COMMON_TLDS or len(last) == 2 and last.islower())):
            return True  # sec.example.com, fax.de; but "Tel.Nr.:" stays a word
    return False


def _may_be_cue(word: str) -> bool:
    return word in _WORD_KIND or word in _PHRASES or word[:3] in _STEMS


def iter_cues(text: str, lo: int, hi: int) -> list[tuple[int, int, str]]:
    """Cue words in text[lo:hi] as (start, end, kind), in order, words inside addresses left out."""
    window = text[lo:hi]
    found: list[tuple[int, int, str]] = []
    # Most windows hold no cue: decide that from the bare words before locating anything.
    if any(map(_may_be_cue, _WORD.findall(window.lower()))) or _LETTER_TOKEN.search(window):
        words = [(m.start(), m.end(), m.group().lower()) for m in _WORD.finditer(window)]
        for i, (s, e, w) in enumerate(words):
            kind = None
            end = e
            for rest, k in _PHRASES.get(w, ()):
                follow = words[i + 1:i + 1 + len(rest)]
                if len(follow) == len(rest) and all(_word_matches(f[2], r) for f, r in zip(follow, rest, strict=True)):
                    kind, end = k, follow[-1][1]
                    break
            if kind is None:
                kind = _kind_of_word(w)
                if kind is None and len(w) == 1 and window[s] in _LETTERS:
                    kind = FIELD
            if kind is not None and not _in_address(text, lo + s, lo + end):
                found.append((lo + s, lo + end, kind))
    if window and max(window) >= _NON_LATIN:
        for m in _SUBSTRING.finditer(window):
            found.append((lo + m.start(), lo + m.end(), _SUBSTRING_KIND[m.group()]))
        found.sort()
    return found


# ---- before the number ------------------------------------------------------------------------

_CUE_NEAR, _CUE_LINE = 32, 72  # a cue right before the number, or earlier on its line with numbers between
_SENTENCE_END = re.compile(r"[;!?]|[.]\s+[A-Z]")
_BETWEEN_NUMBERS_BREAK = re.compile(r"[.;!?=]")
_INTERNATIONAL = re.compile(r"\+\d[\d ().\-/]{5,24}\d(?=\D)")
# What may stand between a field name and its number: "Home: ", "M. ", "Office (Berlin) - ".
_FIELD_GAP = re.compile(r"\.?\)?\s*(?:\([^()\d\n]{0,24}\)\s*)?[:.\-–=,]?\s*")
_FIELD_START = re.compile(r"(?:^|[|•·;,/\t(\[]|\s{2})[ \t]*$", re.M)
# Words that stand between a reference word and its number without changing what it names:
# "order no. 4521", "my registered account 4521", "rekening saya yang terdaftar 4521".
_NUMBER_WORDS = frozenset(
    "no nr n nº n° num number nummer numéro numero número numer číslo cislo номер numarası numarasi nomor "
    "số מס رقم شماره 번호".split()
)
_TRANSPARENT_WORDS = frozenset(
    "my our your mi mis mio mia meu minha mon ma mein meine mijn mój moje můj min mitt benim saya yang ku "
    "registered registrada registrado registada registado cadastrada cadastrado enregistré enregistrée "
    "registrato registrata registriertes registrierte hinterlegte geregistreerde zarejestrowane zarejestrowany "
    "registrovaný registrované registrerade kayıtlı kayitli terdaftar đã đăng ký của tôi мой мій "
    "зарегистрированный зарегистрированная зареєстрований καταχωρημένος μου".split()
)


def _field_position(text: str, s: int) -> bool:
    """The word at ``s`` names a field: it opens the line or follows a separator ("| M: ...")."""
    return _FIELD_START.search(text, max(0, s - 8), s) is not None


def _one_list(between: str) -> bool:
    """Two numbers of one list: at most one word between them and no sentence break."""
    return len(_WORD.findall(between)) <= 1 and not _BETWEEN_NUMBERS_BREAK.search(between)


def cue_before(text: str, start: int) -> bool:
    """A cue right before ``start`` ("Tel.: ", "Telefon (Zentrale): ", "call me back on "), or
    before an earlier number on the same line with at most one word between the two ("Tel: 030
    1234567 or 030 7654321", "555-1234 (home), 555-5678"); or an international number just
    before it on the line ("+91 80 2345 6789, 2345 6790": the second of a pair)."""
    lo = max(0, start - _CUE_LINE)
    nl = text.rfind("\n", lo, start)
    lo = nl + 1 if nl >= 0 else lo
    cues = [c for c in iter_cues(text, lo, start) if c[2] != REF]
    for s, e, kind in reversed(cues):
        gap = text[e:start]
        last_digit = max((i for i, ch in enumerate(gap) if ch.isdigit()), default=-1)
        if last_digit >= 0:
            return _one_list(gap[last_digit + 1:])
        if kind == FIELD:
            if _field_position(text, s) and _FIELD_GAP.fullmatch(gap):
                return True
        elif len(gap) <= _CUE_NEAR and not _SENTENCE_END.search(gap):
            return True
    plus = text.rfind("+", lo, start)
    if plus >= 0:
        m = _INTERNATIONAL.match(text, plus, start)
        return m is not None and _one_list(text[m.end():start])
    return False


def reference_before(text: str, start: int) -> bool:
    """A reference word names the number ("Invoice 4521 8890", "order no. 4521 8890", "my
    registered account 4521 8890"): only punctuation, a "number" word and possessives may stand
    between. In scripts matched as substrings: a reference word with no phone label after it
    ("حسابي المسجل", "我登记的账户")."""
    lo = max(0, start - 48)
    nl = text.rfind("\n", lo, start)
    lo = nl + 1 if nl >= 0 else lo
    k = start
    while k > lo and text[k - 1] in " \t:#.-/()[]№'׳":
        k -= 1
    if k == lo:
        return False
    if _word_script(text[k - 1]):
        pos = start
        for m in reversed(list(_WORD.finditer(text, lo, start))[-6:]):
            if any(c.isdigit() or c not in " \t:#.-/()[]№'׳" for c in text[m.end():pos]):
                return False
            w = m.group().lower()
            if w in _NUMBER_WORDS or w in _TRANSPARENT_WORDS:
                pos = m.start()
                continue
            return _kind_of_word(w) == REF and not _in_address(text, m.start(), m.end())
        return False
    after_ref = False
    for m in _SUBSTRING.finditer(text, max(lo, start - 24), start):
        kind = _SUBSTRING_KIND[m.group()]
        if kind == REF:
            after_ref = True
        elif kind in (LABEL, FIELD):
            after_ref = False
    return after_ref


# ---- after the number -------------------------------------------------------------------------

_AFTER_LEAD = re.compile(r"[ \t]*(?:([(\[])|[-–—][ \t]*)?[ \t]*")
# The label ends its field: end of line or text, punctuation, or the next number.
_FIELD_END = re.compile(r"\.?\s*(?:$|[\n,;|/)\].:·•]|-|\s*\+?\(?\d|\s(?:or|and|und|oder|ou|et|o|y|e|of|och|veya|atau|или)\b)")
EXTENSION_AFTER = re.compile(
    r"[ \t]*[,;]?[ \t]*(?:ext|extn|extension|durchwahl|dw|intern|poste|int|interno|ramal|anexo|toestel|wew|ankn"
    r"|linka|dahili|доб|дод|εσωτ|máy lẻ|שלוחה|داخلي|داخلی|एक्सटेंशन|ต่อ|内線|分机|分機|내선)"
    r"\.?[ \t]*[:#]?[ \t]*-?[ \t]*\d{1,6}(?!\d)",
    re.I,
)
# Verb-final languages put the speech after the number: "{n} numarasına mesaj", "unter {n} bin
# ich erreichbar"; in other Latin-script languages a word after a number is rarely about it.
_AFTER_WORDS = frozenset(
    "numarası numarasi numarasına numarasina numarasından numarasindan numaralı numarali erreichbar bereikbaar".split()
)
_AFTER_SCRIPT = 20  # "{n}に電話", "{n} पर वापस कॉल करें", "{n}로 문자": the cue within this many characters


def _label_form(word: str) -> bool:
    """The label itself, maybe inflected ("phones", "telefono"), not a compound that starts with
    it ("Mobilfunkanschlüsse" after a count is no label)."""
    return word in _WORD_KIND or any(word.startswith(st) and len(word) - len(st) <= 3 for st, _ in _STEMS.get(word[:3], ()))


def label_after(text: str, end: int) -> bool:
    """A label right after the number: "-Office", " office", " (mobile)", " ext. 12", "-Fax";
    in verb-final languages the speech after it ("{n}に電話してください")."""
    n = len(text)
    if end >= n:
        return False
    if EXTENSION_AFTER.match(text, end):
        return True
    lead = _AFTER_LEAD.match(text, end)
    a = lead.end()
    hi = min(n, end + 48)
    nl = text.find("\n", end, hi)
    hi = nl if nl >= 0 else hi
    if a >= hi:
        return False
    for i, m in enumerate(_WORD.finditer(text, a, hi)):
        if i == 3:
            break
        w = m.group().lower()
        if w in _AFTER_WORDS:
            return True
    cues = iter_cues(text, a, hi)
    if cues and cues[0][0] == a and cues[0][2] in (LABEL, FIELD):
        s, e, _ = cues[0]
        word = text[s:e].lower()
        if lead.group(1):  # "(mobile)", "(home, evenings)", "[Fax]", "(Văn phòng)"
            return text.find(")" if lead.group(1) == "(" else "]", e, hi) >= 0
        if _word_script(word[0]) and (" " in word or _label_form(word)):
            return _FIELD_END.match(text, e) is not None
    for s, _, kind in cues:
        if s - end > _AFTER_SCRIPT or any(c.isdigit() for c in text[end:s]):
            return False
        if not _word_script(text[s]):
            return kind != REF
    return False


# ---- on the line above ------------------------------------------------------------------------

_LINE_LEAD = frozenset(" \t•·-*>|")
_NUMBER_LINE = re.compile(r"[\s•·*>|]*\+?[\d().\-/ \t]{6,40}(?:\s?(?:x|ext\.?)\s?\d{1,6})?\s*")
_LABEL_LINE_MAX = 48
_LABEL_LINE_TAIL = re.compile(r"\.?\)?\s*(?:\([^()\d\n]{0,24}\)\s*)?(?:[:.\-–=/]\s*)?(?:[^\W\d_]+\s*){0,2}[:.]?\s*")


def _is_label_line(text: str, lo: int, hi: int) -> bool:
    line = text[lo:hi]
    if len(line.strip()) > _LABEL_LINE_MAX or any(c.isdigit() for c in line):
        return False
    cues = iter_cues(text, lo, hi)
    if not cues or any(c[2] == REF for c in cues):
        return False  # "Invoice:", "請求書番号:" head a reference, not a phone
    s, e, kind = cues[-1]
    tail = text[e:hi]
    if kind == FIELD:  # "Home:", "M." name the field alone
        return _field_position(text, s) and _FIELD_GAP.fullmatch(tail) is not None
    return _LABEL_LINE_TAIL.fullmatch(tail) is not None  # "Phone number:", "Call us:"


def label_above(text: str, start: int) -> bool:
    """The number opens its line and the line above is a label ("Phone:", "Tel.", "Mobile"),
    possibly with other numbers of the same label between ("Phone:\\n030 1\\n030 2")."""
    line_start = text.rfind("\n", 0, start) + 1
    if line_start == 0 or any(c not in _LINE_LEAD for c in text[line_start:start]):
        return False
    hi = line_start - 1
    blank_skipped = False
    for _ in range(4):
        lo = text.rfind("\n", 0, hi) + 1
        line = text[lo:hi].rstrip("\r")
        if not line.strip():
            if blank_skipped or lo == 0:
                return False
            blank_skipped = True
        elif _NUMBER_LINE.fullmatch(line) is None:
            return _is_label_line(text, lo, lo + len(line))
        if lo == 0:
            return False
        hi = lo - 1
    return False


def has_context(text: str, start: int, end: int) -> bool:
    """Does the text around text[start:end] say it is a phone number? (A reference word before
    it, :func:`reference_before`, says the opposite; the caller asks that first.)"""
    return cue_before(text, start) or label_after(text, end) or label_above(text, start)
