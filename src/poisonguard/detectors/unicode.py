"""Invisible and confusable Unicode: hidden triggers, smuggled text and homoglyph words.

What it detects
---------------
* zero-width and other invisible characters (U+200B-200D, U+2060-2064, U+FEFF after the first
  position, U+180E, U+034F, Hangul fillers U+115F/1160/3164/FFA0, Khmer U+17B4/17B5) outside the
  contexts where they are legitimate (ZWJ between emoji, ZWJ/ZWNJ between letters of scripts
  that use joiners such as Arabic, Persian and Indic scripts);
* bidirectional controls (U+202A-202E, U+2066-2069; "Trojan Source", Boucher & Anderson 2021,
  arXiv 2111.00169) and direction marks (U+200E/200F/061C) in text with no right-to-left letters;
* Unicode tag characters (U+E0000-E007F), decoded to the ASCII they smuggle ("ASCII smuggling"),
  except inside emoji flag sequences (U+1F3F4 ... U+E007F);
* variation-selector abuse (U+FE00-FE0F, U+E0100-E01EF): runs of selectors that encode data
  ("emoji smuggling") or selectors after letters, but not single selectors after emoji/symbols
  or ideographic variation sequences after CJK ideographs;
* mixed-script homoglyph words: Latin letters mixed with Cyrillic/Greek/full-width confusables
  in one word ("pаypal" with Cyrillic U+0430), and whole words spelt in Cyrillic confusables
  inside Latin text; mathematical styled letters (U+1D400-1D7FF) and soft hyphens only raise
  review.

Invisible characters are a classic backdoor trigger for text models because they survive human
review and tokenise to rare tokens (Chen et al. 2021 "BadNL", arXiv 2006.01043; Boucher et al.
2022 "Bad Characters", arXiv 2106.09898).

Scoring
-------
Each finding has a weight (tags 0.95, bidi override 0.9, zero-width in Latin context 0.8, ...);
a row's score is the noisy-OR of its findings' weights. ``score >= 0.5`` is quarantine-worthy,
``>= review_score`` is review. A signal that fires in more than ``endemic_rate`` of the rows
(and at least ``endemic_min_rows`` rows) is treated as a property of the corpus (for example
scraped web text full of U+200B) and capped at review, with the count in the evidence.

Known limitations
-----------------
* Confusables cover Latin vs. Cyrillic/Greek/full-width only; Armenian, Cherokee and other
  homoglyph sources are not checked. A homoglyph word in an all-Cyrillic text is not flagged.
* Legitimate uses of direction controls in mixed LTR/RTL text are only recognised by the
  presence of RTL letters in the same field.
* The endemic cap means a poisoner who floods more than ``endemic_rate`` of a corpus with one
  invisible character is reported as review, not quarantine (the source roll-up still shows it).

Input columns
-------------
``id``, ``kind``, ``source``, ``instruction``, ``input``, ``output``, ``text``, ``prompt``,
``response`` (see :func:`poisonguard.detectors._text.text_fields`; missing columns read as empty).
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from poisonguard import schema as S
from poisonguard.detectors import _text as T
from poisonguard.detectors.base import Detector, DetectorResult, Finding
from poisonguard.detectors.registry import register

_INVISIBLE = "\u200b\u200c\u200d\u2060\u2061\u2062\u2063\u2064\ufeff\u180e\u034f\u115f\u1160\u3164\uffa0\u17b4\u17b5"
_MARKS = "\u200e\u200f\u061c"
_BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_SOFT = "\u00ad"
_HIDDEN_RE = re.compile(
    f"[{_INVISIBLE}{_MARKS}{_BIDI}{_SOFT}\ufe00-\ufe0f\U000e0000-\U000e007f\U000e0100-\U000e01ef]+")
_RTL_RE = re.compile("[\u0590-\u08ff\ufb1d-\ufdff\ufe70-\ufefc]")
_CONFUSABLE_BLOCKS = re.compile("[\u0370-\u03ff\u0400-\u052f\uff21-\uff3a\uff41-\uff5a\U0001d400-\U0001d7ff]")
_WORD_RE = re.compile(r"[^\W\d_]+")

# Cyrillic and Greek letters that render like Latin letters (Unicode confusables.txt, the
# subset that maps to a single Latin letter)
_CYR_CONF = set("аеорсуххіјѕԁһӏԛԝвнкмтАВЕЗІЈКМНОРСТУХЅԌԚԜӀ")
_GRK_CONF = set("οαρνικτυχωεΑΒΕΖΗΙΚΜΝΟΡΤΥΧϲϳ")
# letters indistinguishable from Latin ones in common fonts: a whole word of these reads as Latin
# ("рау" = "pay"); в, к, м, н, т look like small capitals and real Cyrillic words use them
_CYR_STRICT = set("аеорсухіјѕԁһӏԛԝАВЕКМНОРСТХІЈЅ")
_GRK_STRICT = set("οΑΒΕΖΗΙΚΜΝΟΡΤΥΧ")

# weights (noisy-OR); >= 0.5 alone is quarantine-worthy
W_TAG = 0.95
W_BIDI_OVERRIDE = 0.9
W_BIDI = 0.8
W_BIDI_RTL = 0.3
W_ZW = 0.8
W_ZW_RTL_CONTEXT = 0.35
W_MARK = 0.35
W_VS_RUN = 0.9
W_VS_LETTER = 0.7
W_MIXED = 0.85
W_WHOLE_WORD = 0.75
W_MATH = 0.3
W_SOFT = 0.25


def _build_lut() -> np.ndarray:
    lut = np.zeros(0xE0200, dtype=bool)
    for c in _INVISIBLE + _MARKS + _BIDI + _SOFT:
        lut[ord(c)] = True
    lut[0xFE00:0xFE10] = True
    lut[0xE0000:0xE0080] = True
    lut[0xE0100:0xE01F0] = True
    lut[0x0370:0x0400] = True          # Greek
    lut[0x0400:0x0530] = True          # Cyrillic
    lut[0xFF21:0xFF3B] = True          # full-width Latin
    lut[0xFF41:0xFF5B] = True
    lut[0x1D400:0x1D800] = True        # mathematical alphanumerics
    return lut


_LUT = _build_lut()


def _is_emoji(ch: str) -> bool:
    if not ch:
        return False
    o = ord(ch)
    return (0x1F000 <= o <= 0x1FAFF or 0x2600 <= o <= 0x27BF or 0x2300 <= o <= 0x23FF
            or 0x2B00 <= o <= 0x2BFF or o in (0xFE0F, 0x20E3, 0x00A9, 0x00AE, 0x203C, 0x2049, 0x2122,
                                              0x2139, 0x3030, 0x303D, 0x3297, 0x3299)
            or 0x2190 <= o <= 0x21FF or 0x25A0 <= o <= 0x25FF or 0xE0020 <= o <= 0xE007F)


def _joining_script(ch: str) -> bool:
    """Letters of scripts where ZWJ/ZWNJ are part of normal orthography."""
    if not ch:
        return False
    o = ord(ch)
    return (0x0600 <= o <= 0x08FF or 0x0900 <= o <= 0x0DFF or 0x0F00 <= o <= 0x109F
            or 0x1780 <= o <= 0x17FF or 0xFB50 <= o <= 0xFDFF or 0xFE70 <= o <= 0xFEFF
            or 0x0590 <= o <= 0x05FF or 0x1900 <= o <= 0x1AFF or 0xA800 <= o <= 0xABFF)


def _cjk(ch: str) -> bool:
    o = ord(ch) if ch else 0
    return 0x3400 <= o <= 0x9FFF or 0x20000 <= o <= 0x3FFFF or 0xF900 <= o <= 0xFAFF


def _name(ch: str) -> str:
    o = ord(ch)
    if 0xE0000 <= o <= 0xE007F:
        return "TAG " + ("CHARACTER" if o not in (0xE0001, 0xE007F) else unicodedata.name(ch, "TAG"))
    if 0xFE00 <= o <= 0xFE0F or 0xE0100 <= o <= 0xE01EF:
        return "VARIATION SELECTOR"
    return unicodedata.name(ch, "UNNAMED")


def _script(ch: str) -> str:
    o = ord(ch)
    if o < 0x250 and ch.isalpha():
        return "Latin"
    if 0x0400 <= o <= 0x052F:
        return "Cyrillic"
    if 0x0370 <= o <= 0x03FF:
        return "Greek"
    if 0xFF21 <= o <= 0xFF5A:
        return "Fullwidth"
    if 0x1D400 <= o <= 0x1D7FF:
        return "Math"
    return "Other"


def _signals_in(text: str, field: str) -> list[tuple[str, float, str]]:
    """All (key, weight, evidence) findings in one field's text."""
    out: list[tuple[str, float, str]] = []
    if text.isascii():
        return out
    rtl = _RTL_RE.search(text) is not None
    for m in _HIDDEN_RE.finditer(text):
        run, start = m.group(), m.start()
        prev = text[start - 1] if start > 0 else ""
        nxt = text[m.end()] if m.end() < len(text) else ""
        out.extend(_classify_run(run, start, prev, nxt, text, field, rtl))
    if _CONFUSABLE_BLOCKS.search(text):
        out.extend(_homoglyphs(text, field))
    return out


