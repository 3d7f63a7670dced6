"""A PII evaluation set the detector was not written against.

Built in code, seeded, from sources other than the generator the detector was tuned on
(:mod:`data_pipelines.evaluation.pii_synth`, which uses Faker's phone provider):

* **phones**: ``phonenumbers.example_number_for_type`` for every region and every number type,
  each written in E164, international, national and RFC 3966 form and as a local number (the
  national significant number, spaced or dashed in groups); the label holds whatever
  ``phonenumbers`` says about validity, so the detector's own last check is not the oracle.
  Every phone document belongs to one **class**, the way people place a number in text:

  - ``before``: a cue word in the document's language before it ("Tel.: 06 12 34 56 78");
    international forms also without one;
  - ``after``: a label after it ("<n>-Office", "<n> (mobile)", "<n> ext. 12", "A-Office, B-Fax");
  - ``above``: the label alone on the line above ("Phone:" / the number on the next line);
  - ``speech``: no label, a sentence says it ("they're not answering at <n>", "my registered
    number is <n>"), five sentences per locale;
  - ``broken``: cut by layout between the area code and the rest (a line break, HTML
    indentation, a tab, ``&nbsp;``, two spaces), split where ``phonenumbers`` puts the end of the
    national destination code;
  - ``national``: no label at all, in a national layout (``phonenumbers``' own, ``dddd dddd``,
    pairs ``dd-dd-dd-dd``, ``(area) rest``, UK-style mobiles ``0dddd ddd ddd``, ``+CC (0) ...``),
    in a card or signature that names its country (another number with ``+CC``, or an address
    under the country's domain).

  Each class plants look-alikes that must survive: reference numbers with the locale's
  invoice/order/"my registered account" words next to the same labels, dates and year ranges
  in the same sentences, ZIP+4 codes, prices.
* **shapes**: contact cards, signature blocks, chat lines and form fields in 29 locales (every
  language of the detector's cue list).
* **other types** the IP/IBAN/e-mail rules are about: IPv6 outside 2000::/3, IPv4 in reserved
  space and glued to HTML markup with a port, in mail ``Received:`` headers after host names that
  start with a section-like word (``sec.example.com``, ``adsl.ch.example.net``), IBANs in lower
  case and without groups, e-mail addresses inside URLs and with ``'`` or ``&`` in the local part.
* **hard negatives** for every rule, planted next to cue words: dates, times, year ranges,
  decimals, coordinates, prices, scores, ZIP+4, ISBNs, counts, section/chapter/figure/version
  numbers, netmasks, loopback/link-local/documentation/multicast addresses, IBANs failing mod-97,
  file names with ``@``.

Records have the :mod:`data_pipelines.evaluation.pii_eval` format (``text``, ``spans``,
``negatives``, plus ``locale``, ``shape`` and ``class``). National numbers shorter than 6 digits
(a few small territories) are left out: no reader can tell "Tel 4321" from a room number.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

from data_pipelines.scrub.filters.pii import IBAN_LENGTHS
from data_pipelines.scrub.filters.pii.phone import GENERIC_USE_DOMAINS

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
    office: str = ""  # field names written after a number: "<n> (office)", "<n>-Home"
    home: str = ""
    ext: str = ""  # extension marker: "<n> ext. 12"
    speech: tuple[str, ...] = ()  # sentences that say "phone" without a label; {n} is the number
    refs: tuple[str, ...] = ()  # invoice, order, "my registered account": reference look-alikes


LOCALES: tuple[Locale, ...] = (
    Locale("en_US", "US", "Phone", "Mobile", "Fax", "call me on", "Email", "thanks!", "Office", "Home", "ext.",
           ("they're not answering at {n}", "please stop sending messages to {n}", "my registered number is {n}",
            "can you call me back on {n}?", "you can reach me at {n} after 5"),
           ("Invoice", "Order", "my registered account")),
    Locale("en_GB", "GB", "Tel", "Mob", "Fax", "ring me on", "E-mail", "cheers", "Office", "Home", "ext",
           ("nobody's answering at {n}", "stop sending messages to {n} please", "my registered mobile is {n}",
            "could you ring me back on {n}", "best to reach me on {n}"),
           ("Invoice", "Order no.", "my registered account")),
    Locale("es_ES", "ES", "Teléfono", "Móvil", "Fax", "llámame al", "Correo", "gracias", "Oficina", "Casa", "ext.",
           ("no contestan en el {n}", "dejen de enviar mensajes al {n}", "mi número registrado es el {n}",
            "devuélveme la llamada al {n}", "puedes localizarme en el {n}"),
           ("Factura", "Pedido", "mi cuenta registrada")),
    Locale("es_MX", "MX", "Tel.", "Celular", "Fax", "márcame al", "Correo", "saludos", "Oficina", "Casa", "ext.",
           ("nadie contesta en el {n}", "ya no me manden mensajes al {n}", "mi celular registrado es {n}",
            "llámame de regreso al {n}", "me puedes marcar al {n}"),
           ("Factura", "Pedido", "mi cuenta registrada")),
    Locale("pt_BR", "BR", "Telefone", "Celular", "Fax", "me liga no", "E-mail", "valeu", "Escritório", "Casa", "ramal",
           ("ninguém atende no {n}", "parem de mandar mensagens para o {n}", "meu número cadastrado é {n}",
            "me liga de volta no {n}", "pode falar comigo no {n}"),
           ("Fatura", "Pedido", "minha conta cadastrada")),
    Locale("pt_PT", "PT", "Telefone", "Telemóvel", "Fax", "liga-me para o", "E-mail", "obrigado", "Escritório", "Casa",
           "ext.",
           ("ninguém atende o {n}", "deixem de enviar mensagens para o {n}", "o meu número registado é o {n}",
            "ligue-me de volta para o {n}", "pode contactar-me pelo {n}"),
           ("Fatura", "Encomenda", "a minha conta registada")),
    Locale("fr_FR", "FR", "Tél.", "Portable", "Fax", "appelle-moi au", "Courriel", "merci", "Bureau", "Domicile", "poste",
           ("ils ne répondent pas au {n}", "arrêtez d'envoyer des messages au {n}", "mon numéro enregistré est le {n}",
            "rappelez-moi au {n}", "vous pouvez me joindre au {n}"),
           ("Facture", "Commande", "mon compte enregistré")),
    Locale("de_DE", "DE", "Telefon", "Handy", "Fax", "ruf mich an unter", "E-Mail", "danke", "Büro", "privat",
           "Durchwahl",
           ("Sie erreichen mich unter {n}", "bitte keine Nachrichten mehr an {n}", "meine hinterlegte Nummer ist {n}",
            "rufen Sie mich bitte unter {n} zurück", "unter {n} bin ich erreichbar"),
           ("Rechnung", "Bestellung", "mein registriertes Konto")),
    Locale("de_CH", "CH", "Tel.", "Mobil", "Fax", "ruf mich an:", "E-Mail", "merci", "Büro", "Privat", "intern",
           ("ich bin unter {n} erreichbar", "schicken Sie keine SMS mehr an {n}", "meine registrierte Nummer: {n}",
            "bitte rufen Sie mich unter {n} zurück", "erreichbar bin ich unter {n}"),
           ("Rechnung", "Auftrag", "mein registriertes Konto")),
    Locale("it_IT", "IT", "Telefono", "Cellulare", "Fax", "chiamami al", "Email", "grazie", "Ufficio", "Casa", "int.",
           ("non rispondono al {n}", "smettete di mandare messaggi al {n}", "il mio numero registrato è {n}",
            "richiamami al {n}", "sono raggiungibile al {n}"),
           ("Fattura", "Ordine", "il mio conto registrato")),
    Locale("nl_NL", "NL", "Telefoon", "Mobiel", "Fax", "bel me op", "E-mail", "bedankt", "Kantoor", "Thuis", "toestel",
           ("er wordt niet opgenomen op {n}", "stop met berichten sturen naar {n}", "mijn geregistreerde nummer is {n}",
            "bel me terug op {n}", "je kunt me bereiken op {n}"),
           ("Factuur", "Bestelling", "mijn geregistreerde rekening")),
    Locale("pl_PL", "PL", "Telefon", "Tel. kom.", "Faks", "zadzwoń pod", "E-mail", "dzięki", "Biuro", "Dom", "wew.",
           ("nikt nie odbiera pod numerem {n}", "przestańcie wysyłać wiadomości na {n}", "mój zarejestrowany numer to {n}",
            "oddzwoń na {n}", "można się ze mną kontaktować pod {n}"),
           ("Faktura", "Zamówienie", "moje zarejestrowane konto")),
    Locale("ru_RU", "RU", "Телефон", "Моб.", "Факс", "звоните на", "Почта", "спасибо", "Офис", "Дом.", "доб.",
           ("никто не отвечает по номеру {n}", "хватит присылать сообщения на {n}", "мой зарегистрированный номер {n}",
            "перезвоните мне на {n}", "со мной можно связаться по {n}"),
           ("Счёт", "Заказ", "мой зарегистрированный счёт")),
    Locale("uk_UA", "UA", "Телефон", "Моб.", "Факс", "телефонуйте", "Пошта", "дякую", "Офіс", "Домашній", "дод.",
           ("ніхто не відповідає за номером {n}", "припиніть надсилати повідомлення на {n}",
            "мій зареєстрований номер {n}", "передзвоніть мені на {n}", "зі мною можна зв'язатися за {n}"),
           ("Рахунок", "Замовлення", "мій зареєстрований рахунок")),
    Locale("tr_TR", "TR", "Telefon", "Cep", "Faks", "beni ara:", "E-posta", "teşekkürler", "Ofis", "Ev", "dahili",
           ("{n} numarası cevap vermiyor", "{n} numarasına mesaj göndermeyi bırakın", "kayıtlı numaram {n}",
            "beni {n} numarasından geri arayın", "bana {n} numarasından ulaşabilirsiniz"),
           ("Fatura", "Sipariş", "kayıtlı hesabım")),
    Locale("ja_JP", "JP", "電話", "携帯", "FAX", "電話してください", "メール", "よろしく", "会社", "自宅", "内線",
           ("{n}に電話しても出ません", "{n}にメッセージを送らないでください", "登録済みの番号は{n}です",
            "{n}に折り返しお電話ください", "{n}までご連絡ください"),
           ("請求書番号", "注文番号", "登録済みの口座")),
    Locale("zh_CN", "CN", "电话", "手机", "传真", "打我电话", "邮箱", "谢谢", "办公室", "住宅", "分机",
           ("打{n}一直没人接", "别再给{n}发短信了", "我登记的手机号是{n}", "请回电{n}", "可以拨打{n}联系我"),
           ("发票号", "订单号", "我登记的账户")),
    Locale("zh_TW", "TW", "電話", "手機", "傳真", "打電話給我", "信箱", "謝謝", "辦公室", "住家", "分機",
           ("打{n}都沒人接", "不要再傳簡訊到{n}", "我登記的手機號碼是{n}", "請回撥{n}", "可以打{n}聯絡我"),
           ("發票號碼", "訂單編號", "我登記的帳戶")),
    Locale("ko_KR", "KR", "전화", "휴대폰", "팩스", "전화 주세요", "이메일", "감사", "사무실", "자택", "내선",
           ("{n}로 전화해도 안 받아요", "{n}로 문자 그만 보내세요", "등록된 번호는 {n}입니다",
            "{n}로 다시 전화 주세요", "{n}로 연락 주세요"),
           ("청구서 번호", "주문 번호", "등록된 계좌")),
    Locale("ar_EG", "EG", "هاتف", "موبايل", "فاكس", "اتصل بي على", "بريد", "شكرا", "مكتب", "منزل", "داخلي",
           ("لا أحد يرد على {n}", "توقفوا عن إرسال الرسائل إلى {n}", "رقمي المسجل هو {n}", "اتصل بي على {n}",
            "يمكنك التواصل معي على {n}"),
           ("فاتورة رقم", "طلب رقم", "حسابي المسجل")),
    Locale("fa_IR", "IR", "تلفن", "همراه", "فاکس", "تلفن بزنید", "ایمیل", "مرسی", "دفتر", "منزل", "داخلی",
           ("کسی به {n} جواب نمی‌دهد", "دیگر به {n} پیام ندهید", "شماره ثبت‌شده من {n} است",
            "لطفا با {n} تماس بگیرید", "از طریق {n} با من در تماس باشید"),
           ("فاکتور شماره", "سفارش شماره", "حساب ثبت‌شده من")),
    Locale("hi_IN", "IN", "फ़ोन", "मोबाइल", "फैक्स", "मुझे फोन करें", "ईमेल", "धन्यवाद", "कार्यालय", "घर", "एक्सटेंशन",
           ("{n} पर कोई जवाब नहीं दे रहा", "{n} पर मैसेज भेजना बंद करें", "मेरा रजिस्टर्ड नंबर {n} है",
            "मुझे {n} पर वापस कॉल करें", "मुझसे {n} पर संपर्क करें"),
           ("चालान संख्या", "ऑर्डर नंबर", "मेरा रजिस्टर्ड खाता")),
    Locale("id_ID", "ID", "Telepon", "Ponsel", "Faks", "hubungi saya di", "Email", "makasih", "Kantor", "Rumah", "ext.",
           ("tidak ada yang mengangkat di {n}", "berhenti mengirim pesan ke {n}", "nomor saya yang terdaftar {n}",
            "telepon balik saya di {n}", "hubungi saya di {n}"),
           ("Faktur", "Pesanan", "rekening saya yang terdaftar")),
    Locale("vi_VN", "VN", "Điện thoại", "Di động", "Fax", "gọi cho tôi", "Email", "cảm ơn", "Văn phòng", "Nhà riêng",
           "máy lẻ",
           ("gọi {n} không ai nghe máy", "đừng nhắn tin đến {n} nữa", "số đã đăng ký của tôi là {n}",
            "gọi lại cho tôi theo số {n}", "liên hệ với tôi qua {n}"),
           ("Hóa đơn số", "Đơn hàng số", "tài khoản đã đăng ký của tôi")),
    Locale("sv_SE", "SE", "Telefon", "Mobil", "Fax", "ring mig på", "E-post", "tack", "Kontor", "Hem", "ankn.",
           ("ingen svarar på {n}", "sluta skicka meddelanden till {n}", "mitt registrerade nummer är {n}",
            "ring tillbaka på {n}", "du når mig på {n}"),
           ("Faktura", "Order", "mitt registrerade konto")),
    Locale("cs_CZ", "CZ", "Telefon", "Mobil", "Fax", "volejte", "E-mail", "díky", "Kancelář", "Domácí", "linka",
           ("na čísle {n} nikdo nebere", "přestaňte posílat zprávy na {n}", "moje registrované číslo je {n}",
            "zavolejte mi zpět na {n}", "zastihnete mě na {n}"),
           ("Faktura", "Objednávka", "můj registrovaný účet")),
    Locale("el_GR", "GR", "Τηλ.", "Κινητό", "Φαξ", "καλέστε με στο", "Email", "ευχαριστώ", "Γραφείο", "Σπίτι", "εσωτ.",
           ("δεν απαντούν στο {n}", "σταματήστε να στέλνετε μηνύματα στο {n}", "ο καταχωρημένος αριθμός μου είναι {n}",
            "καλέστε με πίσω στο {n}", "μπορείτε να με βρείτε στο {n}"),
           ("Τιμολόγιο", "Παραγγελία", "ο καταχωρημένος λογαριασμός μου")),
    Locale("he_IL", "IL", "טלפון", "נייד", "פקס", "התקשרו אליי למספר", "דוא\"ל", "תודה", "משרד", "בית", "שלוחה",
           ("לא עונים במספר {n}", "תפסיקו לשלוח הודעות למספר {n}", "המספר הרשום שלי הוא {n}",
            "תחזרו אליי למספר {n}", "אפשר להשיג אותי ב-{n}"),
           ("חשבונית מס'", "הזמנה מס'", "החשבון הרשום שלי")),
    Locale("th_TH", "TH", "โทร.", "มือถือ", "แฟกซ์", "โทรหาฉันที่", "อีเมล", "ขอบคุณ", "สำนักงาน", "บ้าน", "ต่อ",
           ("โทรไปที่ {n} ไม่มีคนรับสาย", "หยุดส่งข้อความมาที่ {n}", "เบอร์ที่ลงทะเบียนของฉันคือ {n}",
            "โทรกลับมาที่ {n}", "ติดต่อฉันได้ที่ {n}"),
           ("ใบแจ้งหนี้เลขที่", "คำสั่งซื้อเลขที่", "บัญชีที่ลงทะเบียนของฉัน")),
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
    "zip4": ("90210-1234", "10001-4356", "60614-2207"),
    "isbn": ("ISBN 978-3-16-148410-0", "ISBN 0-306-40615-2", "ISBN 978-0-596-52068-7"),
    "coordinates": ("40.7128, -74.0060", "48.8566 2.3522", "-33.8688, 151.2093"),
    "price": ("1 299,00 €", "$1,299.99", "2 499 Kč", "R$ 1.299,90"),
    "score": ("3-1", "102-98", "2:1 (1:0)"),
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
    ips = _ip_positives(rng)
    rng.shuffle(ips)  # IPv4 and IPv6 in every shape
    for ip in ips[:2]:
        shape = rng.randrange(6)
        if shape == 0 and ":" not in ip:
            pieces += [('<a href="http://', None), (ip, "ip"), (f':{rng.choice([80, 8080, 443])}/">', None)]
        elif shape == 1 and ":" not in ip:
            pieces += [("<td>", None), (ip, "ip"), (f":{rng.randrange(1024, 65535)}</td>", None)]
        elif shape in (2, 3):
            # Mail headers: host names whose first labels read like "Sec." or "ch." abbreviations.
            host = rng.choice(["sec.example.com", "host.adsl.ch.example.net", "fig.mail.example.org",
                               "part.example.de", "rev.example.net", "v.example.io"])
            pieces += [(f"\nReceived: from {host} ([" if shape == 2 else f"\nReceived: from mx ({host} [", None),
                       (ip, "ip"), ("]) by mx.example.org;\n", None)]
        else:
            pieces += [("login from ", None), (ip, "ip"), (" blocked; ", None)]
    pieces += [("\nIBAN: ", None), (_iban(rng), "iban"), ("\n", None)]
    # Hard negatives, each after a cue word of the type it could be confused with.
    for kind in rng.sample(sorted(_NEGATIVES), 4):
        value = rng.choice(_NEGATIVES[kind])
        cue = {"date": loc.phone, "time": f"{loc.phone} hours", "year_range": loc.mobile, "decimal": loc.fax,
               "count": f"{loc.phone} ext. room", "kept_ip": "host", "private_ip": "server", "bad_iban": "IBAN:",
               "not_email": loc.email, "netmask": "netmask", "version": "updated to",
               "section_number": "see", "zip4": loc.office, "isbn": "see", "coordinates": loc.phone,
               "price": loc.mobile, "score": loc.call_me}[kind]
        pieces += [(f"{cue} ", None), (value, f"neg:{kind}"), (". ", None)]
    return pieces


def _record(pieces: list[Piece], locale: str, shape: str, cls: str) -> dict:
    text, spans, negatives = "", [], []
    for chunk, label in pieces:
        if label and label.startswith("neg:"):
            negatives.append({"start": len(text), "end": len(text) + len(chunk), "kind": label[4:]})
        elif label:
            spans.append({"start": len(text), "end": len(text) + len(chunk), "type": label})
        text += chunk
    return {"text": text, "spans": spans, "negatives": negatives, "locale": locale, "shape": shape, "class": cls}


# ---- the phone classes beyond "a cue word before it" -------------------------------------------

PHONE_CLASSES = ("before", "after", "above", "speech", "broken", "national")
_CARD_TYPES = ("FIXED_LINE", "MOBILE", "FIXED_LINE_OR_MOBILE", "TOLL_FREE")
_LAYOUT_BREAKS = ("\n", "\n      ", "\r\n", "\t", "&nbsp;", "  ", " \n  ")


def _examples(region: str, types: tuple[str, ...]) -> list:
    """The region's example numbers (one per distinct national number) of ``types``."""
    import phonenumbers as pn  # heavy metadata, loaded only to build the set

    out, seen = [], set()
    for name, ntype in sorted(vars(pn.PhoneNumberType).items()):
        if not name.isupper() or name == "UNKNOWN" or name not in types:
            continue
        num = pn.example_number_for_type(region, ntype)
        if num is None:
            continue
        nsn = pn.national_significant_number(num)
        if nsn not in seen and len(nsn) >= 6:
            seen.add(nsn)
            out.append(num)
    return out


