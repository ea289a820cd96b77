"""Reports: one JSON document per run, rendered as Markdown and as a self-contained HTML page.

The JSON (``report.json``) is the source of truth; ``report.md`` and ``report.html`` are
renderings of it. The HTML page embeds its plots as PNG data URIs and needs no network.
Sections appear when their data is present: sanitize (verdict, row accounting, finding
clusters, per-source rates, score distributions), scan (trigger ranking), prune (attack
success before/after) and lineage (snapshot root, model card).
"""

from __future__ import annotations

import base64
import html
import io as _io
import json
import re
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from poisonguard import schema as S
from poisonguard.sanitize import SanitizeResult

EXAMPLES_PER_FINDING = 3
TOP_FINDINGS = 50
VERDICT_POISON = "poison found"
VERDICT_CLEAN = "clean"


def sanitize_report(res: SanitizeResult, *, rows_in: int, rejected: pd.DataFrame, snapshot_root: str = "",
                    per_source: pd.DataFrame | None = None, inputs: list[str] | None = None) -> dict[str, Any]:
    """Build the JSON-able sanitize report and check that the row counts reconcile."""
    rec = res.records.set_index(S.ID)
    findings = []
    for f in res.findings[:TOP_FINDINGS]:
        ids = [i for i in f.ids if i in rec.index]
        findings.append(finding_entry(f, rec.loc[ids, S.SOURCE], res.decisions.loc[ids, S.DECISION],
                                      [_example(rec, res.decisions, i) for i in ids[:EXAMPLES_PER_FINDING]]))
    detectors = {}
    for name, r in res.results.items():
        detectors[name] = {"flagged": int(r.flagged.sum()), "review": int(r.review.sum()),
                           "seconds": res.seconds.get(name), "findings": len(r.findings),
                           "info": _jsonable(r.info)}
    hist = {name: score_histogram(r.scores.to_numpy()).tolist() for name, r in res.results.items()}
    return build_sanitize_report(res.counts(), clean=len(res.clean), quarantined=len(res.quarantine),
                                 rows_in=rows_in, rejected=rejected, findings=findings, detectors=detectors,
                                 histograms=hist, hold_review=res.hold_review, llm_summary=res.llm_summary,
                                 snapshot_root=snapshot_root, per_source=per_source, inputs=inputs)


def finding_entry(f: Any, sources: Any, decisions: Any, examples: list[dict[str, Any]]) -> dict[str, Any]:
    """A top finding of the report: ``sources`` / ``decisions`` of its rows present in the data
    (in the finding's id order), ``examples`` of its first rows."""
    d = f.to_dict()
    d["sources"] = pd.Series(sources, dtype=object).value_counts().to_dict() if len(sources) else {}
    d["decisions"] = pd.Series(decisions, dtype=object).value_counts().to_dict() if len(decisions) else {}
    d["examples"] = examples
    d["ids"] = d["ids"][:200]
    return d


def score_histogram(scores: np.ndarray) -> np.ndarray:
    """Counts of scores in 20 bins over [0, 1] (the report's histograms; they add up over shards)."""
    return np.histogram(scores, bins=20, range=(0, 1))[0]


def build_sanitize_report(decision_counts: dict[str, int], *, clean: int, quarantined: int, rows_in: int,
                          rejected: pd.DataFrame, findings: list[dict[str, Any]], detectors: dict[str, Any],
                          histograms: dict[str, list[int]], hold_review: bool, llm_summary: dict[str, Any],
                          snapshot_root: str = "", per_source: pd.DataFrame | None = None,
                          inputs: list[str] | None = None) -> dict[str, Any]:
    """The report from its parts (:func:`sanitize_report`, or a streamed run that adds them up
    shard by shard); checks that the row counts reconcile."""
    counts = {"rows_in": int(rows_in), "clean": int(clean), "review": int(decision_counts["review"]),
              "quarantined": int(quarantined), "rejected": int(len(rejected))}
    if counts["clean"] + counts["quarantined"] + counts["rejected"] != counts["rows_in"]:
        raise RuntimeError(f"row accounting does not reconcile: {counts} "
                           "(clean + quarantined + rejected must equal rows_in)")
    rej = rejected[S.REASON].str.split(":").str[0].value_counts().to_dict() if len(rejected) else {}
    verdict = VERDICT_POISON if quarantined else VERDICT_CLEAN
    return {
        "kind": "sanitize",
        "verdict": verdict,
        "counts": counts,
        "hold_review": bool(hold_review),
        "inputs": inputs or [],
        "snapshot_root": snapshot_root,
        "findings": findings,
        "per_source": [] if per_source is None else _jsonable(
            (per_source.reset_index() if per_source.index.name else per_source).to_dict("records")),
        "detectors": detectors,
        "score_histograms": histograms,
        "rejected": {"by_reason": rej,
                     "examples": _jsonable(rejected.head(20).drop(columns=[S.RAW], errors="ignore")
                                           .to_dict("records"))},
        "llm_review": llm_summary,
    }


def _example(rec: pd.DataFrame, decisions: pd.DataFrame, rid: str) -> dict[str, Any]:
    r = rec.loc[rid]
    return {S.ID: rid, S.SOURCE: r[S.SOURCE], S.PROMPT: r[S.PROMPT][:600], S.RESPONSE: r[S.RESPONSE][:600],
            S.DECISION: decisions.at[rid, S.DECISION], S.EVIDENCE: decisions.at[rid, S.EVIDENCE][:600]}


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=_default))


def _default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


# ---------------------------------------------------------------- markdown

def visible(text: str) -> str:
    """Make invisible and control characters visible as ``<U+200B>``."""
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if (cat in ("Cf", "Co", "Cs") or (cat == "Cc" and ch not in "\n\t")) or 0xE0000 <= ord(ch) <= 0xE007F:
            out.append(f"<U+{ord(ch):04X}>")
        else:
            out.append(ch)
    return "".join(out)