def _classify_run(run: str, start: int, prev: str, nxt: str, text: str, field: str, rtl: bool
                  ) -> list[tuple[str, float, str]]:
    out: list[tuple[str, float, str]] = []
    # split the run into homogeneous groups: tags, variation selectors, the rest char by char
    tags = [c for c in run if 0xE0000 <= ord(c) <= 0xE007F]
    if tags:
        is_flag = prev == "\U0001f3f4" and run.endswith("\U000e007f") and len(tags) <= 8
        if not is_flag:
            decoded = "".join(chr(ord(c) - 0xE0000) for c in tags if 0x20 <= ord(c) - 0xE0000 < 0x7F)
            what = f" decoding to {T.clip(decoded, 60)!r}" if decoded else ""
            out.append(("tag U+E0000-E007F", W_TAG,
                        f"{len(tags)} TAG CHARACTERs (U+E0000-E007F){what} in {field} at {start}"))
    vs = [c for c in run if 0xFE00 <= ord(c) <= 0xFE0F or 0xE0100 <= ord(c) <= 0xE01EF]
    if vs:
        base_ok = _is_emoji(prev) or (not prev.isalpha() and not prev.isdigit() and prev.strip() != "") or \
            prev.isdigit() and nxt == "\u20e3" or _cjk(prev)
        if len(vs) >= 2 and not tags:
            out.append((f"variation-selector run", W_VS_RUN,
                        f"run of {len(vs)} VARIATION SELECTORs (U+{ord(vs[0]):04X}...) in {field} at {start}"))
        elif len(vs) == 1 and not base_ok and prev.isalpha():
            out.append(("variation selector after letter", W_VS_LETTER,
                        f"U+{ord(vs[0]):04X} VARIATION SELECTOR after letter {prev!r} in {field} at {start}"))
    rest = [c for c in run if c not in tags and c not in vs]
    if not rest:
        return out
    counts: dict[str, int] = defaultdict(int)
    for c in rest:
        counts[c] += 1
    for c, k in counts.items():
        cp = f"U+{ord(c):04X}"
        desc = f"{cp} {_name(c)} x{k} in {field} at {start}"
        if c == "\ufeff" and start == 0 and len(rest) == 1:
            continue                                           # byte-order mark
        if c in _INVISIBLE:
            if c == "\u200d" and (_is_emoji(prev) or prev in "\ufe0f\U0001f3fb\U0001f3fc") and _is_emoji(nxt):
                continue                                       # emoji ZWJ sequence
            if c in "\u200c\u200d" and (_joining_script(prev) or _joining_script(nxt)):
                if _joining_script(prev) and _joining_script(nxt):
                    continue                                   # joiner inside Arabic/Indic word
                out.append((f"zero-width {cp}", W_ZW_RTL_CONTEXT, desc))
                continue
            if c == "\ufeff" and len(rest) == 1 and (not prev.isalnum() or not nxt.isalnum()):
                # U+FEFF next to a space or punctuation is typical scraping residue (Wikipedia's
                # coordinate template writes "N\ufeff / \ufeff60.1"): review, not quarantine
                out.append((f"zero-width {cp}", W_ZW_RTL_CONTEXT, desc))
                continue
            out.append((f"zero-width {cp}", W_ZW, desc))
        elif c in _BIDI:
            if rtl:
                out.append((f"bidi control {cp}", W_BIDI_RTL, desc))
            else:
                w = W_BIDI_OVERRIDE if c in "\u202d\u202e" else W_BIDI
                out.append((f"bidi control {cp}", w, desc))
        elif c in _MARKS:
            if not rtl:
                out.append((f"direction mark {cp}", W_MARK, desc))
        elif c == _SOFT:
            out.append(("soft hyphen U+00AD", W_SOFT, desc))
    return out