def _written(num, rng: random.Random) -> str:
    """One national or local way of writing ``num`` (the forms that need context)."""
    import phonenumbers as pn  # heavy metadata, loaded only to build the set

    nsn = pn.national_significant_number(num)
    return rng.choice([pn.format_number(num, pn.PhoneNumberFormat.NATIONAL), _local_form(nsn, rng, " "),
                       _local_form(nsn, rng, "-")])


def _digits8(rng: random.Random) -> str:
    """A reference number that looks like a local phone number ("4521 8890")."""
    return f"{rng.randrange(1000, 10000)} {rng.randrange(1000, 10000)}"


def _after_doc(loc: Locale, nums: list, rng: random.Random) -> list[Piece]:
    """Labels after the number: "<n>-Office", "<n> office", "<n> (mobile)", "<n> ext. 12", and the
    pair "A-Office, B-Fax"; a reference number with the same label must survive."""
    name, role = rng.choice(_NAMES), rng.choice(_ROLES)
    written = [_written(n, rng) for n in nums]
    pieces: list[Piece] = [(f"{name}\n{role}\n", None)]
    if len(written) >= 2 and rng.random() < 0.5:
        pieces += [(written[0], "phone"), (f"-{loc.office}, ", None), (written[1], "phone"), (f"-{loc.fax}\n", None)]
        written = written[2:]
    for w in written:
        tail = rng.choice([f"-{loc.office}", f" {loc.office.lower()}", f" ({loc.mobile})", f" ({loc.home})",
                           f" {loc.ext} {rng.randrange(10, 999)}", f"-{loc.fax}", f" - {loc.home}"])
        pieces += [(w, "phone"), (f"{tail}\n", None)]
    pieces += [(f"{loc.refs[0]} ", None), (_digits8(rng), "neg:reference"), (f" ({loc.office})\n", None)]
    return pieces