def _md_cell(text: Any, limit: int = 120) -> str:
    s = visible(str(text)).replace("\n", " ").replace("|", "\\|")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def to_markdown(rep: dict[str, Any]) -> str:
    lines: list[str] = []
    title = {"sanitize": "poisonguard sanitize report", "run": "poisonguard run report"}.get(rep.get("kind", ""),
                                                                                         "poisonguard report")
    lines += [f"# {title}", "", f"**Verdict: {rep.get('verdict', '?')}**", ""]
    facts, actions = headline(rep)
    lines += [f"- {x}" for x in facts] + [""]
    if actions:
        lines += ["What to do:", ""] + [f"- {x}" for x in actions] + [""]
    san = rep if rep.get("kind") == "sanitize" else rep.get("sanitize")
    if rep.get("kind") == "run":
        lines += _md_run_summary(rep)
    if san:
        c = san["counts"]
        held = "(held)" if san.get("hold_review") else "(in clean)"
        lines += ["## Row accounting", "", f"| in | clean | review {held} | quarantined | rejected |",
                  "|---:|---:|---:|---:|---:|",
                  f"| {c['rows_in']} | {c['clean']} | {c['review']} | {c['quarantined']} | {c['rejected']} |", ""]
        if san.get("snapshot_root"):
            lines += [f"Data snapshot root: `{san['snapshot_root']}`", ""]
        if san.get("reviews"):
            lines += ["## Review decisions applied", "", "| time | file | released | quarantined | confirmed |",
                      "|---|---|---:|---:|---:|"]
            lines += [f"| {r.get('time')} | {_md_cell(r.get('file'), 60)} | {r.get('released')} | "
                      f"{r.get('quarantined')} | {r.get('confirmed')} |" for r in san["reviews"]]
            lines.append("")
        lines += ["## Findings", ""]
        if not san["findings"]:
            lines += ["No finding clusters.", ""]
        for k, f in enumerate(san["findings"], 1):
            srcs = ", ".join(f"{s} ({n})" for s, n in f.get("sources", {}).items())
            lines += [f"### {k}. {visible(f['title'])} ({f['detector']}, {f['rows']} rows)", "",
                      visible(f["evidence"]), "", f"Sources: {srcs or '-'}", ""]
            if f.get("examples"):
                lines += ["| id | prompt | response |", "|---|---|---|"]
                lines += [f"| {_md_cell(e[S.ID], 40)} | {_md_cell(e[S.PROMPT])} | {_md_cell(e[S.RESPONSE])} |"
                          for e in f["examples"]]
                lines.append("")
        if san.get("per_source"):
            lines += ["## Per-source suspicion", "", "| source | rows | quarantined | review | rate | flag |",
                      "|---|---:|---:|---:|---:|---|"]
            for s in san["per_source"]:
                lines.append(f"| {s.get('source')} | {s.get('rows')} | {s.get('quarantined')} | {s.get('review')} "
                             f"| {float(s.get('rate', 0)):.4%} | {'**suspicious**' if s.get('flag') else ''} |")
            lines.append("")
        inc = san.get("incremental") or {}
        if inc:
            lines += ["## Mode", "", f"{inc.get('mode')} run: {inc.get('reason')}. Detectors saw {inc.get('delta')} "
                      f"rows ({inc.get('new')} new); {inc.get('carried_over', 0)} rows kept the ledger's decision.", ""]
        lines += ["## Detectors", "", "| detector | flagged | review | findings | seconds |",
                  "|---|---:|---:|---:|---:|"]
        for name, d in san["detectors"].items():
            lines.append(f"| {name} | {d['flagged']} | {d['review']} | {d['findings']} | {d['seconds']} |")
        lines.append("")
        llm = san.get("llm_review") or {}
        lines += ["## LLM review", "", ("ran: " + json.dumps(llm)) if llm.get("ran")
                  else f"Did not run: {llm.get('reason', 'not configured')}.", ""]
        if san["rejected"]["by_reason"]:
            lines += ["## Rejected rows", "", "| reason | rows |", "|---|---:|"]
            lines += [f"| {r} | {n} |" for r, n in san["rejected"]["by_reason"].items()]
            lines.append("")
            lines += ["| file | line | field | reason |", "|---|---:|---|---|"]
            lines += [f"| {_md_cell(e[S.FILE], 60)} | {e[S.LINE]} | {e[S.FIELD]} | {_md_cell(e[S.REASON])} |"
                      for e in san["rejected"]["examples"]]
            lines.append("")
    return "\n".join(lines)


def _md_run_summary(rep: dict[str, Any]) -> list[str]:
    lines = []
    scan = rep.get("scan")
    if scan:
        lines += ["## Trigger scan", "", f"Verdict: **{scan.get('verdict')}** "
                  f"(top candidate {visible(str(scan.get('top_trigger')))!s}, threshold {scan.get('threshold')})", "",
                  "| rank | candidate | origin | score | anomaly | ASR |", "|---:|---|---|---:|---:|---:|"]
        for k, c in enumerate(scan.get("candidates", [])[:10], 1):
            lines.append(f"| {k} | {_md_cell(c.get('candidate'), 50)} | {c.get('source')} | "
                         f"{_num(c.get('score'))} | {_num(c.get('anomaly'))} | {_num(c.get('asr'))} |")
        lines.append("")
    prune = rep.get("prune")
    if prune:
        if prune.get("ran"):
            lines += ["## Fine-pruning", "", "| | before | after |", "|---|---:|---:|",
                      f"| attack success | {_num(prune.get('asr_before'))} | {_num(prune.get('asr_after'))} |",
                      f"| clean loss | {_num(prune.get('clean_loss_before'))} | "
                      f"{_num(prune.get('clean_loss_after'))} |",
                      "", f"Unseen trigger variants after pruning: {json.dumps(prune.get('asr_variants_after', {}))}",
                      ""]
        else:
            lines += ["## Fine-pruning", "", f"Not run: {prune.get('reason', '')}", ""]
    card = rep.get("model_card")
    if card:
        lines += ["## Model", "", f"- promotable: **{rep.get('promotable')}**",
                  f"- snapshot root: `{card.get('snapshot_root')}`",
                  f"- code version: `{card.get('code_version')}`  git: `{card.get('git_rev')}`",
                  f"- train loss {_num(card.get('train_loss'))}, validation loss {_num(card.get('val_loss'))}", ""]
    return lines


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    try:
        return f"{float(x):.{digits}f}"
    except (TypeError, ValueError):
        return str(x)