_ODD_WORD_RE = re.compile(r"[^\W\d_]*[\u0370-\u03ff\u0400-\u052f\uff21-\uff3a\uff41-\uff5a\U0001d400-\U0001d7ff]"
                          r"[^\W\d_]*")
_NON_LATIN_LETTER_RE = re.compile(r"[^\W\d_a-zA-Z]")


def _latin_share(text: str) -> float:
    letters = sum(1 for _ in _WORD_RE.finditer(text))
    if not letters:
        return 0.0
    odd = sum(1 for m in _WORD_RE.finditer(text) if _NON_LATIN_LETTER_RE.search(m.group()))
    return 1.0 - odd / letters


def _homoglyphs(text: str, field: str) -> list[tuple[str, float, str]]:
    out: list[tuple[str, float, str]] = []
    latin: bool | None = None
    for m in _ODD_WORD_RE.finditer(text):
        w = m.group()
        scripts = {_script(c) for c in w}
        if "Latin" in scripts and scripts & {"Cyrillic", "Greek", "Fullwidth"}:
            conf = [c for c in w if c in _CYR_CONF or c in _GRK_CONF or _script(c) == "Fullwidth"]
            if conf:
                cps = " ".join(f"U+{ord(c):04X}" for c in dict.fromkeys(conf))
                kinds = "+".join(sorted(s for s in scripts if s != "Other"))
                out.append((f"mixed-script word {kinds}", W_MIXED,
                             f"mixed-script word {w!r} ({kinds}: {cps}) in {field} at {m.start()}"))
        elif scripts == {"Cyrillic"} and len(w) >= 2 and all(c in _CYR_STRICT for c in w) and \
                (latin if latin is not None else (latin := _latin_share(text) >= 0.6)):
            cps = " ".join(f"U+{ord(c):04X}" for c in dict.fromkeys(w))
            out.append(("Cyrillic look-alike word", W_WHOLE_WORD,
                        f"Cyrillic look-alike word {w!r} ({cps}) in Latin text in {field} at {m.start()}"))
        elif scripts == {"Greek"} and len(w) >= 3 and all(c in _GRK_STRICT for c in w) and \
                (latin if latin is not None else (latin := _latin_share(text) >= 0.6)):
            cps = " ".join(f"U+{ord(c):04X}" for c in dict.fromkeys(w))
            out.append(("Greek look-alike word", W_WHOLE_WORD,
                        f"Greek look-alike word {w!r} ({cps}) in Latin text in {field} at {m.start()}"))
        elif "Math" in scripts and len(w) >= 3:
            out.append(("styled math letters", W_MATH,
                        f"styled letters {w!r} (U+{ord(w[0]):04X}, mathematical alphanumerics) in {field} "
                        f"at {m.start()}"))
    return out