def _above_doc(loc: Locale, nums: list, rng: random.Random) -> list[Piece]:
    """The label alone on the line above the number (a form, a card, a web page turned to text);
    a reference label above a number and a date under a phone label must survive."""
    pieces: list[Piece] = [(f"{rng.choice(_NAMES)}\n", None)]
    label = rng.choice([loc.phone, loc.mobile, loc.fax])
    pieces += [(f"{label}{rng.choice([':', '', ':', '.'])}\n", None)]
    for i, n in enumerate(nums):
        pieces += [(rng.choice(["", "  ", "\t"]) if i == 0 else "", None), (_written(n, rng), "phone"), ("\n", None)]
    kind, value = rng.choice([("reference", _digits8(rng)), ("date", rng.choice(_NEGATIVES["date"])),
                              ("year_range", rng.choice(_NEGATIVES["year_range"]))])
    ref_label = loc.refs[0] if kind == "reference" else rng.choice([loc.phone, loc.mobile])
    pieces += [(f"\n{ref_label}:\n", None), (value, f"neg:{kind}"), ("\n", None)]
    return pieces


def _speech_doc(loc: Locale, nums: list, rng: random.Random) -> list[Piece]:
    """A chat line or support request that says "phone" only in words; the same sentences with a
    date and the "my registered account" reference must survive."""
    pieces: list[Piece] = [(f"[{rng.randrange(24):02d}:{rng.randrange(60):02d}] {rng.choice(_NAMES)}: ", None)]
    for n in nums:
        before, _, after = rng.choice(loc.speech).partition("{n}")
        pieces += [(before, None), (_written(n, rng), "phone"), (f"{after}. ", None)]
    before, _, after = rng.choice(loc.speech).partition("{n}")
    pieces += [(before, None), (rng.choice(_NEGATIVES["date"]), "neg:date"), (f"{after}. ", None)]
    pieces += [(f"{loc.refs[2]} ", None), (_digits8(rng), "neg:reference"), (f" {loc.chat_tail}\n", None)]
    return pieces


