"""Redact personal identifiers in Chinese and English clinical free text.

`Redactor.redact` replaces each identifier with a placeholder of its type, e.g. [NAME] or [PHONE], and
counts the replacements per type. It applies, in order:

1. e-mail addresses, before the known values, so that a known name inside one does not leave the rest;
2. known values: every identifier taken from the identifier columns of the export (names, phone
   numbers, ID numbers, record numbers, addresses...), wherever it occurs in the text. A Latin name's
   words and a three-character Chinese name's given name are matched too;
3. Chinese resident identity numbers: 17 digits and a check digit or X (GB 11643-1999);
4. labelled values: the value after a label such as 住院号/MRN, 出生日期/DOB, 电话/Tel, 姓名/Name:,
   Patient: or 地址/Address:, where the label is kept and the value replaced;
5. phone numbers: Chinese mobile numbers 1[3-9] plus 9 digits (with an optional +86), landlines with
   an area code (010-62345678, (021)12345678) and North American numbers ((555) 201-3344);
6. dates to the day (2015-03-07, 2015年3月7日, 03/07/2015, March 7, 2015). Dates after a birth
   label become [DOB] in step 4, all others [DATE];
7. names after Mr/Mrs/Ms/Miss/Dr, Chinese names after 患者/患儿/病人 that start with
   a common surname, and street addresses (Chinese province/city ... 号, English number + street).

NOTE: steps 3-7 are patterns, so an identifier in an unexpected form (a name without a label, title or
column value, a date written in words in Chinese) passes through. The known values of step 2 are the
main protection, which is why the converter collects them from every identifier column.
Known values also over-redact: a name that is an ordinary word (高峰) is removed from every text.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping

NAME = "NAME"
PHONE = "PHONE"
ID_NUMBER = "ID_NUMBER"
DOB = "DOB"
DATE = "DATE"
MRN = "MRN"
ADDRESS = "ADDRESS"
EMAIL = "EMAIL"
IDENTIFIER = "IDENTIFIER"
IDENTIFIER_TYPES = (NAME, PHONE, ID_NUMBER, DOB, DATE, MRN, ADDRESS, EMAIL, IDENTIFIER)

# Known values shorter than this are not matched in free text, because they would hit ordinary words.
MIN_KNOWN_VALUE_LENGTH = 2

HAN = "\u4e00-\u9fff"
LATIN_NAME = r"[A-Z][A-Za-z'\-]+(?:[ \t]+[A-Z][A-Za-z'\-]+){0,2}"
CHINESE_NAME = rf"[{HAN}·]{{2,4}}"
MONTHS = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)[a-z]*\.?"
DATE_FORMS = (
    r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}",
    rf"\d{{4}}[ \t]*年[ \t]*\d{{1,2}}[ \t]*月[ \t]*\d{{1,2}}[ \t]*[日号]?",
    r"\d{1,2}[-/.]\d{1,2}[-/.]\d{4}",
    rf"{MONTHS}[ \t]+\d{{1,2}},?[ \t]+\d{{4}}",
    rf"\d{{1,2}}[ \t]+{MONTHS},?[ \t]+\d{{4}}",
)
DATE_PATTERN = rf"(?<!\d)(?:{'|'.join(DATE_FORMS)})(?!\d)"

# Labels whose value is an identifier: (compiled pattern with groups `label` and `value`, type).
LABELLED_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(rf"(?P<label>{label})(?P<separator>[ \t]*[:：#]?[ \t]*)(?P<value>{value})"), kind)
    for label, value, kind in (
        (
            r"住院号|门诊号|病案号|病历号|登记号|ID号|\b(?i:MRN|medical[ \t]+record[ \t]+(?:number|no\.?)"
            r"|hospital[ \t]+(?:number|no\.?)|patient[ \t]+ID)",
            r"[A-Za-z]{0,4}\d[A-Za-z0-9\-]{3,}",
            MRN,
        ),
        (
            r"出生日期|出生于|出生|生日|\b(?i:date[ \t]+of[ \t]+birth|birth[ \t]*date|D\.?O\.?B\.?|born(?:[ \t]+on)?)",
            DATE_PATTERN,
            DOB,
        ),
        (
            r"联系电话|电话|手机号码|手机号|手机|联系方式|\b(?i:tel(?:ephone)?|phone|mobile)",
            r"\+?\d[\d \t()\-]{5,}\d",
            PHONE,
        ),
        (
            r"患者姓名|患儿姓名|病人姓名|姓名|\b(?i:patient[ \t]+name|name|patient)(?=[ \t]*[:：])",
            rf"{CHINESE_NAME}|{LATIN_NAME}",
            NAME,
        ),
        (r"家庭住址|现住址|住址|地址|\b(?i:address)(?=[ \t]*[:：])", r"[^，,。；;\n]+", ADDRESS),
    )
)

CHINESE_ID_NUMBER = re.compile(r"(?<![0-9A-Za-z])\d{17}[\dXx](?![0-9A-Za-z])")
PHONE_PATTERNS = (
    re.compile(r"(?<!\d)(?:\+?86[\- \t]?)?1[3-9]\d(?:[\- \t]?\d{4}){2}(?!\d)"),
    re.compile(r"(?<!\d)(?:\(0\d{2,3}\)[ \t]?|0\d{2,3}-)\d{7,8}(?!\d)"),
    re.compile(r"(?<!\d)(?:\+?1[\-. \t]?)?(?:\(\d{3}\)[ \t]?|\d{3}[\-.])\d{3}[\-.]\d{4}(?!\d)"),
)
DATE_REGEX = re.compile(DATE_PATTERN)
EMAIL_REGEX = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")
TITLED_NAME = re.compile(rf"(?P<label>\b(?:Mr|Mrs|Ms|Miss|Dr)\.?[ \t]+)(?P<value>{LATIN_NAME})")

# Common Chinese surnames. Characters that also start common clinical words (高热, 于…日, 常规, 史) are
# left out, so "患儿高热" keeps its symptom.
CHINESE_SURNAMES = (
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘蒋蔡余杜叶程苏魏吕丁任沈姚卢姜"
    "崔钟谭陆汪范金石廖贾夏韦傅方邹熊孟秦邱江尹薛闫段雷侯龙陶黎贺顾毛郝龚邵万钱严覃武戴莫孔汤欧"
)
PATIENT_NAME = re.compile(
    rf"(?P<label>(?:患者|患儿|病人)[:：]?[ \t]*)(?P<value>[{CHINESE_SURNAMES}][{HAN}]{{1,2}})"
    rf"(?=[，,。；;、（( \t]|[男女]|$)"
)
STREET_ADDRESSES = (
    re.compile(rf"[{HAN}]{{2,}}[省市][{HAN}0-9]*?[区县镇][{HAN}0-9]*?[路街道巷村][{HAN}0-9]*?\d+号(?:\d+室)?"),
    re.compile(
        r"\b\d{1,5}[ \t]+(?:[A-Z][a-z]+[ \t]+){1,3}(?:Street|St|Avenue|Ave|Road|Rd|Lane|Ln|Drive|Boulevard|Blvd|Way)"
        r"\b\.?"
    ),
)


class Redactor:
    """Replaces identifiers in free text with [TYPE] placeholders and counts them per type."""

    def __init__(self, known_identifiers: Mapping[str, str] | None = None) -> None:
        """Build a redactor. `known_identifiers` maps an identifier value (e.g. a patient's name) to its type."""
        self.known_pattern, self.known_types = compile_known_identifiers(known_identifiers or {})

    def redact(self, text: str) -> tuple[str, Counter[str]]:
        """Return the text with every identifier found replaced, and the number of replacements per type."""
        counts: Counter[str] = Counter()
        text = replace_all(EMAIL_REGEX, text, EMAIL, counts)
        if self.known_pattern is not None:
            text = self.known_pattern.sub(lambda match: self._known(match, counts), text)
        text = replace_all(CHINESE_ID_NUMBER, text, ID_NUMBER, counts)
        for pattern, kind in LABELLED_PATTERNS:
            text = replace_value(pattern, text, kind, counts)
        for pattern in PHONE_PATTERNS:
            text = replace_all(pattern, text, PHONE, counts)
        text = replace_all(DATE_REGEX, text, DATE, counts)
        text = replace_value(TITLED_NAME, text, NAME, counts)
        text = replace_value(PATIENT_NAME, text, NAME, counts)
        for pattern in STREET_ADDRESSES:
            text = replace_all(pattern, text, ADDRESS, counts)
        return text, counts

    def _known(self, match: re.Match[str], counts: Counter[str]) -> str:
        kind = self.known_types.get(match.group(0).casefold(), IDENTIFIER)
        counts[kind] += 1
        return placeholder(kind)


def placeholder(kind: str) -> str:
    return f"[{kind}]"


def replace_all(pattern: re.Pattern[str], text: str, kind: str, counts: Counter[str]) -> str:
    text, count = pattern.subn(placeholder(kind), text)
    counts[kind] += count
    return text


def replace_value(pattern: re.Pattern[str], text: str, kind: str, counts: Counter[str]) -> str:
    """Replace the `value` group of each match and keep the rest (the label and its separator)."""

    def substitute(match: re.Match[str]) -> str:
        if match.group("value").startswith("["):
            return match.group(0)
        counts[kind] += 1
        start, end = match.span("value")
        whole_start = match.start(0)
        return match.group(0)[: start - whole_start] + placeholder(kind) + match.group(0)[end - whole_start :]

    return pattern.sub(substitute, text)


def name_variants(name: str) -> list[str]:
    """Return the name and the parts of it that appear alone in notes: Latin words, a Chinese given name."""
    variants = [name]
    words = name.split()
    if len(words) > 1:
        variants += [word for word in words if len(word) >= 3]
    elif re.fullmatch(rf"[{HAN}]{{3}}", name):
        variants.append(name[1:])
    return variants


def phone_variants(phone: str) -> list[str]:
    """Return the number as written and as digits only, since notes rarely copy the separators."""
    digits = re.sub(r"\D", "", phone)
    return [phone, digits] if digits and digits != phone else [phone]


def known_identifier_variants(value: str, kind: str) -> list[str]:
    value = value.strip()
    if kind == NAME:
        return name_variants(value)
    if kind == PHONE:
        return phone_variants(value)
    return [value]


def compile_known_identifiers(known: Mapping[str, str]) -> tuple[re.Pattern[str] | None, dict[str, str]]:
    """Compile one pattern that matches any known value (longest first) and map each casefolded value to its type.

    Values that start or end with a letter or digit only match where no letter or digit continues them,
    so the name "Ann" does not hit "Annual".
    """
    types: dict[str, str] = {}
    for value, kind in known.items():
        for variant in known_identifier_variants(value, kind):
            if len(variant) >= MIN_KNOWN_VALUE_LENGTH:
                types.setdefault(variant.casefold(), kind)
    if not types:
        return None, types
    alternatives = [bounded(re.escape(value), value) for value in sorted(types, key=len, reverse=True)]
    return re.compile("|".join(alternatives), re.IGNORECASE), types


def bounded(escaped: str, value: str) -> str:
    start = r"(?<![A-Za-z0-9])" if value[0].isascii() and value[0].isalnum() else ""
    end = r"(?![A-Za-z0-9])" if value[-1].isascii() and value[-1].isalnum() else ""
    return f"{start}{escaped}{end}"


def total_counts(counters: Iterable[Counter[str]]) -> dict[str, int]:
    """Sum per-type counters into a dict with every identifier type, zeros included."""
    total: Counter[str] = Counter()
    for counter in counters:
        total.update(counter)
    return {kind: total[kind] for kind in IDENTIFIER_TYPES}