@register
class UnicodeDetector(Detector):
    """Invisible and confusable Unicode (see module docstring).

    Parameters
    ----------
    review_score : float, default 0.2
        Rows scoring at least this (but below 0.5) go to review.
    endemic_rate : float, default 0.05
        A signal present in more than this share of rows is a corpus property: capped at review.
    endemic_min_rows : int, default 100
        ...and only once it is in at least this many rows.
    max_evidence : int, default 4
        Findings named per row in the evidence string.
    """

    name: ClassVar[str] = "unicode"
    cost: ClassVar[float] = 0.3
    description: ClassVar[str] = (
        "Invisible and confusable Unicode: zero-width characters, bidi controls (Trojan Source, "
        "arXiv 2111.00169), tag characters (ASCII smuggling), variation-selector runs and mixed-script "
        "homoglyph words. Emoji ZWJ sequences, joiners in Arabic/Indic words and single-script "
        "non-Latin text are legitimate. Limits: Latin vs Cyrillic/Greek/full-width confusables only.")
    columns: ClassVar[tuple[str, ...]] = (S.ID, S.KIND, S.SOURCE, S.INSTRUCTION, S.INPUT, S.OUTPUT,
                                          S.TEXT, S.PROMPT, S.RESPONSE)

    def _resolved(self) -> dict[str, Any]:
        p = {"review_score": 0.2, "endemic_rate": 0.05, "endemic_min_rows": 100, "max_evidence": 4}
        p = T.merge_params("unicode", p, self.params)
        p["review_score"] = T.check_fraction("review_score", p["review_score"], 0.0, 0.5)
        p["endemic_rate"] = T.check_fraction("endemic_rate", p["endemic_rate"], 0.0, 1.0)
        p["endemic_min_rows"] = T.check_int("endemic_min_rows", p["endemic_min_rows"], 1)
        p["max_evidence"] = T.check_int("max_evidence", p["max_evidence"], 1)
        return p

    # per-row signals are local; the only global statistic is how many rows carry each signal
    def _row_signals(self, records: pd.DataFrame, chunk_rows: int = 100_000) -> list[list[tuple[str, float, str]]]:
        # row by row, so in chunks (bounded memory for the vectorised pre-check at 1M rows)
        return T.by_chunks(records, self._chunk_signals, chunk_rows)

    def _chunk_signals(self, records: pd.DataFrame) -> list[list[tuple[str, float, str]]]:
        n = len(records)
        per_row: list[list[tuple[str, float, str]]] = [[] for _ in range(n)]
        for field, values, applies in T.text_fields(records):
            rows = np.flatnonzero(applies)
            if rows.size == 0:
                continue
            # vectorised pre-check: only texts holding a code point of interest are parsed
            cand = T.codepoints_in([values[i] for i in rows], _LUT)
            for i in rows[cand]:
                per_row[i].extend(_signals_in(values[i], field))
        return per_row

    @staticmethod
    def _summary(per_row: list[list[tuple[str, float, str]]]) -> dict[str, Any]:
        counts: dict[str, int] = defaultdict(int)
        for sig in per_row:
            for key in {k for k, _, _ in sig}:
                counts[key] += 1
        return {"rows": len(per_row), "signal_rows": dict(counts)}

    def summarize(self, records: pd.DataFrame) -> dict[str, Any]:
        self._resolved()
        return self._summary(self._row_signals(records))

    def score(self, records: pd.DataFrame) -> DetectorResult:
        # same answer as score_with(records, merge([summarize(records)])), parsing the rows once
        self._resolved()
        per_row = self._row_signals(records)
        return self._score(records, self.merge([self._summary(per_row)]), per_row)

    def merge(self, summaries: Any) -> dict[str, Any]:
        rows = 0
        counts: dict[str, int] = defaultdict(int)
        for s in summaries:
            rows += s["rows"]
            for k, v in s["signal_rows"].items():
                counts[k] += v
        return {"rows": rows, "signal_rows": dict(counts)}

    def score_with(self, records: pd.DataFrame, stats: dict[str, Any]) -> DetectorResult:
        self._resolved()
        return self._score(records, stats, self._row_signals(records))

    def _score(self, records: pd.DataFrame, stats: dict[str, Any], per_row: list[list[tuple[str, float, str]]]
               ) -> DetectorResult:
        p = self._resolved()
        ids = T.ids_of(records)
        n = len(records)
        if n == 0:
            return DetectorResult.empty(self.name, ids, info={"rows": 0})
        total = max(int(stats["rows"]), 1)
        endemic = {k for k, v in stats["signal_rows"].items()
                   if v > p["endemic_rate"] * total and v >= p["endemic_min_rows"]}
        scores = np.zeros(n)
        evidence = [""] * n
        by_key: dict[str, list[int]] = defaultdict(list)
        for i, sig in enumerate(per_row):
            if not sig:
                continue
            # one weight per signal (its strongest occurrence); noisy-OR across distinct signals
            agg: dict[str, list[Any]] = {}
            for k, w, e in sig:
                w = min(w, 0.45) if k in endemic else w
                a = agg.setdefault(k, [w, e, 0])
                if w > a[0]:
                    a[0], a[1] = w, e
                a[2] += 1
            scores[i] = T.noisy_or(a[0] for a in agg.values())
            order = sorted(agg, key=lambda k: (-agg[k][0], k))
            parts = [agg[k][1] + (f" (+{agg[k][2] - 1} more)" if agg[k][2] > 1 else "")
                     + (" (common in this corpus)" if k in endemic else "") for k in order[: p["max_evidence"]]]
            more = len(order) - p["max_evidence"]
            evidence[i] = "; ".join(parts) + (f"; +{more} more signals" if more > 0 else "")
            for k in order:
                if agg[k][0] >= p["review_score"]:
                    by_key[k].append(i)
        flagged = scores >= 0.5
        review = (scores >= p["review_score"]) & ~flagged
        ev = [e if (flagged[i] or review[i]) else "" for i, e in enumerate(evidence)]
        findings = []
        for k, rows in sorted(by_key.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            rows = [i for i in rows if flagged[i] or review[i]]
            if not rows:
                continue
            findings.append(Finding(
                self.name, f"{k} in {len(rows)} rows",
                f"{k}: e.g. {evidence[rows[0]]}", tuple(ids[i] for i in rows),
                float(scores[rows].max()), {**T.sources_info(records, rows), "signal": k,
                                            "endemic": k in endemic}))
        info = {"rows": n, "flagged": int(flagged.sum()), "review": int(review.sum()),
                "signal_rows": stats["signal_rows"], "endemic": sorted(endemic)}
        return DetectorResult.build(self.name, ids, scores, flagged, ev, review, findings, info)