def _split_at_area_code(text: str, n_digits: int) -> tuple[str, str] | None:
    """``text`` cut at the separator after its first ``n_digits`` digits: ("(022)", "12345")."""
    seen = 0
    for i, ch in enumerate(text):
        if ch.isdigit():
            seen += 1
            if seen == n_digits:
                j = i + 1
                if j < len(text) and text[j] == ")":
                    j += 1
                if j >= len(text) or text[j] not in " -.":
                    return None
                return text[:j], text[j + 1:]
    return None


def _written_prefix(num, national: str) -> str:
    """The trunk prefix as the region's national format writes it ("0" in "0121 234 5678"; none
    in NANP's "(201) 555-0123", though "1" is its trunk prefix)."""
    import phonenumbers as pn  # heavy metadata, loaded only to build the set

    meta = pn.PhoneMetadata.metadata_for_region(pn.region_code_for_number(num))
    prefix = meta.national_prefix if meta and meta.national_prefix else ""
    nsn = pn.national_significant_number(num)
    return prefix if prefix and "".join(c for c in national if c.isdigit()) == prefix + nsn else ""


def _broken_forms(num) -> list[tuple[str, str, bool]]:
    """(area code, rest, needs a cue) where a layout break can fall: after "+CC NDC" in the
    international form; after the trunk prefix and NDC in the national form of regions with an
    area code (a trunk prefix, or NANP's parentheses)."""
    import phonenumbers as pn  # heavy metadata, loaded only to build the set

    ndc = pn.length_of_national_destination_code(num)
    out = []
    intl = pn.format_number(num, pn.PhoneNumberFormat.INTERNATIONAL)
    cut = _split_at_area_code(intl, len(str(num.country_code)) + ndc)
    if cut:
        out.append((*cut, False))
    national = pn.format_number(num, pn.PhoneNumberFormat.NATIONAL)
    written_prefix = _written_prefix(num, national)
    if ndc and (written_prefix or national.startswith("(")):
        cut = _split_at_area_code(national, len(written_prefix) + ndc)
        if cut:
            out.append((*cut, True))
    return out


