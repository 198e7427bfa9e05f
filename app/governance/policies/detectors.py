"""PII detectors: regular expressions find candidates, maintained libraries decide.

Each detector is a candidate pattern plus a validator: python-stdnum checks card numbers (Luhn),
IBANs (the country's length and format, then mod 97) and US SSNs (the 000/666/9xx areas, the 00
group, the 0000 serial and the numbers published in advertising); phonenumbers decides whether a
digit run is a real number in a region's plan; the stdlib `ipaddress` parses IP addresses. E-mail
has no checksum, so its pattern is the whole test.

Near-misses left alone by design: a 13-19 digit run failing Luhn, an IBAN failing its country
format or checksum, dates (2024-01-15, 15.01.2024) and short numbers (phone candidates need at
least 7 digits and a valid number plan), and version strings. A dotted quad is a version, not an
IP address, when it is glued to a letter ("v1.2.3.4"), preceded by a version word ("version",
"release", "build", "rev", "firmware", optionally with ":" or "="), or followed by a
"-suffix" ("1.2.3.4-beta"); without such context 1.2.3.4 is a valid address and is redacted.

A candidate is classified once: the detectors run in `DETECTORS` order and a candidate claims
its span whether or not it validates, so the digits of an invalid IBAN are not then taken for a
card number, nor those of a Luhn-failing card for a phone number.

Candidates never span a line break or a word that cannot belong to them, which is what lets
`growing_tail` bound how much of a stream must wait (see engine.OutputRedactor).
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import phonenumbers
from stdnum import iban, luhn
from stdnum.us import ssn

DETECTORS: tuple[str, ...] = ("email", "iban", "credit_card", "ssn", "ip_address", "phone")
PLACEHOLDERS: dict[str, str] = {
    "email": "[EMAIL]",
    "iban": "[IBAN]",
    "credit_card": "[CREDIT_CARD]",
    "ssn": "[SSN]",
    "ip_address": "[IP_ADDRESS]",
    "phone": "[PHONE]",
}
# The longest entity a detector reports (an e-mail address, RFC 5321), which bounds hold-back.
MAX_ENTITY_CHARS = 254


@dataclass(frozen=True)
class Span:
    detector: str
    start: int
    end: int


# A finder yields (start, end, valid) for each candidate; invalid ones only claim their span.
Found = Iterator[tuple[int, int, bool]]


_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9._%+-]{1,64}@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}(?![\w-])"
)
# Unbroken, or groups of exactly four joined by single spaces (how IBANs are printed).
_IBAN = re.compile(
    r"(?<!\w)[A-Z]{2}\d{2}(?:[A-Za-z0-9]{11,30}|(?: [A-Za-z0-9]{4}){2,7}(?: [A-Za-z0-9]{1,4})?)(?!\w)"
)
# Unbroken 13-19 digits, or 4-digit-led groups joined by one consistent space or dash (4-4-4-4,
# Amex 4-6-5, 19-digit 4-4-4-4-3).
_CARD = re.compile(
    r"(?<![\w.,+-])(?:\d{13,19}|\d{4}(?P<sep>[ -])\d{4,6}(?P=sep)\d{4,6}(?:(?P=sep)\d{1,4}){0,2})"
    r"(?!\w|[.,-]\d)"
)
_SSN = re.compile(r"(?<![\w.-])(\d{3})(?P<sep>[ -])(\d{2})(?P=sep)(\d{4})(?!\w|[.-]\d)")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d|-[A-Za-z])")
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{1,4}|:)[0-9A-Fa-f:]{1,38}(?:(?<=:)\d{1,3}(?:\.\d{1,3}){3})?(?![\w:]|\.\d)"
)
_VERSION_WORD = re.compile(
    r"\b(?:v|ver|version|release|rel|build|rev|revision|firmware|fw)\.?\s*[:=]?\s*\Z", re.IGNORECASE
)
# Groups joined by single separators are matched separately from an unbroken run: optional
# separators between digit groups would backtrack exponentially on long digit strings.
_PHONE = re.compile(
    r"(?<![\w+.-])(?:"
    r"\+?\d{7,15}"
    r"|(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,5}\)[ .-]?|\d{1,10}[ .-])(?:\d{1,10}[ .-]){0,4}\d{1,10}"
    r")(?!\w|[.-]\d)"
)
_PHONE_GROUP = re.compile(r"\+?\(?\d+\)?")
_DATE = re.compile(r"\d{4}([./-])\d{1,2}\1\d{1,2}|\d{1,2}([./-])\d{1,2}\2\d{2,4}")
_DOTTED_QUAD = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
MIN_PHONE_DIGITS = 7
# Every entity holds a digit, except an e-mail address, which holds an "@": a cheap pre-check.
_MAYBE_PII = re.compile(r"[\d@]")


def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def _trimmed(candidate: str, valid: Callable[[str], bool], min_groups: int) -> int:
    """Length of the longest prefix ending at a group boundary that is valid, or 0.

    A grouped candidate can swallow a following word or number ("... 7034 from", a card number
    followed by a year); dropping trailing groups recovers the entity.
    """
    cuts = [m.start() for m in re.finditer(r"[ -]", candidate)] + [len(candidate)]
    for cut in reversed(cuts[min_groups - 1 :]):
        if valid(candidate[:cut]):
            return cut
    return 0


def _iban_valid(candidate: str) -> bool:
    return iban.is_valid(candidate.replace(" ", ""))


def _card_valid(candidate: str) -> bool:
    digits = _digits(candidate)
    return 13 <= len(digits) <= 19 and luhn.is_valid(digits)


def find_email(text: str) -> Found:
    for match in _EMAIL.finditer(text):
        yield *match.span(), True


def _grouped(match: re.Match[str], valid: Callable[[str], bool], min_groups: int) -> tuple[int, int, bool]:
    length = _trimmed(match.group(), valid, min_groups)
    return (match.start(), match.start() + length, True) if length else (*match.span(), False)


def find_iban(text: str) -> Found:
    for match in _IBAN.finditer(text):
        yield _grouped(match, _iban_valid, min_groups=4 if " " in match.group() else 1)


def find_credit_card(text: str) -> Found:
    for match in _CARD.finditer(text):
        yield _grouped(match, _card_valid, min_groups=3 if match.group("sep") else 1)


def find_ssn(text: str) -> Found:
    for match in _SSN.finditer(text):
        yield *match.span(), ssn.is_valid(match.group(1) + match.group(3) + match.group(4))


def _ip_valid(candidate: str) -> bool:
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


def find_ip_address(text: str) -> Found:
    for match in _IPV4.finditer(text):
        version = _VERSION_WORD.search(text, max(0, match.start() - 24), match.start())
        yield *match.span(), not version and _ip_valid(match.group())
    for match in _IPV6.finditer(text):
        candidate = match.group()
        # Requiring a decimal digit keeps code like `Face::Add` or `cafe::bad` out.
        if candidate.count(":") >= 2 and re.search(r"\d", candidate):
            yield *match.span(), _ip_valid(candidate)


@functools.lru_cache(maxsize=4096)
def _phone_valid(candidate: str, regions: tuple[str, ...]) -> bool:
    """Memoised: a stream rescans the same few candidates in its context window at every delta."""
    if len(_digits(candidate)) < MIN_PHONE_DIGITS:
        return False
    if _DATE.fullmatch(candidate) or _DOTTED_QUAD.fullmatch(candidate):
        return False
    for region in regions if not candidate.startswith("+") else (None,):
        try:
            number = phonenumbers.parse(candidate, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number):
            return True
    return False


def find_phone(text: str, regions: tuple[str, ...] = ("US",)) -> Found:
    """International numbers (+...) in any plan; national formats in `regions`' plans.

    A candidate run may hold a number among other digit groups ("room 12 415 555 2671"), so the
    contiguous sub-runs of its groups are tried, longest first.
    """
    for match in _PHONE.finditer(text):
        groups = [g.span() for g in _PHONE_GROUP.finditer(match.group())]
        found = _phone_subrun(match.group(), groups, regions)
        if found:
            yield match.start() + found[0], match.start() + found[1], True


def _phone_subrun(
    candidate: str, groups: list[tuple[int, int]], regions: tuple[str, ...]
) -> tuple[int, int] | None:
    count = len(groups)
    for size in range(count, 0, -1):
        for first in range(0, count - size + 1):
            start, end = groups[first][0], groups[first + size - 1][1]
            if _phone_valid(candidate[start:end], regions):
                return start, end
    return None


def find_pii(text: str, phone_regions: tuple[str, ...] = ("US",)) -> list[Span]:
    """Every detector's matches, overlaps resolved by `DETECTORS` order, sorted by position."""
    if not _MAYBE_PII.search(text):
        return []
    finders: dict[str, Callable[[str], Found]] = {
        "email": find_email,
        "iban": find_iban,
        "credit_card": find_credit_card,
        "ssn": find_ssn,
        "ip_address": find_ip_address,
        "phone": lambda t: find_phone(t, phone_regions),
    }
    starts: list[int] = []  # claimed spans, kept sorted and disjoint
    ends: list[int] = []
    found: list[Span] = []
    for name in DETECTORS:
        for start, end, valid in finders[name](text):
            i = bisect.bisect_right(starts, start)
            if (i and ends[i - 1] > start) or (i < len(starts) and starts[i] < end):
                continue
            starts.insert(i, start)
            ends.insert(i, end)
            if valid:
                found.append(Span(name, start, end))
    return sorted(found, key=lambda s: s.start)


def redact(text: str, spans: Iterable[Span]) -> str:
    """`text` with each span replaced by its detector's placeholder; spans must not overlap."""
    parts: list[str] = []
    position = 0
    for span in sorted(spans, key=lambda s: s.start):
        parts.append(text[position : span.start])
        parts.append(PLACEHOLDERS[span.detector])
        position = span.end
    parts.append(text[position:])
    return "".join(parts)


# What may still grow into an entity at the end of a stream: the unfinished token (e-mail, IP
# address, unbroken number), a run of digit groups (phone, card, SSN), or a grouped IBAN.
_GROWING_TAIL = re.compile(r"(?:\S+|[+(]?\d[\d ().-]*|(?<!\w)[A-Z]{2}\d{2}(?: [A-Za-z0-9]{1,4})* ?)\Z")


def growing_tail(text: str) -> int:
    """Start of the earliest suffix of `text` that more text could turn into (part of) an entity."""
    match = _GROWING_TAIL.search(text)
    return match.start() if match else len(text)