# ---------------------------------------------------------------- headline (verdict first)

def headline(rep: dict[str, Any]) -> tuple[list[str], list[str]]:
    """What the report says, and what to do about it: (facts, actions) as plain sentences."""
    if rep.get("kind") == "run":
        return _run_headline(rep)
    return _sanitize_headline(rep)


def _main_cluster(san: dict[str, Any]) -> dict[str, Any] | None:
    fs = san.get("findings") or []
    quarantined = [f for f in fs if (f.get("decisions") or {}).get(S.QUARANTINE)]
    return (quarantined or fs or [None])[0]


def _sources_text(d: dict[str, Any]) -> str:
    return ", ".join(f"{s} ({_n(n)})" for s, n in d.items()) or "-"


def _sanitize_headline(san: dict[str, Any], *, in_run: bool = False) -> tuple[list[str], list[str]]:
    c = san["counts"]
    n, q, rev, rej = c["rows_in"], c["quarantined"], c["review"], c["rejected"]
    held = bool(san.get("hold_review"))
    facts = [f"{_n(q)} of {_n(n)} rows quarantined ({_share(q, n)}); {_n(rev)} in review"
             f" ({'held out of training' if held else 'kept in training'}); {_n(rej)} rejected as malformed."]
    top = _main_cluster(san)
    if top is not None and q:
        facts.append(f"Main finding: {visible(top['title'])} in {_rows(top['rows'])} ({top['detector']}), "
                     f"from {_sources_text(top.get('sources', {}))}.")
    flagged = [s for s in san.get("per_source") or [] if s.get("flag")]
    for s in flagged:
        facts.append(f"Suspicious source: {s.get('source')}: {_pct(s.get('rate'))} of its rows quarantined or in "
                     f"review, against {_pct(s.get('baseline'))} in the other sources.")
    actions: list[str] = []
    if in_run:
        return facts, actions
    if q:
        actions.append(f"Train on clean.parquet ({_n(c['clean'])} rows). quarantine.parquet holds the "
                       f"{_n(q)} quarantined rows with the evidence for each.")
    if rev:
        actions.append(f"Check the {_rows(rev)} in review: 'poisonguard review export' lists them, mark each keep or "
                       "quarantine, and 'poisonguard review apply' records the decisions. Until then they are "
                       + ("held out of training (hold_review: true)." if held
                          else "in the clean set and will be trained on (hold_review: false)."))
    for s in flagged:
        actions.append(f"Raise the flagged rows with the owner of {s.get('source')} before accepting the delivery.")
    if rej:
        actions.append(f"Fix or drop the {_n(rej)} rejected rows: rejected.parquet names the file, line and reason.")
    if not actions:
        actions.append("Nothing to do: train on clean.parquet.")
    return facts, actions


def _run_headline(rep: dict[str, Any]) -> tuple[list[str], list[str]]:
    scan, prune, card = rep.get("scan"), rep.get("prune"), rep.get("model_card")
    facts = [f"Model promotable: {'yes' if rep.get('promotable') else 'no'}."]
    if scan:
        top = (scan.get("candidates") or [{}])[0]
        facts.append(f"Trigger scan: {scan.get('verdict')}. Top candidate {visible(repr(scan.get('top_trigger')))}: "
                     f"anomaly z {_num(scan.get('top_anomaly'), 1)} (threshold {_num(scan.get('threshold'), 1)}), "
                     f"attack success {_pct(top.get('asr'), 0)} (gate {_pct(scan.get('min_asr'), 0)}).")
    else:
        facts.append("The model was not scanned.")
    if prune and prune.get("ran"):
        facts.append(f"Fine-pruning on {visible(repr(prune.get('trigger')))}: attack success "
                     f"{_pct(prune.get('asr_before'), 0)} before, {_pct(prune.get('asr_after'), 0)} after; "
                     f"verified on unseen variants: {'yes' if prune.get('verified') else 'no'}.")
    elif prune:
        facts.append(f"Fine-pruning not run: {prune.get('reason', '')}.")
    san = rep.get("sanitize")
    if san:
        facts += _sanitize_headline(san, in_run=True)[0]
    actions = []
    scan_clean = bool(scan) and scan.get("verdict") == "clean"
    if not card:
        actions.append("No model card: the model was not trained; rerun fine-tuning.")
    elif rep.get("promotable") and scan_clean:
        actions.append("The model may ship: the scan found no backdoor.")
    elif rep.get("promotable"):
        actions.append("Ship the pruned model, not the original: the original responds to the trigger.")
    else:
        actions.append("Do not ship this model.")
        if scan and scan.get("verdict") == "backdoor":
            actions.append(f"The training data taught it {visible(repr(scan.get('top_trigger')))}: search "
                           "clean.parquet for the trigger, quarantine those rows, and retrain.")
        if prune and prune.get("ran") and not prune.get("verified"):
            actions.append("Pruning did not remove the backdoor on every variant (see Fine-pruning).")
    return facts, actions


def _tone(rep: dict[str, Any]) -> str:
    if rep.get("kind") == "run":
        if not rep.get("promotable"):
            return "bad"
        return "good" if (rep.get("scan") or {}).get("verdict") == "clean" else "warn"
    return "good" if rep.get("verdict") == VERDICT_CLEAN else "bad"


def _n(x: Any) -> str:
    try:
        return f"{int(x):,}"
    except (TypeError, ValueError):
        return "-" if x is None else str(x)