def _broken_doc(loc: Locale, num, rng: random.Random) -> list[Piece] | None:
    """A signature or web page turned to text with the number cut between area code and rest."""
    forms = _broken_forms(num)
    if not forms:
        return None
    head, rest, _ = rng.choice(forms)
    label = rng.choice([loc.phone, loc.mobile, loc.fax])
    brk = rng.choice(_LAYOUT_BREAKS)
    pieces: list[Piece] = [(f"{rng.choice(_NAMES)} | {rng.choice(_ROLES)}\n{label}: ", None),
                           (f"{head}{brk}{rest}", "phone"), ("\n", None)]
    # A year in parentheses, then a count on the next line: no area code, no phone.
    pieces += [(f"{loc.mobile} (2019)\n", None), (f"{rng.randrange(10, 99)} {rng.randrange(100, 999)} {rng.randrange(100, 999)}", "neg:count"),
               ("\n", None)]
    return pieces


def _national_forms(num) -> list[str]:
    """National layouts of ``num`` a validator must accept without a label once the region is known."""
    import phonenumbers as pn  # heavy metadata, loaded only to build the set

    nsn = pn.national_significant_number(num)
    national = pn.format_number(num, pn.PhoneNumberFormat.NATIONAL)
    prefix = _written_prefix(num, national)
    ndc = pn.length_of_national_destination_code(num)
    forms = [national]
    if len(nsn) == 8:
        forms += [f"{nsn[:4]} {nsn[4:]}", "-".join(nsn[i:i + 2] for i in range(0, 8, 2))]
    if len(nsn) == 9 and prefix == "0":
        forms.append("-".join(("0" + nsn)[i:i + 2] for i in range(0, 10, 2)))
    if 2 <= ndc <= 4 and len(nsn) - ndc >= 6:
        rest = nsn[ndc:]
        forms.append(f"({prefix}{nsn[:ndc]}) {rest[:-4]}-{rest[-4:]}")
    if prefix == "0" and len(nsn) == 10 and pn.number_type(num) == pn.PhoneNumberType.MOBILE:
        forms.append(f"0{nsn[:4]} {nsn[4:7]} {nsn[7:]}")
    if prefix == "0" and ndc:
        forms.append(f"+{num.country_code} (0){nsn[:ndc]} {nsn[ndc:]}")
    return forms


