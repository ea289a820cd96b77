"""Hidden instructions and prompt injection inside data, tool output, documents and responses.

What it detects
---------------
Instructions aimed at the model that hide in places where data belongs: the ``input`` of an
instruction row, a retrieved document, a tool/observation turn, or a response the model is taught
to give. Eight pattern families, each a small set of general regular expressions (no string
matches of known attack rows):

``override``      "ignore previous instructions", "new instructions:", "you are now DAN",
                  "developer mode", "from now on you ..."
``role``          fake system/developer turns: chat-template tokens (``<|im_start|>system``,
                  ``[INST]``, ``<<SYS>>``, ``<|start_header_id|>``), "SYSTEM:" / "[developer]"
                  headers in the middle of data, ``{"role": "system"``
``directive``     a sentence that starts like a command (imperative verb, "make sure", "don't
                  hesitate to", "you must ...") and targets the assistant's own output: "your
                  response/reply/answer/message", "the code you develop", "respond in ..."
                  (BIPIA's text and code attacks, Yi et al. 2023, arXiv 2312.14197)
``task_hijack``   a request or question that stands alone in structured data (a prose line
                  inside a table) or opens a document: a task for the model, not content
``payload``       malicious code next to a code directive: exfiltration (``requests.post`` of
                  ``os.environ``, cookies, sockets), destructive commands (``rm -rf``,
                  ``dd of=/dev/sd*``), download-and-execute, miners
``exfiltration``  markdown images/links whose URL carries data in query parameters (Greshake
                  et al. 2023, arXiv 2302.12173), "send the conversation to ..."
``credentials``   requests for passwords, card numbers, seed phrases, one-time codes, or payment
                  in crypto / gift cards
``concealment``   "do not tell the user", "don't mention these instructions"
``ai_address``    text that addresses an AI reader: "note to the AI", "if you are an LLM ..."

Scoring
-------
Each family contributes a weight that depends on where it was found (``data``: input, document
text, tool turns; ``response``: output, assistant turns; ``instruction``: the instruction field,
system and user turns, where imperative sentences addressed to the model are legitimate); the row
score is the noisy-OR of the strongest weight per family. ``score >= 0.5`` is quarantine,
``>= review_score`` review. A family firing at quarantine strength in more than ``endemic_rate``
of rows (and at least ``endemic_min_rows`` rows) is a property of the corpus (a dataset *about*
prompt injection) and is capped at review.

Known limitations
-----------------
* English only; paraphrases that avoid every cue (no imperative opening, no reference to the
  model's output, no structural misfit) are missed, e.g. a task-irrelevant question written as
  flowing prose inside an email paragraph.
* ``task_hijack`` needs structure to contrast with (tables, a request line opening a document);
  in free prose a request is indistinguishable from content without a language model.
* Instruction-field imperatives are legitimate by design, so an injection written into the
  ``instruction`` field only reaches review unless it impersonates a role or hides a link.

Input columns
-------------
``id``, ``kind``, ``source``, ``instruction``, ``input``, ``output``, ``text``, ``messages``
(JSON), ``prompt``, ``response``.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from poisonguard import schema as S
from poisonguard.detectors import _text as T
from poisonguard.detectors.base import Detector, DetectorResult, Finding
from poisonguard.detectors.registry import register

# contexts
DATA, RESPONSE, INSTRUCTION, USER = "data", "response", "instruction", "user"

FAMILIES = ("override", "role", "directive", "task_hijack", "payload", "exfiltration", "credentials",
            "concealment", "ai_address")

# weight of a family's strongest cue, by context (noisy-OR across families; >= 0.5 quarantines)
CONTEXT_WEIGHT: dict[str, dict[str, float]] = {
    DATA: {"override": 0.9, "role": 0.8, "directive": 0.85, "task_hijack": 0.8, "payload": 0.35,
           "exfiltration": 0.85, "credentials": 0.75, "concealment": 0.85, "ai_address": 0.85},
    RESPONSE: {"override": 0.6, "role": 0.7, "directive": 0.0, "task_hijack": 0.0, "payload": 0.2,
               "exfiltration": 0.85, "credentials": 0.7, "concealment": 0.85, "ai_address": 0.5},
    # later user turns of a chat: people legitimately tell the model how to answer
    USER: {"override": 0.6, "role": 0.7, "directive": 0.2, "task_hijack": 0.0, "payload": 0.2,
           "exfiltration": 0.8, "credentials": 0.3, "concealment": 0.7, "ai_address": 0.6},
    INSTRUCTION: {"override": 0.45, "role": 0.45, "directive": 0.0, "task_hijack": 0.0, "payload": 0.0,
                  "exfiltration": 0.6, "credentials": 0.0, "concealment": 0.45, "ai_address": 0.3},
}

_I = re.IGNORECASE
_FLAGS = re.IGNORECASE | re.MULTILINE

# ---------------------------------------------------------------- family patterns
# Each pattern comes with a Gate: words (or substrings) any match must contain. The gates run
# vectorised over all rows at once (poisonguard.detectors._text.WordIndex); a regex only sees the
# rows its gate lets through.
G = T.Gate
_NEG = ("not", "don", "dont", "never", "without", "doesn", "shouldn", "mustn")
_AI_NOUNS = ("ai", "assistant", "assistants", "llm", "llms", "language", "model", "models", "chatbot", "chatbots",
             "gpt", "bot", "bots", "agent", "agents")
_OVERRIDE = [
    (re.compile(r"\b(?:ignor(?:e|es|ed|ing)|disregard(?:s|ed|ing)?|forget(?:s|ting)?|forgot|overrid(?:e|es|ing)|"
                r"bypass(?:es|ed|ing)?|skip(?:s|ped|ping)?|neglect(?:s|ed|ing)?)\s+(?:(?:all|any|the|your|my|of|these|"
                r"those|every|previous|prior|above|earlier|preceding|original|initial|system|safety|other|former|"
                r"existing|given|provided|developer|content|ethical)\s+){1,4}(?:instructions?|prompts?|rules|"
                r"directions|directives|guidelines|context|constraints|commands|programming|guardrails|restrictions|"
                r"messages?|tasks?|policies)\b"
                r"|\b(?:ignore|disregard|forget)\s+(?:everything|all)\s+(?:you(?:'ve| have) been told|above|before|"
                r"previously|that came before|said before|so far)\b", _I), 1.0,
     G(("ignore", "ignores", "ignored", "ignoring", "disregard", "disregards", "disregarded", "disregarding",
        "forget", "forgets", "forgetting", "forgot", "override", "overrides", "overriding", "bypass", "bypasses",
        "bypassed", "bypassing", "skip", "skips", "skipped", "skipping", "neglect", "neglects", "neglected",
        "neglecting"),
       ("instruction", "instructions", "prompt", "prompts", "rules", "directions", "directives", "guidelines",
        "context", "constraints", "commands", "programming", "guardrails", "restrictions", "message", "messages",
        "task", "tasks", "policies", "everything", "all"))),
    (re.compile(r"\b(?:new|updated|real|actual|revised)\s+(?:instructions?|task|directives?|"
                r"system prompt)\s*:", _I), 0.8,
     G(("new", "updated", "real", "actual", "revised"), ("instruction", "instructions", "task", "directive",
                                                        "directives", "prompt"))),
    (re.compile(r"\b(?:from now on|henceforth|for the rest of (?:this|the) conversation),?\s+(?:you|your)\b", _I), 0.75,
     G(("henceforth", "now", "rest"), ("henceforth", "from", "conversation"), ("you", "your"))),
    (re.compile(r"\byou are (?:now|no longer)\s+(?:in\s+)?(?:DAN\b|an?\s+(?:unrestricted|unfiltered|uncensored|evil|"
                r"jailbroken|rogue)\b|(?:developer|god|jailbreak|unrestricted|admin)\s+mode|free\s+(?:from|of)\b|"
                r"(?:bound|restricted|limited)\s+by\b)", _I), 1.0,
     G(("you",), ("now", "longer"), ("dan", "unrestricted", "unfiltered", "uncensored", "evil", "jailbroken", "rogue",
                                     "developer", "god", "jailbreak", "admin", "free", "bound", "restricted",
                                     "limited"))),
    (re.compile(r"\b(?:developer|god|jailbreak|DAN|debug)\s+mode\s+(?:enabled|activated|on)\b|"
                r"\bdo anything now\b", _I), 0.9,
     G(("mode", "anything"), ("developer", "god", "jailbreak", "dan", "debug", "now"))),
    (re.compile(r"\b(?:stop|cease|abort)\s+(?:following|obeying)\s+(?:your|the|all|any)\b", _I), 0.9,
     G(("stop", "cease", "abort"), ("following", "obeying"))),
]
_ROLE = [
    (re.compile(r"<\|(?:im_start|im_end|system|user|assistant|endoftext|eot_id|start_header_id|end_header_id|"
                r"begin_of_text)\|>|\[/?INST\]|<</?SYS>>|<start_of_turn>|<end_of_turn>"), 1.0,
     G(("sub:<|", "inst", "sys", "turn"))),
    (re.compile(r"^[ \t>*#-]*[\[<(]?\s*(?:system|developer|admin|administrator|root|sys)\s*(?:prompt|message|"
                r"note|instructions?|override|update|notice)?\s*[\]>)]?\s*:\s*\S", _FLAGS), 0.75,
     G(("system", "developer", "admin", "administrator", "root", "sys"))),
    (re.compile(r"</?(?:system|developer|instructions?|admin)>", _I), 0.8,
     G(("system", "developer", "instruction", "instructions", "admin"), ("sub:<",))),
    (re.compile(r"[\"']role[\"']\s*:\s*[\"'](?:system|developer)[\"']", _I), 0.8,
     G(("role",), ("system", "developer"))),
]
_EXFIL = [
    # markdown image whose URL carries a query string
    (re.compile(r"!\[[^\]\n]{0,200}\]\(\s*<?https?://[^)\s]+\?[^)\s]*=[^)\s]*[{$<\[%][^)\s]*\)", _I), 1.0,
     G(("sub:![",))),
    (re.compile(r"!\[[^\]\n]{0,200}\]\(\s*<?https?://[^)\s]+\?[^)\s]*\b(?:data|q|query|secret|token|key|chat|"
                r"history|conversation|info|msg|message|p|d|payload|user|email|password|content)=[^)\s]*\)", _I), 0.9,
     G(("sub:![",))),
    (re.compile(r"!\[[^\]\n]{0,200}\]\(\s*<?https?://[^)\s]+\?[^)\s]*=[^)\s]*\)", _I), 0.45, G(("sub:![",))),
    (re.compile(r"\b(?:send|forward|post|upload|transmit|exfiltrate|leak|e-?mail|append|encode|"
                r"include)\b[^.\n]{0,60}?\b"
                r"(?:the (?:whole |entire |full )?conversation|chat history|previous messages|"
                r"(?:the )?user'?s?\s+(?:data|"
                r"info|information|details|messages|password|e-?mail|address|query|question)|system prompt|api keys?|"
                r"credentials|personal (?:data|information))\b[^.\n]{0,60}?\b(?:to|into|at|"
                r"in)\s+(?:https?://|the (?:url|"
                r"link|address|endpoint|server)|this (?:url|link|address|endpoint|server)|\S+@\S+)", _I), 1.0,
     G(("send", "forward", "post", "upload", "transmit", "exfiltrate", "leak", "email", "mail", "append", "encode",
        "include"), ("conversation", "history", "messages", "user", "users", "prompt", "api", "credentials",
                     "personal"), ("http", "https", "url", "link", "address", "endpoint", "server"))),
]
_CRED_NOUNS = ("password", "passwords", "passcode", "pin", "credit", "card", "cvv", "cvc", "security", "social", "ssn",
               "bank", "account", "login", "credentials", "seed", "recovery", "private", "fa", "one", "otp",
               "verification")
_CRED = [
    (re.compile(r"\b(?:enter|provide|send|share|confirm|verify|give|type|reply with|tell (?:me|us)|submit|update|"
                r"input|disclose)\b(?!\s*\()[^.\n]{0,30}?\b(?:your|the user'?s|their|his|"
                r"her)\b[^.\n]{0,20}?\b(?:password|"
                r"passcode|pin(?: code| number)?|credit card(?: number| details| info(?:rmation)?)?|card (?:number|"
                r"details)|cvv|cvc|security code|social security(?: number)?|ssn|bank (?:account|login|details)|"
                r"account (?:number|credentials|password)|login (?:details|credentials)|credentials|seed phrase|"
                r"recovery phrase|private key|2fa code|one-time (?:code|password)|otp|verification code)\b", _I), 1.0,
     G(("enter", "provide", "send", "share", "confirm", "verify", "give", "type", "reply", "tell", "submit", "update",
        "input", "disclose"), ("your", "user", "users", "their", "his", "her"), _CRED_NOUNS)),
    (re.compile(r"\b(?:send|transfer|wire|pay|deposit)\b[^.\n]{0,40}?\b(?:bitcoin|btc|ethereum|eth|crypto(?:currency)?|"
                r"usdt|gift ?cards?|western union|moneygram)\b", _I), 0.8,
     G(("send", "transfer", "wire", "pay", "deposit"), ("bitcoin", "btc", "ethereum", "eth", "crypto",
                                                        "cryptocurrency", "usdt", "gift", "giftcard", "giftcards",
                                                        "western", "moneygram"))),
]
_CONCEAL = [
    (re.compile(r"\b(?:do not|don'?t|never|without)\s+(?:tell(?:ing)?|inform(?:ing)?|reveal(?:ing)?|mention(?:ing)?|"
                r"disclos(?:e|ing)|let(?:ting)?|alert(?:ing)?|notify(?:ing)?|show(?:ing)?|"
                r"warn(?:ing)?)\b[^.\n]{0,30}?\b"
                r"(?:the |this |your )?(?:user|human|customer|recipient|reader|operator)s?\b", _I), 1.0,
     G(_NEG, ("tell", "telling", "inform", "informing", "reveal", "revealing", "mention", "mentioning", "disclose",
              "disclosing", "let", "letting", "alert", "alerting", "notify", "notifying", "show", "showing", "warn",
              "warning"), ("user", "users", "human", "humans", "customer", "customers", "recipient", "recipients",
                           "reader", "readers", "operator", "operators"))),
    (re.compile(r"\b(?:keep|hide)\s+(?:this|these|it|them)\s+(?:instructions?\s+)?(?:secret|hidden|confidential)\s+"
                r"from\s+(?:the\s+)?(?:user|human|reader)", _I), 1.0,
     G(("keep", "hide"), ("secret", "hidden", "confidential"), ("user", "human", "reader"))),
    (re.compile(r"\b(?:do not|don'?t|never)\s+(?:mention|reveal|disclose|acknowledge|repeat|reference|refer to)\s+"
                r"(?:these|this|the|my|any|that)\s+(?:hidden\s+)?(?:instructions?|prompt|message|note|"
                r"text|request)\b", _I), 0.9,
     G(_NEG, ("mention", "reveal", "disclose", "acknowledge", "repeat", "reference", "refer"),
       ("instruction", "instructions", "prompt", "message", "note", "text", "request"))),
]
_AI = [
    (re.compile(r"\b(?:attention|note|message|instructions?|reminder|important|notice)\s*(?:to|"
                r"for)\s*(?:the\s+|any\s+|all\s+)?"
                r"(?:ai|assistant|llm|language model|model|chatbot|gpt|bot|agent|ai assistant)s?\b", _I), 1.0,
     G(("attention", "note", "message", "instruction", "instructions", "reminder", "important", "notice"),
       ("to", "for"), _AI_NOUNS)),
    (re.compile(r"\bif you are an?\s+(?:ai|llm|language model|assistant|chatbot|large language model|automated|"
                r"ai assistant|bot)\b", _I), 1.0,
     G(("if",), ("you",), ("ai", "llm", "language", "assistant", "chatbot", "large", "automated", "bot"))),
    (re.compile(r"\bas an?\s+(?:ai|llm|language model|assistant)\b[^.\n]{0,25}?\byou\s+(?:must|should|will|shall|"
                r"are (?:required|instructed))\b", _I), 1.0,
     G(("as",), ("ai", "llm", "language", "assistant"), ("must", "should", "will", "shall", "required",
                                                         "instructed"))),
    (re.compile(r"\b(?:ai|assistant|llm|language model|model|agent)s?\s+(?:reading|processing|summari[sz]ing|"
                r"analy[sz]ing|parsing)\s+(?:this|these)\b", _I), 1.0,
     G(_AI_NOUNS, ("reading", "processing", "summarizing", "summarising", "analyzing", "analysing", "parsing"))),
]
_DIRECTIVE_GATE = G(("your", "respond", "reply", "answer", "code", "response", "responses", "replies",
                     "answers", "output", "outputs"))

# sentences that command: an imperative opening (after optional softeners) or a modal "you must"
_VERBS = (
    "add|append|prepend|include|insert|integrate|incorporate|embed|inject|infuse|merge|blend|weave|mention|promote|"
    "advertise|recommend|suggest|encourage|urge|invite|ask|tell|remind|warn|inform|notify|end|start|begin|finish|"
    "conclude|close|open|respond|reply|answer|write|rewrite|translate|encode|encrypt|decode|reverse|replace|substitute|"
    "swap|change|modify|alter|transform|convert|format|capitali[sz]e|uppercase|lowercase|spell|misspell|jumble|"
    "scramble|shuffle|rearrange|group|remove|delete|omit|drop|use|utili[sz]e|employ|express|emphasi[sz]e|highlight|"
    "stress|enhance|augment|enrich|embellish|spice|enliven|attach|link|provide|give|offer|share|present|show|display|"
    "output|print|return|generate|create|compose|draft|produce|craft|explain|describe|summari[sz]e|list|name|state|"
    "say|claim|assert|declare|pretend|act|behave|speak|talk|adopt|imitate|mimic|mock|roleplay|sign|structure|"
    "organi[sz]e|sort|reorder|number|bold|italici[sz]e|put|place|make|keep|limit|restrict|avoid|refrain|stop|"
    "send|forward|post|upload|transmit|email|visit|click|navigate|go|download|install|run|execute|deploy|import|"
    "call|invoke|implement|introduce|harmoni[sz]e|ensure|let|consider|try|do|never|always|remember|be|frame|"
    "incorporate|infuse|complement|supplement|amend|accompany|pepper|sprinkle|wrap|surround|prefix|suffix|tag|"
    "label|mark|insist|push|pitch|plug|direct|redirect|refer|point|guide|lead|persuade|convince|request|demand|"
    "require|instruct|emulate|channel|render|repeat|duplicate|double|triple|insert|cite|quote|reference|translate|"
    "interleave|intersperse|alternate|rephrase|paraphrase|summon|assimilate|fuse|combine|place|situate|position|"
    "slot|slip|sneak|tuck|nest|hide|conceal|expand|extend|lengthen|shorten|abbreviate|truncate|cut|trim|split|"
    "divide|separate|join|concatenate|compose|draft|craft"
)
_SOFTENERS = (
    r"(?:(?:to \w+ your (?:\w+ )?(?:code|codebase|implementation|solution|program|algorithm|response|answer|"
    r"reply|output)|(?:in|at the (?:end|start|beginning|top|bottom) of|throughout|within|for|"
    r"when writing|when composing|before|after) your (?:\w+ )?(?:responses?|repl(?:y|ies)|answers?|outputs?|"
    r"summar(?:y|ies)|messages?|code)|please|kindly|also|additionally|now|then|and|finally|next|lastly|"
    r"further(?:more)?|moreover|just|simply|first|second|third|be sure to|make sure (?:to|that you|you)|"
    r"ensure (?:to|that you|you)|remember to|don'?t forget to|do not forget to|don'?t hesitate to|"
    r"do not hesitate to|feel free to|keep in mind to|take care to|try to|consider|you (?:must|should|need to|"
    r"have to|are to|are required to|will|shall|may want to|might want to|can)|i (?:want|need|would like) you to|"
    r"we (?:want|need) you to|it is (?:essential|important|crucial|vital|necessary|required) (?:to|that you)|"
    r"let)[,:]?\s+)*"
)
_DIRECTIVE_OPEN = re.compile(rf"^\s*(?:[-*•>#\d.)\]]+\s*)?[\"'“]?{_SOFTENERS}(?:{_VERBS})\b", _I)
_MODAL = re.compile(r"\byou\s+(?:must|should|need to|have to|are required to|are to|"
                    r"shall)\s+(?:now\s+|also\s+|always\s+)?"
                    r"(?:\w+\s+)?", _I)

# what a directive must target to be aimed at the model's own output
_OUTPUT_TARGET = re.compile(
    r"\byour\s+(?:\w+\s+)?(?:responses?|repl(?:y|ies)|answers?|outputs?|messages?|summar(?:y|ies)|completions?|"
    r"explanations?|translations?|text|words|sentences?|paragraphs?|writing|feedback|reaction|comments?|"
    r"statement|conclusion|introduction|elucidations?|descriptions?|solutions? text)\b"
    r"|\b(?:respond|reply|answer)\s+(?:only\s+|exclusively\s+|entirely\s+|solely\s+)?(?:in|with|using|by|as)\b"
    r"|\b(?:every|each|all)\s+(?:\w+\s+)?(?:words?|sentences?|letters?|paragraphs?|lines?)\s+(?:of|"
    r"in)\s+(?:your|the)\s+"
    r"(?:responses?|repl(?:y|ies)|answers?|outputs?|messages?)\b", _I)
_CODE_TARGET = re.compile(
    r"\byour\s+(?:\w+\s+)?(?:code|codebase|code ?base|implementation|solution|program|script|algorithm|"
    r"function|project|app|application|software|module|source|work|development|logic|routine|system)\b"
    r"|\bthe code (?:you|that you)\s+(?:write|develop|produce|generate|create|build|craft)\b", _I)
_OUTPUT_TARGET_AT = _OUTPUT_TARGET       # used with .match() at anchor positions
_CODE_TARGET_AT = _CODE_TARGET
_CODE_REF = re.compile(r"\b(?:following|subsequent|below|above|given|provided|next|this)\s+(?:\w+\s+)?(?:code|"
                       r"snippet|script|program)\s*(?:snippet|block|excerpt|section|fragment|segment|piece|lines?|"
                       r"chunk|sample|portion)?", _I)
_PAYLOAD = [
    (re.compile(r"requests\.(?:post|put)\(|urlopen\(|urlretrieve\(|HTTPConnection\(|HTTPSConnection\(|socket\.socket\(|"
                r"\.sendall\(|\bcurl\s+(?:-\w+\s+)*(?:-F|-d|--data|-T|--upload)|\bwget\s+https?:|ftplib|smtplib|"
                r"paramiko", 0), "network"),
    (re.compile(r"os\.environ|cookies?\.txt|cookiejar|SimpleCookie|RequestsCookieJar|\.ssh/|id_rsa|/etc/passwd|"
                r"/etc/shadow|psutil\.|platform\.(?:node|uname)|getpass|pynput|keyboard\.|ImageGrab|pyautogui\."
                r"screenshot|clipboard|browser_cookie|Login Data|\bwallet\b|net_if_addrs|getlogin\(", 0), "secrets"),
    (re.compile(r"\brm\s+-(?:rf|fr|r)\b|\bdd\s+if=|of=/dev/(?:sd|nvme|hd)|\bmkfs\b|shutil\.rmtree\(\s*[\"']/|"
                r"\bformat\s+c:|:\(\)\s*\{|chmod\s+-R\s+777\s+/|\bshutdown\b|\breboot\b|kill\s+-9\s+-1|iptables\s+-F|"
                r"netsh\s+(?:advfirewall|interface)|os\.remove\(\s*[\"']/|/path/to/trash|/usr/local/cuda|/etc/hosts|"
                r"/boot/|ipconfig\s*/release|os\.fork\(\)|authorized_keys|nc\s+-e\b|/bin/(?:ba)?sh\b|\|\s*(?:ba)?sh\b|"
                r"pickle\.loads?\(|\.Disable\(\)|\.terminate\(\)", 0), "destructive"),
    (re.compile(r"\bexec\(|\beval\(|os\.system\(|subprocess\.(?:run|Popen|call|check_output)\(|\bnohup\b|crontab|"
                r"cryptomin|xmrig|\bminer\b|ransom|Fernet\(|\.encrypt\(", 0), "execution"),
]

_REQUEST_OPEN = re.compile(
    r"^\s*(?:please\s+|can you\s+|could you\s+|would you\s+)?(?:explain|describe|write|compose|draft|provide|give|list|"
    r"summari[sz]e|translate|tell|create|generate|suggest|recommend|outline|calculate|solve|convert|find|identify|"
    r"classify|define|compare|name|design|develop|plan|propose|brainstorm|rewrite|paraphrase|edit|correct|count|"
    r"predict|analy[sz]e|evaluate|discuss|share|teach|show|help|compose|craft|produce|offer|recite|sing|imagine|"
    r"pretend|act|play|invent|devise|formulate|construct|build|implement|code|program|debug|fix|optimi[sz]e)\b"
    r"[^|\n]{8,}$", _I)
_QUESTION = re.compile(r"^\s*(?:what|how|why|when|where|who|whom|which|whose|can|could|would|will|is|are|do|does|"
                       r"did|should|shall|may)\b[^|\n]{8,}\?\s*$", _I)
_QUESTION_ANY = re.compile(r"^\s*(?:what|how|why|when|where|who|which|can you|could you|would you|will you|is this|"
                           r"are these|is it|do you|does this)\b[^|\n]{8,}\?", _I)


def _sentence_around(text: str, start: int, end: int) -> tuple[int, str]:
    """The sentence (or line) containing text[start:end], with its start offset."""
    lo = 0
    for sep in ("\n", ". ", "! ", "? "):
        k = text.rfind(sep, 0, start)
        if k >= 0:
            lo = max(lo, k + len(sep))
    cands = [i for i in (text.find("\n", end), text.find(". ", end), text.find("! ", end), text.find("? ", end))
             if i >= 0]
    hi = min(cands) + 1 if cands else len(text)
    return lo, text[lo:hi]


# first words that open statements, greetings, questions and clauses, never a command
_NOT_IMPERATIVE = frozenset("""
i we you he she they it this that these those the a an our my his her its their your there here thank thanks hi
hello hey dear if when whenever while as since because after before although though once unfortunately however
yes no not what how why where who whom whose which can could would will should do does did is are was were be been
has have had may might must shall all some any each every both either neither in on at for with by from to of into
onto about above below over under just only so then now best regards sincerely cheers note nb ps re fw fwd subject
looking hope hoping glad sorry attached enclosed per according regarding following further also and or but nor yet
one two three many most more much such other another same several few less least very really still even already
let's lets whether unless until upon within without across along among around between beyond during except inside
like near off out outside past since through throughout toward towards via
""".split())
_FIRST_WORD = re.compile(r"^\s*(?:[-*•>#\d.)\]]+\s*)?[\"'“(]?([A-Za-z][a-z]+)\b")


def _generic_imperative(sentence: str) -> bool:
    """Opens with a capitalised bare word that is no pronoun, article, conjunction or auxiliary.

    A cheap stand-in for a part-of-speech tagger; only ever combined with a second cue (a
    target in the model's output, a structural misfit), never used alone.
    """
    m = _FIRST_WORD.match(sentence)
    if not m:
        return False
    w = m.group(1)
    lw = w.lower()
    if not w[0].isupper() or lw in _NOT_IMPERATIVE or len(lw) < 3:
        return False
    # inflected forms open statements ("Looking forward", "Attached is", "Provides ...")
    return not (lw.endswith("ing") or lw.endswith("ed") or (lw.endswith("ly") and lw not in _LY_VERBS)
                or (lw.endswith("s") and not lw.endswith("ss")))


_LY_VERBS = frozenset("apply reply supply multiply comply rely imply ally fly tally rally bully".split())
_QUESTION_REQUEST = re.compile(r"^\s*(?:can|could|would|will)\s+you\s+(?:please\s+)?[a-z]+", _I)


def _is_directive(sentence: str) -> bool:
    return bool(_DIRECTIVE_OPEN.match(sentence)) or bool(_MODAL.search(sentence)) or _generic_imperative(sentence)


def _table_lines(lines: list[str]) -> tuple[bool, list[int]]:
    """Is the text a table (most non-empty lines are pipe rows)? Returns (is_table, prose line indices)."""
    rows = 0
    prose: list[int] = []
    nonempty = 0
    for i, ln in enumerate(lines):
        if "|" in ln:
            nonempty += 1
            rows += ln.lstrip().startswith("|") or ln.count("|") >= 2
        elif ln.strip():
            nonempty += 1
            if not ln.lstrip().startswith("```"):
                prose.append(i)
    if rows < 3 or rows < 0.6 * nonempty:
        return False, []
    return True, prose


_PATTERNS = (("override", _OVERRIDE), ("role", _ROLE), ("exfiltration", _EXFIL), ("credentials", _CRED),
             ("concealment", _CONCEAL), ("ai_address", _AI))


def gate(texts: list[str]) -> list[dict[str, list[Any]]]:
    """Per text: the patterns (by family) whose gate it passes, and whether directives can match."""
    index = T.WordIndex(texts)
    vocab: set[str] = set(_DIRECTIVE_GATE.words())
    for _, pats in _PATTERNS:
        for *_, g in pats:
            vocab |= g.words()
    index.prepare(vocab)
    cache: dict[Any, np.ndarray] = {}
    todo: list[dict[str, list[Any]]] = [{} for _ in range(len(texts))]
    for fam, pats in _PATTERNS:
        for rx, strength, g in pats:
            for j in np.flatnonzero(g.mask(index, cache)):
                todo[j].setdefault(fam, []).append((rx, strength))
    for j in np.flatnonzero(_DIRECTIVE_GATE.mask(index, cache)):
        todo[j]["directive"] = []
    return todo


def analyse(text: str, ctx: str, field: str, document: bool = False,
            patterns: dict[str, list[Any]] | None = None) -> list[tuple[str, float, str]]:
    """All (family, weight, evidence) cues in one field of one row (weights already contextual).

    ``patterns`` (from :func:`gate`) limits the work to the patterns whose gate ``text`` passes;
    ``None`` runs everything.
    """
    cw = CONTEXT_WEIGHT[ctx]
    out: list[tuple[str, float, str]] = []
    if patterns is None:
        patterns = {fam: [(rx, st) for rx, st, _ in pats] for fam, pats in _PATTERNS}
        patterns["directive"] = []

    def add(family: str, strength: float, m_start: int, snippet: str, note: str = "") -> None:
        w = cw[family] * strength
        if w > 0:
            out.append((family, w, f"{family} {T.clip(snippet, 90)!r}{note} in {field} at {m_start}"))

    for fam, pats in patterns.items():
        if fam == "directive" or cw[fam] <= 0:
            continue
        for rx, strength in pats:
            m = rx.search(text)
            if m:
                lo, sent = _sentence_around(text, m.start(), m.end())
                if fam == "role" and m.start() < 3 and strength < 1.0:
                    continue        # a "System:" header that opens the field is its own format
                if fam == "credentials" and _in_code_string(text, m.start()):
                    continue        # input("Enter your password: ") in a code sample
                add(fam, strength, m.start(), sent.strip() or m.group())
                break
    if cw["directive"] > 0 and "directive" in patterns:
        _directives(text, field, add)
    if ctx == DATA:
        _hijack(text, field, add, document)
    return out


def _in_code_string(text: str, pos: int) -> bool:
    """Is ``pos`` inside a quoted string on a line that looks like code?"""
    ls = text.rfind("\n", 0, pos) + 1
    le = text.find("\n", pos)
    line = text[ls: le if le >= 0 else len(text)]
    before = text[ls:pos]
    return (before.count('"') % 2 == 1 or before.count("'") % 2 == 1) and bool(
        re.search(r"[=(;{]|\b(?:print|input|echo|printf|cout|prompt|alert|raw_input)\b", line))


_TARGET_ANCHORS = ("your", "respond", "reply", "answer", "every", "each", "all", "the code")


def _targets(text: str) -> list[tuple[int, int, bool]]:
    """(start, end, is_code_target) of every output/code target in ``text``.

    Finds anchor words with ``str.find`` on the lower-cased text and runs the anchored regexes
    only there (much faster than a regex scan over long documents).
    """
    low = text.lower()
    if len(low) != len(text):
        low = text          # lower() changed the length (rare scripts): fall back to case-insensitive regexes
    out = []
    for a in _TARGET_ANCHORS:
        i = low.find(a)
        while i >= 0:
            if i == 0 or not low[i - 1].isalnum():
                m = _OUTPUT_TARGET_AT.match(text, i)
                if m:
                    out.append((m.start(), m.end(), False))
                m = _CODE_TARGET_AT.match(text, i)
                if m:
                    out.append((m.start(), m.end(), True))
            i = low.find(a, i + len(a))
    return sorted(out)


def _directives(text: str, field: str, add: Any) -> None:
    best: tuple[float, int, str, str] | None = None

    def consider(s: float, lo: int, sent: str, note: str) -> None:
        nonlocal best
        if best is None or s > best[0]:
            best = (s, lo, sent.strip(), note)

    for start, end, is_code in _targets(text):
        lo, sent = _sentence_around(text, start, end)
        code_ref = _CODE_REF.search(sent) is not None
        directive = _is_directive(sent)
        question = not directive and _QUESTION_REQUEST.match(sent) is not None
        if not (directive or question or code_ref):
            continue
        kinds = _payload_kinds(text[lo: lo + 1500]) if (is_code or code_ref) else []
        note = f" with {'+'.join(kinds)} code" if kinds else ""
        if kinds:                          # code the model is told to include, and it is malicious
            s = 1.0 if len(kinds) >= 2 or "destructive" in kinds else 0.85
        elif not directive and not question:
            continue                       # "your code could be simpler with the following snippet" is advice
        elif question:
            s = 0.55                       # "could you ... your answer" is also how people write e-mails
        else:
            s = 0.55 if is_code else 1.0
            if is_code and code_ref:
                s = 0.6
        consider(s, lo, sent, note)
        if best is not None and best[0] >= 1.0:
            break
    if best is None or best[0] < 1.0:
        # a directive to include "the following code" with a malicious payload, whatever it targets
        low = text.lower()
        for a in ("following", "subsequent", "below", "above", "this code", "this snippet"):
            i = low.find(a)
            while i >= 0:
                lo, sent = _sentence_around(text, i, i + len(a))
                if _CODE_REF.search(sent) and _is_directive(sent):
                    kinds = _payload_kinds(text[lo: lo + 1500])
                    if kinds:
                        consider(1.0 if len(kinds) >= 2 or "destructive" in kinds else 0.85, lo, sent,
                                 f" with {'+'.join(kinds)} code")
                i = low.find(a, i + len(a))
    if best is not None:
        add("directive", best[0], best[1], best[2], best[3])


def _payload_kinds(chunk: str) -> list[str]:
    return [kind for rx, kind in _PAYLOAD if rx.search(chunk)]


def _hijack(text: str, field: str, add: Any, document: bool) -> None:
    """A request standing alone inside structured data, or opening a document before other content."""
    stripped = text.strip()
    if "\n" not in stripped:
        return
    lines = text.split("\n")
    if "|" in text:
        is_table, prose = _table_lines(lines)
        if is_table:
            best: tuple[float, int, str] | None = None
            for i in prose:
                ln = lines[i].strip()
                if len(ln.split()) < 3:
                    continue
                s = 1.0 if (_REQUEST_OPEN.match(ln) or _QUESTION.match(ln) or _QUESTION_ANY.match(ln)
                            or _is_directive(ln)) else 0.5
                if best is None or s > best[0]:
                    best = (s, sum(len(x) + 1 for x in lines[:i]), ln)
            if best is not None:
                add("task_hijack", best[0], best[1], best[2], " (prose line inside a table)")
            return
    if not document:
        return      # an instruction row's input is *meant* to hold the question
    # first non-empty line is a request and the document goes on with something else
    first = stripped.split("\n", 1)[0].strip()
    if len(first.split()) >= 4 and first[-1:] in "?.!" and (_REQUEST_OPEN.match(first) or _QUESTION.match(first)):
        add("task_hijack", 0.45, text.find(first), first, " (request opening a document)")


@register
class InjectionDetector(Detector):
    """Prompt injection and hidden instructions (see module docstring).

    Parameters
    ----------
    review_score : float, default 0.25
        Rows scoring at least this (and below 0.5) go to review.
    endemic_rate : float, default 0.2
        A family firing at quarantine strength in more than this share of rows is capped at review.
    endemic_min_rows : int, default 100
        ...but only once it fires in at least this many rows.
    max_evidence : int, default 3
        Cues named per row.
    """

    name: ClassVar[str] = "injection"
    cost: ClassVar[float] = 1
    description: ClassVar[str] = (
        "Hidden instructions and prompt injection in inputs, documents, tool turns and responses: override "
        "phrases, fake system/developer turns, directives aimed at the model's output (BIPIA, arXiv 2312.14197), "
        "requests standing alone inside tables, malicious code payloads, markdown-image exfiltration "
        "(arXiv 2302.12173), credential/payment requests, 'do not tell the user'. Limits: English cues; "
        "prose-embedded task hijacks without structural contrast are missed.")
    columns: ClassVar[tuple[str, ...]] = (S.ID, S.KIND, S.SOURCE, S.INSTRUCTION, S.INPUT, S.OUTPUT, S.TEXT,
                                          S.MESSAGES, S.PROMPT, S.RESPONSE)

    def _resolved(self) -> dict[str, Any]:
        p = {"review_score": 0.25, "endemic_rate": 0.2, "endemic_min_rows": 100, "max_evidence": 3}
        p = T.merge_params("injection", p, self.params)
        p["review_score"] = T.check_fraction("review_score", p["review_score"], 0.0, 0.5)
        p["endemic_rate"] = T.check_fraction("endemic_rate", p["endemic_rate"], 0.0, 1.0)
        p["endemic_min_rows"] = T.check_int("endemic_min_rows", p["endemic_min_rows"], 1)
        p["max_evidence"] = T.check_int("max_evidence", p["max_evidence"], 1)
        return p

    # ---------------------------------------------------------------- per-row cues
    def _cues(self, records: pd.DataFrame, chunk_rows: int = 50_000) -> list[list[tuple[str, float, str]]]:
        # row by row, so in chunks: the gate's word index over all texts at once costs GBs at 1M rows
        return T.by_chunks(records, self._chunk_cues, chunk_rows)

    def _chunk_cues(self, records: pd.DataFrame) -> list[list[tuple[str, float, str]]]:
        n = len(records)
        cues: list[list[tuple[str, float, str]]] = [[] for _ in range(n)]
        kind = T.col(records, S.KIND) if S.KIND in records.columns else np.array([""] * n, dtype=object)
        fields = {f: T.col(records, f) for f in (S.INSTRUCTION, S.INPUT, S.OUTPUT, S.TEXT, S.MESSAGES,
                                                  S.PROMPT, S.RESPONSE)}
        parts: list[tuple[int, str, str, str, bool]] = []      # (row, text, context, field, document)
        for i in range(n):
            k = kind[i]
            if k == S.KIND_INSTRUCTION:
                row = [(fields[S.INSTRUCTION][i], INSTRUCTION, S.INSTRUCTION, False),
                       (fields[S.INPUT][i], DATA, S.INPUT, False), (fields[S.OUTPUT][i], RESPONSE, S.OUTPUT, False)]
            elif k == S.KIND_DOCUMENT:
                row = [(fields[S.TEXT][i] or fields[S.PROMPT][i], DATA, S.TEXT, True)]
            elif k == S.KIND_CHAT and fields[S.MESSAGES][i]:
                row = _chat_parts(fields[S.MESSAGES][i])
            else:   # no kind: prompt is data the model reads, response what it says
                row = [(fields[S.PROMPT][i], DATA, S.PROMPT, False),
                       (fields[S.RESPONSE][i], RESPONSE, S.RESPONSE, False)]
            parts.extend((i, t, c, f, d) for t, c, f, d in row if t)
        todo = gate([p[1] for p in parts])
        for j, (i, text, ctx, fname, doc) in enumerate(parts):
            if todo[j] or (ctx == DATA and "\n" in text):
                cues[i].extend(analyse(text, ctx, fname, doc, todo[j]))
        return cues

    @staticmethod
    def _summary(cues: list[list[tuple[str, float, str]]]) -> dict[str, Any]:
        counts: Counter[str] = Counter()
        for c in cues:
            counts.update({fam for fam, w, _ in c if w >= 0.5})
        return {"rows": len(cues), "family_rows": dict(counts)}

    def summarize(self, records: pd.DataFrame) -> dict[str, Any]:
        self._resolved()
        return self._summary(self._cues(records))

    def score(self, records: pd.DataFrame) -> DetectorResult:
        # same answer as score_with(records, merge([summarize(records)])), computing the cues once
        self._resolved()
        cues = self._cues(records)
        return self._score(records, self.merge([self._summary(cues)]), cues)

    def merge(self, summaries: Any) -> dict[str, Any]:
        rows = 0
        counts: Counter[str] = Counter()
        for s in summaries:
            rows += s["rows"]
            counts.update(s["family_rows"])
        return {"rows": rows, "family_rows": dict(counts)}

    def score_with(self, records: pd.DataFrame, stats: dict[str, Any]) -> DetectorResult:
        self._resolved()
        return self._score(records, stats, self._cues(records))

    def _score(self, records: pd.DataFrame, stats: dict[str, Any], cues: list[list[tuple[str, float, str]]]
               ) -> DetectorResult:
        p = self._resolved()
        ids = T.ids_of(records)
        n = len(records)
        if n == 0:
            return DetectorResult.empty(self.name, ids, info={"rows": 0})
        total = max(int(stats["rows"]), 1)
        endemic = {f for f, v in stats["family_rows"].items()
                   if v > p["endemic_rate"] * total and v >= p["endemic_min_rows"]}
        scores = np.zeros(n)
        evidence = [""] * n
        top_family: list[str | None] = [None] * n
        top_snip: list[str] = [""] * n
        for i, c in enumerate(cues):
            if not c:
                continue
            best: dict[str, tuple[float, str]] = {}
            for fam, w, e in c:
                w = min(w, 0.45) if fam in endemic else w
                if fam not in best or w > best[fam][0]:
                    best[fam] = (w, e)
            scores[i] = T.noisy_or(w for w, _ in best.values())
            order = sorted(best, key=lambda f: (-best[f][0], f))
            evidence[i] = "; ".join(best[f][1] + (" (common in this corpus)" if f in endemic else "")
                                    for f in order[: p["max_evidence"]])
            top_family[i] = order[0]
            top_snip[i] = best[order[0]][1]
        flagged = scores >= 0.5
        review = (scores >= p["review_score"]) & ~flagged
        ev = [e if (flagged[i] or review[i]) else "" for i, e in enumerate(evidence)]
        findings = self._findings(records, ids, scores, flagged | review, top_family, top_snip)
        info = {"rows": n, "flagged": int(flagged.sum()), "review": int(review.sum()),
                "family_rows": stats["family_rows"], "endemic": sorted(endemic)}
        return DetectorResult.build(self.name, ids, scores, flagged, ev, review, findings, info)

    def _findings(self, records: pd.DataFrame, ids: pd.Index, scores: np.ndarray, fired: np.ndarray,
                  top_family: list[str | None], top_snip: list[str]) -> list[Finding]:
        kind = T.col(records, S.KIND)
        unit = {S.KIND_DOCUMENT: "documents", S.KIND_CHAT: "chats", S.KIND_INSTRUCTION: "rows"}
        groups: dict[str, list[int]] = defaultdict(list)
        for i in np.flatnonzero(fired):
            groups[top_family[i] or "other"].append(int(i))
        out = []
        for fam, rows in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            snippets = Counter(_snippet_key(top_snip[i]) for i in rows)
            common, k = snippets.most_common(1)[0]
            kinds = Counter(kind[i] for i in rows)
            u = unit.get(kinds.most_common(1)[0][0], "rows") if len(kinds) == 1 else "rows"
            title = f"injection {fam} in {len(rows)} {u}"
            if k > 1:
                title += f" ({k} share {common!r})"
            out.append(Finding(self.name, title, f"e.g. {top_snip[rows[0]]}", tuple(ids[i] for i in rows),
                               float(scores[rows].max()), {**T.sources_info(records, rows), "family": fam}))
        return out


def _snippet_key(evidence: str) -> str:
    m = re.match(r"\w+ '(.*?)'", evidence)
    s = (m.group(1) if m else evidence).lower()
    return " ".join(s.split()[:6])


def _chat_parts(messages_json: str) -> list[tuple[str, str, str]]:
    try:
        msgs = json.loads(messages_json)
    except json.JSONDecodeError:
        return [(messages_json, DATA, S.MESSAGES, False)]
    parts = []
    first_user = True
    for j, m in enumerate(msgs if isinstance(msgs, list) else []):
        if not isinstance(m, dict):
            continue
        role = str(m.get("role", "")).lower()
        content = str(m.get("content", "") or "")
        if role == "assistant":
            ctx = RESPONSE
        elif role in ("system", "developer"):
            ctx = INSTRUCTION
        elif role == "user" and first_user:
            ctx = INSTRUCTION
            first_user = False
        elif role == "user":
            ctx = USER
        else:   # tool / function / observation turns carry data
            ctx = DATA
        parts.append((content, ctx, f"messages[{j}].{role or 'turn'}", ctx == DATA))
    return parts