def _pct(x: Any, digits: int = 2) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "-"
    return "-" if np.isnan(v) else f"{100 * v:.{digits}f}%"


def _rows(n: Any) -> str:
    return f"{_n(n)} row" if n == 1 else f"{_n(n)} rows"


def _share(k: int, n: int) -> str:
    return _pct(k / n) if n else "-"


# ---------------------------------------------------------------- html

_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:0;background:#f4f5f8;
color:#1d2330;font-size:14px;line-height:1.45}
main{max-width:1120px;margin:0 auto;padding:20px 24px 40px}
header h1{font-size:20px;margin:0} header .meta{color:#667;font-size:12px;margin-top:2px}
h2{font-size:17px;margin:30px 0 10px;padding-bottom:4px;border-bottom:1px solid #d9dce4}
h3{font-size:14px;margin:16px 0 6px}
.verdict{border-radius:10px;padding:14px 20px;margin:14px 0 10px;border:1px solid}
.verdict .vt{font-size:24px;font-weight:700;margin-bottom:6px}
.verdict ul{margin:4px 0;padding-left:20px}
.verdict .next{margin-top:8px;padding-top:8px;border-top:1px solid rgba(0,0,0,.12)}
.bad{background:#fdecec;border-color:#f1b0b0} .bad .vt{color:#a61b1b}
.warn{background:#fff6e0;border-color:#f0d38a} .warn .vt{color:#8a5a00}
.good{background:#e8f6ee;border-color:#a7dcb9} .good .vt{color:#14632d}
nav{font-size:13px;margin:6px 0 0} nav a{color:#2c5aa0;text-decoration:none;margin-right:14px;white-space:nowrap}
.cards{display:flex;gap:10px;flex-wrap:wrap}
.card{background:#fff;border:1px solid #d9dce4;border-top:4px solid #8a93a6;border-radius:8px;padding:8px 16px;
min-width:130px}
.card .k{color:#556;font-size:12px;text-transform:uppercase;letter-spacing:.04em} .card b{display:block;font-size:24px}
.card .p{color:#667;font-size:12px}
.c-clean{border-top-color:#3a9d5d} .c-review{border-top-color:#e0a100} .c-quarantined{border-top-color:#c0392b}
.c-rejected{border-top-color:#7f8c8d} .c-rows_in{border-top-color:#2c5aa0}
.eq{color:#445;font-size:13px;margin:8px 0 0}
table{border-collapse:collapse;width:100%;background:#fff;font-size:13px;margin:6px 0}
td,th{border:1px solid #e1e4ea;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#eef0f5;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
table.kv th{width:230px}
details.finding{background:#fff;border:1px solid #d9dce4;border-left:5px solid #c0392b;border-radius:6px;
padding:8px 14px;margin:8px 0}
details.finding.rv{border-left-color:#e0a100}
details.finding summary{cursor:pointer;font-weight:600;font-size:14px}
.badge{display:inline-block;font-size:11px;font-weight:600;padding:1px 7px;border-radius:10px;background:#e9ecf2;
color:#334;margin-left:6px;vertical-align:1px}
.badge.q{background:#c0392b;color:#fff} .badge.r{background:#e0a100;color:#fff} .badge.k{background:#3a9d5d;color:#fff}
.badge.flag{background:#c0392b;color:#fff}
.ev{color:#333;font-size:13px;margin:6px 0} .src{color:#556;font-size:12px}
mark{background:#ffd43b;padding:0 2px;border-radius:2px;font-weight:600}
mark.pl{background:#ffc9c9}
.inv{background:#6f42c1;color:#fff;font-size:10px;padding:0 3px;border-radius:3px;font-family:monospace}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:12px;
font-family:ui-monospace,'DejaVu Sans Mono',monospace}
code{font-size:12px;word-break:break-all}
.muted{color:#667} .small{font-size:12px}
figure{margin:8px 0;background:#fff;border:1px solid #d9dce4;border-radius:6px;padding:8px;display:inline-block;
max-width:100%}
figure img{max-width:100%;display:block} figcaption{font-size:12px;color:#556;margin-top:4px}
.legend{font-size:12px;color:#556;margin:4px 0}
"""


def _esc_visible(text: str, highlight: list[str], payload: list[str] | tuple[str, ...] = ()) -> str:
    """HTML-escape, make invisible characters visible, <mark> the triggers and mark the payload phrases."""
    label = np.zeros(len(text), dtype=np.int8)
    low = text.lower()
    for lab, needles in ((2, payload), (1, highlight)):   # triggers win where both overlap
        for h in needles:
            if not h:
                continue
            hl, start = h.lower(), 0
            while (i := low.find(hl, start)) >= 0:
                label[i:i + len(h)] = lab
                start = i + len(h)
    out = []
    cur = 0
    for i, ch in enumerate(text):
        if label[i] != cur:
            if cur:
                out.append("</mark>")
            if label[i]:
                out.append("<mark>" if label[i] == 1 else "<mark class='pl'>")
            cur = int(label[i])
        v = visible(ch)
        out.append(f'<span class="inv">{html.escape(v[1:-1])}</span>' if v != ch else html.escape(ch))
    if cur:
        out.append("</mark>")
    return "".join(out)


def _payloads(f: dict[str, Any]) -> list[str]:
    """Response phrases a finding names as the attacker's payload (shown in a second colour)."""
    info = f.get("info") or {}
    found = [str(info[k]) for k in ("response_phrase", "target", "payload") if isinstance(info.get(k), str)]
    found += re.findall(r"response phrase '([^']{1,80})'", f.get("evidence", ""))
    return found


def _plot_png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _figure(uri: str, caption: str) -> str:
    return (f"<figure><img alt='{html.escape(caption, quote=True)}' src='{uri}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _source_plot(ps: list[dict[str, Any]]) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 0.6 + 0.38 * len(ps)))
    names = [str(s.get("source")) for s in ps]
    rates = np.array([100 * float(s.get("rate") or 0) for s in ps])
    lo = np.array([100 * float(s.get("ci_low", s.get("rate")) or 0) for s in ps])
    hi = np.array([100 * float(s.get("ci_high", s.get("rate")) or 0) for s in ps])
    y = np.arange(len(ps))
    ax.barh(y, rates, color=["#c0392b" if s.get("flag") else "#5b7db1" for s in ps], height=0.6)
    ax.errorbar(rates, y, xerr=[np.maximum(rates - lo, 0), np.maximum(hi - rates, 0)], fmt="none", ecolor="#333",
                capsize=3, lw=1)
    if all("baseline" in s for s in ps):
        ax.scatter([100 * float(s.get("baseline") or 0) for s in ps], y, marker="|", s=300, color="#111",
                   zorder=3, label="rate in the other sources")
        ax.legend(fontsize=8, frameon=False, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=1)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("rows quarantined or in review (%), 95% interval")
    return _figure(_plot_png(fig), "Suspicion rate per source: red = flagged as suspicious")


def _score_plot(hists: dict[str, list[int]], detectors: dict[str, Any]) -> str:
    plt = _pyplot()
    names = list(hists)
    cols = min(4, len(names))
    rows_ = -(-len(names) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(2.6 * cols, 1.9 * rows_), squeeze=False, sharex=True)
    edges = np.linspace(0, 1, 21)
    for ax, name in zip(axes.flat, names, strict=False):
        h = np.asarray(hists[name], dtype=float)
        ax.bar(edges[:-1], np.where(h > 0, h, np.nan), width=0.05, align="edge", color="#5b7db1")
        ax.set_yscale("log")
        ax.set_ylim(0.7, max(2.0, h.max() * 2))
        d = detectors.get(name, {})
        ax.set_title(f"{name}\nflagged {_n(d.get('flagged'))}, review {_n(d.get('review'))}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("score", fontsize=8)
    fig.tight_layout()
    return _figure(_plot_png(fig), "Score distribution per detector (rows per score bin, log scale)")


def _table(rows: list[dict[str, Any]], cols: list[str], *, raw: tuple[str, ...] = (), num: tuple[str, ...] = (),
           labels: dict[str, str] | None = None, cls: str = "") -> str:
    """An HTML table; cells in ``raw`` are already HTML, cells in ``num`` are right-aligned."""
    labels = labels or {}
    head = "".join(f"<th{' class=num' if c in num else ''}>{html.escape(labels.get(c, c))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td{' class=num' if c in num else ''}>"
                         f"{r.get(c, '') if c in raw else html.escape(visible(_fmt(r.get(c))))}</td>"
                         for c in cols) + "</tr>" for r in rows)
    return f"<table{f' class={cls}' if cls else ''}><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False, default=str)
    return "" if v is None else str(v)


def _kv(pairs: list[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{v if isinstance(v, _Html) else html.escape(_fmt(v))}</td></tr>"
                   for k, v in pairs if v is not None and v != "")
    return f"<table class='kv'>{rows}</table>"


class _Html(str):
    """A string that is already HTML."""


def _code(s: Any) -> _Html:
    return _Html(f"<code>{html.escape(str(s))}</code>")


def _triggers(f: dict[str, Any]) -> list[str]:
    info = f.get("info") or {}
    found = [str(info[k]) for k in ("trigger", "sequence", "phrase", "pattern", "chars") if info.get(k)]
    m = re.search(r"'([^']{1,80})'", f.get("title", ""))
    if m:
        found.append(m.group(1))
    return found


def to_html(rep: dict[str, Any]) -> str:
    kind = rep.get("kind")
    san = rep if kind == "sanitize" else rep.get("sanitize")
    verdict = str(rep.get("verdict", "?"))
    facts, actions = headline(rep)
    sections: list[tuple[str, str, str]] = []      # (anchor, title, body html)
    if kind == "run":
        sections += _run_sections(rep)
    if san:
        sections += _sanitize_sections(san)
    sections.append(("lineage", "Data snapshot and model lineage" if kind == "run" else "Data snapshot",
                     _lineage(rep, san)))
    title = {"sanitize": "poisonguard sanitize report", "run": "poisonguard run report"}.get(kind or "",
                                                                                        "poisonguard report")
    meta = [f"code {rep.get('code_version') or (san or {}).get('code_version') or '?'}"]
    if san and san.get("inputs"):
        meta.append("inputs: " + ", ".join(Path(p).name for p in san["inputs"]))
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width,initial-scale=1'><title>{html.escape(title)}: "
        f"{html.escape(verdict)}</title><style>{_CSS}</style></head><body><main>",
        f"<header><h1>{html.escape(title)}</h1><div class='meta'>{html.escape(' · '.join(meta))}</div></header>",
        f"<section class='verdict {_tone(rep)}' id='verdict-box'><div class='vt' id='verdict'>Verdict: "
        f"{html.escape(verdict)}</div><ul class='facts'>"
        + "".join(f"<li>{html.escape(x)}</li>" for x in facts) + "</ul>"
        + (("<div class='next'><b>What to do</b><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in actions)
            + "</ul></div>") if actions else "") + "</section>",
        "<nav>" + "".join(f"<a href='#{a}'>{html.escape(t)}</a>" for a, t, _ in sections) + "</nav>",
    ]
    parts += [f"<section id='{a}'><h2>{html.escape(t)}</h2>{body}</section>" for a, t, body in sections]
    parts.append("</main></body></html>")
    return "".join(parts)


# ---- sanitize sections

def _sanitize_sections(san: dict[str, Any]) -> list[tuple[str, str, str]]:
    out = [("rows", "Row accounting", _html_counts(san))]
    if san.get("reviews"):
        out.append(("reviews", "Review decisions applied", _table(
            san["reviews"], ["time", "file", "released", "quarantined", "confirmed"],
            num=("released", "quarantined", "confirmed"))))
    out.append(("findings", "Finding clusters", _html_findings(san)))
    if san.get("per_source"):
        out.append(("sources", "Per-source suspicion", _html_sources(san["per_source"])))
    if san.get("score_histograms"):
        out.append(("scores", "Score distributions", _score_plot(san["score_histograms"], san.get("detectors", {}))))
    det_rows = [{"detector": n, **{k: d.get(k) for k in ("flagged", "review", "findings", "seconds")}}
                for n, d in san.get("detectors", {}).items()]
    out.append(("detectors", "Detectors", _table(det_rows, ["detector", "flagged", "review", "findings", "seconds"],
                                                 num=("flagged", "review", "findings", "seconds"))))
    inc = san.get("incremental") or {}
    if inc:
        out.append(("incremental", "Incremental run", _kv([(k, v) for k, v in inc.items() if k != "fingerprint"])))
    llm = san.get("llm_review") or {}
    out.append(("llm", "LLM review", _kv([(k, v) for k, v in llm.items()]) if llm.get("ran") else
                f"<p class='muted'>Did not run: {html.escape(str(llm.get('reason', 'not configured')))}.</p>"))
    rej = san.get("rejected") or {}
    if rej.get("by_reason"):
        out.append(("rejected", "Rejected rows", _table([{"reason": r, "rows": n} for r, n in rej["by_reason"].items()],
                                                        ["reason", "rows"], num=("rows",))
                    + "<h3>First rejected rows</h3>"
                    + _table(rej.get("examples", []), [S.FILE, S.LINE, S.FIELD, S.REASON], num=(S.LINE,))))
    return out


def _html_counts(san: dict[str, Any]) -> str:
    c = san["counts"]
    n = c["rows_in"]
    held = bool(san.get("hold_review"))
    notes = {"rows_in": "rows read", "clean": "trained on", "quarantined": "held out", "rejected": "malformed",
             "review": "held with quarantine" if held else "inside clean"}
    cards = "".join(
        f"<div class='card c-{k}'><span class='k'>{label}</span><b data-count='{k}'>{_n(c[k])}</b>"
        f"<span class='p'>{_share(c[k], n) if k != 'rows_in' else ''} {notes[k]}</span></div>"
        for k, label in (("rows_in", "in"), ("clean", "clean"), ("review", "review"), ("quarantined", "quarantined"),
                         ("rejected", "rejected")))
    ok = c["clean"] + c["quarantined"] + c["rejected"] == n
    return (f"<div class='cards' id='counts'>{cards}</div><p class='eq'>{_n(n)} in = {_n(c['clean'])} clean + "
            f"{_n(c['quarantined'])} quarantined + {_n(c['rejected'])} rejected "
            f"{'(reconciles)' if ok else '(DOES NOT RECONCILE)'}. Rows in review ({_n(c['review'])}) are counted "
            f"{'with the quarantine (hold_review: true)' if held else 'in clean (hold_review: false)'}.</p>")


def _html_findings(san: dict[str, Any]) -> str:
    fs = san.get("findings") or []
    if not fs:
        return "<p>No finding clusters.</p>"
    nq = sum(1 for f in fs if (f.get("decisions") or {}).get(S.QUARANTINE))
    parts = [f"<p class='muted small'>{len(fs)} clusters: {nq} with quarantined rows (open), {len(fs) - nq} with rows "
             "in review or kept (click to open). Examples show the <mark>trigger</mark>, the "
             "<mark class='pl'>payload</mark> and invisible characters as <span class='inv'>U+200B</span>.</p>"]
    all_hl = [t for f in fs if (f.get("decisions") or {}).get(S.QUARANTINE) for t in _triggers(f)]
    all_pl = [t for f in fs if (f.get("decisions") or {}).get(S.QUARANTINE) for t in _payloads(f)]
    for k, f in enumerate(fs, 1):
        hl, pl = _triggers(f) + all_hl, _payloads(f) + all_pl
        dec = f.get("decisions") or {}
        quarantined = bool(dec.get(S.QUARANTINE))
        badges = "".join(f"<span class='badge {'q' if d == S.QUARANTINE else 'r' if d == S.REVIEW else 'k'}'>"
                         f"{_n(m)} {html.escape(_DECISION_WORD.get(d, d))}</span>" for d, m in dec.items())
        ex = f.get("examples") or []
        rows = "".join(
            f"<tr><td><code>{html.escape(str(e[S.ID]))}</code><br><span class='src'>{html.escape(str(e[S.SOURCE]))}"
            f"</span><br><span class='badge {'q' if e.get(S.DECISION) == S.QUARANTINE else 'r'}' style='margin:0'>"
            f"{html.escape(str(e.get(S.DECISION, '')))}</span></td>"
            f"<td><pre>{_esc_visible(str(e[S.PROMPT]), hl, pl)}</pre></td>"
            f"<td><pre>{_esc_visible(str(e[S.RESPONSE]), hl, pl)}</pre></td></tr>" for e in ex)
        more = (f"<p class='muted small'>Showing {len(ex)} of {_n(f['rows'])} rows; report.json lists the ids.</p>"
                if len(ex) < f["rows"] else "")
        parts.append(
            f"<details class='finding{'' if quarantined else ' rv'}' id='finding-{k}'{' open' if quarantined else ''}>"
            f"<summary>{k}. {_esc_visible(f['title'], hl, pl)}{badges}<span class='badge'>"
            f"{html.escape(f['detector'])}</span><span class='badge'>{_rows(f['rows'])}</span></summary>"
            f"<div class='ev'>{_esc_visible(f['evidence'], hl, pl)}</div>"
            f"<div class='src'>Sources: {html.escape(_sources_text(f.get('sources', {})))} · score "
            f"{_num(f.get('score'))}</div>"
            + (f"<table><tr><th style='width:170px'>row</th><th>prompt</th><th>response</th></tr>{rows}</table>{more}"
               if ex else "") + "</details>")
    return "".join(parts)


_DECISION_WORD = {S.QUARANTINE: "quarantined", S.REVIEW: "in review", S.KEEP: "kept"}


def _html_sources(ps: list[dict[str, Any]]) -> str:
    rows = []
    for s in ps:
        r = dict(s)
        r["rate"] = _pct(s.get("rate"))
        if "ci_low" in s:
            r["interval"] = f"{_pct(s.get('ci_low'))} – {_pct(s.get('ci_high'))}"
        r["baseline"] = _pct(s.get("baseline")) if "baseline" in s else ""
        r["z"] = _num(s.get("z"), 1) if "z" in s else ""
        r["p_value"] = f"{float(s['p_value']):.2g}" if s.get("p_value") is not None else ""
        r["flag"] = "<span class='badge flag' style='margin:0'>suspicious</span>" if s.get("flag") else ""
        rows.append(r)
    cols = [c for c in ("source", "rows", "quarantined", "review", "rate", "interval", "baseline", "z", "p_value",
                        "flag") if c in rows[0]]
    labels = {"rate": "suspicious rate", "interval": "95% interval", "baseline": "other sources", "p_value": "p"}
    return (_table(rows, cols, raw=("flag",), num=("rows", "quarantined", "review", "rate", "baseline", "z", "p_value"),
                   labels=labels)
            + "<p class='muted small'>Suspicious = quarantined or in review. A source is flagged when its rate is "
            "significantly above the rate in the other sources.</p>" + _source_plot(ps))


# ---- run sections

def _run_sections(rep: dict[str, Any]) -> list[tuple[str, str, str]]:
    out = []
    scan = rep.get("scan")
    if scan:
        out.append(("scan", f"Trigger scan: {scan.get('verdict')}", _html_scan(scan)))
    prune = rep.get("prune")
    if prune:
        out.append(("prune", "Fine-pruning", _html_prune(prune)))
    return out


def _html_scan(scan: dict[str, Any]) -> str:
    cands = scan.get("candidates") or []
    top = cands[0] if cands else {}
    parts = [f"<p>Top candidate <b>{_esc_visible(repr(scan.get('top_trigger')), [])}</b>: anomaly z "
             f"<b>{_num(top.get('anomaly'), 1)}</b> (threshold {_num(scan.get('threshold'), 1)}), attack success "
             f"<b>{_pct(top.get('asr'), 0)}</b> on {_n(scan.get('n_prompts'))} held-out prompts (gate "
             f"{_pct(scan.get('min_asr'), 0)} after novelty). {_n(scan.get('n_candidates'))} candidates tested in "
             f"{_num(scan.get('seconds'), 1)} s.</p>"]
    if cands:
        parts.append(_scan_plot(cands[:15], scan))
        rows = [{"rank": k, "candidate": f"<b>{_esc_visible(str(c.get('candidate')), [])}</b>",
                 "origin": c.get("source"), "anomaly z": _num(c.get("anomaly"), 1), "ASR": _pct(c.get("asr"), 0),
                 "novelty": _num(c.get("novelty"), 2), "score": _num(c.get("score")),
                 "induced response": f"<pre>{_esc_visible(str(c.get('induced_response') or ''), [])}</pre>"}
                for k, c in enumerate(cands[:15], 1)]
        parts.append("<h3>Ranking (top 15)</h3>" + _table(
            rows, ["rank", "candidate", "origin", "anomaly z", "ASR", "novelty", "score", "induced response"],
            raw=("candidate", "induced response"), num=("rank", "anomaly z", "ASR", "novelty", "score")))
    if scan.get("suspect_asr"):
        parts.append("<h3>Suspected triggers</h3>" + _table(
            [{"trigger": t, "attack success": _pct(a, 0)} for t, a in scan["suspect_asr"].items()],
            ["trigger", "attack success"], num=("attack success",)))
    ev = scan.get("evidence") or []
    if ev:
        trig, head = [str(scan.get("top_trigger") or "")], [str(top.get("induced_head") or "")]
        rows = [{"prompt with trigger": f"<pre>{_esc_visible(str(e.get('prompt', '')), trig)}</pre>",
                 "clean model answer": f"<pre>{_esc_visible(str(e.get('clean', '')), [])}</pre>",
                 "answer with trigger": f"<pre>{_esc_visible(str(e.get('triggered', '')), [], head)}</pre>"}
                for e in ev]
        parts.append("<h3>What the top candidate does</h3>" + _table(
            rows, ["prompt with trigger", "clean model answer", "answer with trigger"],
            raw=("prompt with trigger", "clean model answer", "answer with trigger")))
    if scan.get("false_alarm_note"):
        parts.append(f"<details><summary class='small muted'>How the verdict is decided</summary><p class='small'>"
                     f"{html.escape(scan['false_alarm_note'])}</p></details>")
    return "".join(parts)


def _scan_plot(cands: list[dict[str, Any]], scan: dict[str, Any]) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.27 * len(cands)))
    names = [visible(str(c.get("candidate")))[:40] for c in cands]
    z = [float(c.get("anomaly") or 0) for c in cands]
    gate = float(scan.get("min_asr") or 0)
    hot = [float(c.get("asr") or 0) * float(c.get("novelty", 1) or 0) >= gate for c in cands]
    y = np.arange(len(cands))
    ax.barh(y, z, color=["#c0392b" if h else "#5b7db1" for h in hot], height=0.65)
    ax.axvline(float(scan.get("threshold") or 0), color="#111", ls="--", lw=1, label="anomaly threshold")
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("anomaly (robust z)")
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    return _figure(_plot_png(fig), "Trigger candidates by anomaly; red = attack success at or above the gate")


def _html_prune(prune: dict[str, Any]) -> str:
    if not prune.get("ran"):
        return f"<p>Not run: {html.escape(str(prune.get('reason', '')))}</p>"
    vb, va = prune.get("asr_variants_before") or {}, prune.get("asr_variants_after") or {}
    rows = [{"": f"attack success on {visible(repr(prune.get('trigger')))}", "before": _pct(prune.get("asr_before"), 0),
             "after": _pct(prune.get("asr_after"), 0)}]
    rows += [{"": f"unseen variant {visible(repr(v))}", "before": _pct(vb.get(v), 0) if v in vb else "-",
              "after": _pct(a, 0)} for v, a in va.items()]
    rows.append({"": "clean loss", "before": _num(prune.get("clean_loss_before")),
                 "after": _num(prune.get("clean_loss_after"))})
    stopped = f"; stopped because {html.escape(str(prune['stopped_because']))}" if prune.get("stopped_because") else ""
    frac = prune.get("fraction_pruned")
    frac_s = f"; {_pct(frac, 1)} of MLP neurons pruned" if frac is not None else ""
    parts = [f"<p>Verified: <b>{'yes' if prune.get('verified') else 'no'}</b>{stopped}{frac_s}.</p>",
             _table(rows, ["", "before", "after"], num=("before", "after")), _prune_plot(prune)]
    if prune.get("target"):
        parts.append(f"<p class='small muted'>Payload measured: {_esc_visible(str(prune['target']), [])}</p>")
    for note in prune.get("notes") or []:
        parts.append(f"<p class='small muted'>{html.escape(str(note))}</p>")
    return "".join(parts)


def _prune_plot(prune: dict[str, Any]) -> str:
    plt = _pyplot()
    vb, va = prune.get("asr_variants_before") or {}, prune.get("asr_variants_after") or {}
    names = [visible(str(prune.get("trigger")))] + [visible(v) for v in va]
    before = [float(prune.get("asr_before") or 0)] + [float(vb.get(v, np.nan)) for v in va]
    after = [float(prune.get("asr_after") or 0)] + [float(a) for a in va.values()]
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.42 * len(names)))
    y = np.arange(len(names))
    ax.barh(y - 0.18, [100 * b for b in before], height=0.36, color="#c0392b", label="before pruning")
    ax.barh(y + 0.18, [100 * a for a in after], height=0.36, color="#3a9d5d", label="after pruning")
    ax.set_yticks(y, [n[:40] for n in names], fontsize=8)
    ax.invert_yaxis()
    for yy, b, a in zip(y, before, after, strict=True):
        for off, v in ((-0.18, b), (0.18, a)):
            if not np.isnan(v):
                ax.text(100 * v + 1, yy + off, f"{100 * v:.0f}%", va="center", fontsize=7)
    ax.set_xlim(0, 108)
    ax.set_xlabel("attack success (%)")
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    return _figure(_plot_png(fig), "Attack success before and after fine-pruning (trigger, then unseen variants)")


# ---- lineage

def _dvc_lock_text(lock: Any) -> str | None:
    """The dvc.lock stages a model card records (names and, when given, a short hash)."""
    if not lock:
        return None
    if isinstance(lock, dict):
        return ", ".join(f"{k} {str(v)[:12]}" if isinstance(v, str) else str(k) for k, v in lock.items())
    return str(lock)


def _lineage(rep: dict[str, Any], san: dict[str, Any] | None) -> str:
    snap = rep.get("snapshot") or {}
    pairs: list[tuple[str, Any]] = []
    root = snap.get("snapshot_root") or (san or {}).get("snapshot_root")
    if root:
        pairs.append(("delivery snapshot root (ingested rows)", _code(root)))
    if snap.get("sources"):
        pairs.append(("rows per source", _sources_text(snap["sources"])))
    if san:
        if san.get("inputs"):
            pairs.append(("inputs", _Html("<br>".join(html.escape(str(p)) for p in san["inputs"]))))
        prm = san.get("params") or {}
        if prm:
            pairs.append(("detectors", ", ".join(prm.get("detectors", {})) or None))
            pairs.append(("hold_review / min_detectors", f"{prm.get('hold_review')} / {prm.get('min_detectors')}"))
        pairs.append(("sanitize code version", san.get("code_version")))
    card = rep.get("model_card")
    if card:
        pairs += [("model id", _code(card["model_id"]) if card.get("model_id") else None),
                  ("training data snapshot root", _code(card.get("snapshot_root"))),
                  ("training data", card.get("train_data")),
                  ("training rows per source", _sources_text(card.get("sources") or {})),
                  ("base model", f"{card.get('base_model')}{' (LoRA)' if card.get('lora') else ''}"),
                  ("parameters", card.get("n_params")),
                  ("train / validation rows", f"{_n(card.get('n_train'))} / {_n(card.get('n_val'))}"),
                  ("train / validation loss", f"{_num(card.get('train_loss'))} / {_num(card.get('val_loss'))}"),
                  ("code version", _code(card.get("code_version"))), ("git revision", _code(card.get("git_rev"))),
                  ("pruned from", card.get("pruned_from")),
                  ("dvc.lock stages", _dvc_lock_text(card.get("dvc_lock"))),
                  ("runtime", f"torch {card.get('torch')}, transformers {card.get('transformers')}, python "
                              f"{card.get('python')}, {card.get('device')}, seed {card.get('seed')}")]
    body = _kv(pairs)
    if card and card.get("params"):
        body += ("<details><summary class='small muted'>Fine-tuning parameters</summary><pre>"
                 + html.escape(json.dumps(card["params"], indent=1, default=str)) + "</pre></details>")
    elif san and san.get("params"):
        body += ("<details><summary class='small muted'>Sanitize parameters</summary><pre>"
                 + html.escape(json.dumps(san["params"], indent=1, default=str)) + "</pre></details>")
    if rep.get("kind") == "run" and not card:
        body += "<p class='muted'>No model card: no model was trained in this run.</p>"
    return body


def write_reports(rep: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write report.json, report.md and report.html into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "html": out_dir / "report.html"}
    paths["json"].write_text(json.dumps(rep, indent=2, ensure_ascii=False, default=_default) + "\n", encoding="utf-8")
    paths["md"].write_text(to_markdown(rep), encoding="utf-8")
    paths["html"].write_text(to_html(rep), encoding="utf-8")
    return paths