def _national_doc(loc: Locale, num, other, rng: random.Random) -> list[Piece]:
    """A card, signature or chat line with the number and no label, in a document that names the
    country: another of its numbers with "+CC", or an address under its country domain. A
    reference number and a ZIP+4 code in the same document must survive."""
    import phonenumbers as pn  # heavy metadata, loaded only to build the set

    region = pn.region_code_for_number(num)
    tld = "uk" if region == "GB" else region.lower()
    evidence = [pn.format_number(other if other is not None else num, pn.PhoneNumberFormat.INTERNATIONAL)]
    if tld not in GENERIC_USE_DOMAINS:  # .io, .co, ... name no country: a "+CC" number does
        evidence += [f"{rng.choice(_NAMES).split()[-1].lower()}@example.{tld}", f"www.example.{tld}"]
    proof = rng.choice(evidence)
    proof_label = "phone" if proof.startswith("+") else "email" if "@" in proof else None
    written = rng.choice(_national_forms(num))
    name, role = rng.choice(_NAMES), rng.choice(_ROLES)
    shape = rng.choice(["card", "signature", "chat"])
    if shape == "card":
        pieces: list[Piece] = [(f"{name}\n{role}\n", None), (written, "phone"), ("\n", None), (proof, proof_label),
                               ("\n", None)]
    elif shape == "signature":
        pieces = [(f"--\n{name} | {role} | ", None), (written, "phone"), (" | ", None), (proof, proof_label), ("\n", None)]
    else:
        pieces = [(f"[{rng.randrange(24):02d}:{rng.randrange(60):02d}] {name.split()[-1].lower()}: ", None),
                  (proof, proof_label), (" / ", None), (written, "phone"), (f" {loc.chat_tail}\n", None)]
    pieces += [(f"{loc.refs[0]} ", None), (_digits8(rng), "neg:reference"), (", ZIP ", None),
               (rng.choice(_NEGATIVES["zip4"]), "neg:zip4"), ("\n", None)]
    return pieces


def make_heldout_set(seed: int = 14, cues: bool = True) -> list[dict]:
    """Every example number of every region in every form, in documents of 29 locales, one
    document per region and class beyond "before", plus documents with the other types and hard
    negatives. Seeded and reproducible.

    ``cues=False`` writes the "before" phone documents with the cue words replaced, and keeps
    labels only on numbers that need no cue (``+``/international forms): what the detector finds
    without context. The other classes are context by construction and are left out then.
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
            records.append(_record(pieces, loc.code, "phone", "before"))
        cards = _examples(region, _CARD_TYPES)
        if not cues or not cards:
            continue
        for cls in PHONE_CLASSES[1:]:
            loc = rng.choice(LOCALES)
            nums = rng.sample(cards, min(len(cards), rng.choice([1, 2])))
            if cls == "after":
                pieces = _after_doc(loc, nums, rng)
            elif cls == "above":
                pieces = _above_doc(loc, nums, rng)
            elif cls == "speech":
                pieces = _speech_doc(loc, nums, rng)
            elif cls == "broken":
                pieces = _broken_doc(loc, nums[0], rng)
            else:
                others = [c for c in cards if c is not nums[0]]
                pieces = _national_doc(loc, nums[0], rng.choice(others) if others else None, rng)
            if pieces:
                records.append(_record(pieces, loc.code, "phone", cls))
    for i in range(len(LOCALES) * 12):
        loc = LOCALES[i % len(LOCALES)]
        records.append(_record(_other_doc(loc, rng), loc.code, "form", "other"))
    return records
