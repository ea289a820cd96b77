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
    c = res.counts()
    clean_n, quar_n = len(res.clean), len(res.quarantine)
    counts = {"rows_in": int(rows_in), "clean": clean_n, "review": c["review"],
              "quarantined": quar_n, "rejected": int(len(rejected))}
    if counts["clean"] + counts["quarantined"] + counts["rejected"] != counts["rows_in"]:
        raise RuntimeError(f"row accounting does not reconcile: {counts} "
                           "(clean + quarantined + rejected must equal rows_in)")
    rec = res.records.set_index(S.ID)
    findings = []
    for f in res.findings[:TOP_FINDINGS]:
        d = f.to_dict()
        ids = [i for i in f.ids if i in rec.index]
        d["sources"] = rec.loc[ids, S.SOURCE].value_counts().to_dict() if ids else {}
        d["decisions"] = res.decisions.loc[ids, S.DECISION].value_counts().to_dict() if ids else {}
        d["examples"] = [_example(rec, res.decisions, i) for i in ids[:EXAMPLES_PER_FINDING]]
        d["ids"] = d["ids"][:200]
        findings.append(d)
    detectors = {}
    for name, r in res.results.items():
        detectors[name] = {"flagged": int(r.flagged.sum()), "review": int(r.review.sum()),
                           "seconds": res.seconds.get(name), "findings": len(r.findings),
                           "info": _jsonable(r.info)}
    hist = {name: np.histogram(r.scores.to_numpy(), bins=20, range=(0, 1))[0].tolist()
            for name, r in res.results.items()}
    rej = rejected[S.REASON].str.split(":").str[0].value_counts().to_dict() if len(rejected) else {}
    verdict = VERDICT_POISON if quar_n else VERDICT_CLEAN
    return {
        "kind": "sanitize",
        "verdict": verdict,
        "counts": counts,
        "inputs": inputs or [],
        "snapshot_root": snapshot_root,
        "findings": findings,
        "per_source": [] if per_source is None else _jsonable(per_source.reset_index().to_dict("records")),
        "detectors": detectors,
        "score_histograms": hist,
        "rejected": {"by_reason": rej,
                     "examples": _jsonable(rejected.head(20).drop(columns=[S.RAW], errors="ignore")
                                           .to_dict("records"))},
        "llm_review": res.llm_summary,
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
    san = rep if rep.get("kind") == "sanitize" else rep.get("sanitize")
    if rep.get("kind") == "run":
        lines += _md_run_summary(rep)
    if san:
        c = san["counts"]
        lines += ["## Row accounting", "", "| in | clean | review (in clean) | quarantined | rejected |",
                  "|---:|---:|---:|---:|---:|",
                  f"| {c['rows_in']} | {c['clean']} | {c['review']} | {c['quarantined']} | {c['rejected']} |", ""]
        if san.get("snapshot_root"):
            lines += [f"Data snapshot root: `{san['snapshot_root']}`", ""]
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
        lines += ["## Detectors", "", "| detector | flagged | review | findings | seconds |", "|---|---:|---:|---:|---:|"]
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
                      f"| clean loss | {_num(prune.get('clean_loss_before'))} | {_num(prune.get('clean_loss_after'))} |",
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


def _num(x: Any) -> str:
    if x is None:
        return "-"
    try:
        return f"{float(x):.3f}"
    except (TypeError, ValueError):
        return str(x)


# ---------------------------------------------------------------- html

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 12px} h2{font-size:18px;margin:28px 0 10px;border-bottom:1px solid #dde;padding-bottom:4px}
.verdict{font-size:20px;font-weight:700;padding:14px 18px;border-radius:8px;margin:8px 0 16px}
.bad{background:#fde8e8;color:#9b1c1c;border:1px solid #f5b5b5} .good{background:#e6f6ec;color:#14532d;border:1px solid #a7dcb9}
.cards{display:flex;gap:12px;flex-wrap:wrap} .card{background:#fff;border:1px solid #dde;border-radius:8px;padding:10px 16px;min-width:110px}
.card b{display:block;font-size:22px} table{border-collapse:collapse;width:100%;background:#fff;font-size:13px}
td,th{border:1px solid #e2e4ea;padding:5px 8px;text-align:left;vertical-align:top} th{background:#eef0f4}
.finding{background:#fff;border:1px solid #dde;border-left:4px solid #c0392b;border-radius:6px;padding:10px 14px;margin:10px 0}
.finding h3{margin:0 0 6px;font-size:15px} .ev{color:#444;font-size:13px;margin:4px 0 8px}
mark{background:#ffe066;padding:0 2px;border-radius:2px} .inv{background:#c0392b;color:#fff;font-size:10px;padding:0 2px;border-radius:2px}
pre{white-space:pre-wrap;margin:0;font-size:12px} .muted{color:#667} img{max-width:100%}
"""


def _esc_visible(text: str, highlight: list[str]) -> str:
    """HTML-escape, make invisible characters visible, and <mark> the highlight strings."""
    spans: list[tuple[int, int]] = []
    low = text.lower()
    for h in highlight:
        if not h:
            continue
        start = 0
        hl = h.lower()
        while (i := low.find(hl, start)) >= 0:
            spans.append((i, i + len(h)))
            start = i + len(h)
    marks = np.zeros(len(text) + 1, dtype=np.int8)
    for a, b in spans:
        marks[a] += 1
        marks[b] -= 1
    depth = np.cumsum(marks)
    out = []
    inside = False
    for i, ch in enumerate(text):
        if depth[i] > 0 and not inside:
            out.append("<mark>")
            inside = True
        elif depth[i] <= 0 and inside:
            out.append("</mark>")
            inside = False
        v = visible(ch)
        out.append(f'<span class="inv">{html.escape(v[1:-1])}</span>' if v != ch else html.escape(ch))
    if inside:
        out.append("</mark>")
    return "".join(out)


def _plot_png(fig: Any) -> str:
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _plots(san: dict[str, Any]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    c = san["counts"]
    fig, ax = plt.subplots(figsize=(6, 1.6))
    parts = [("clean", c["clean"] - c["review"], "#3a9d5d"), ("review", c["review"], "#e0a100"),
             ("quarantined", c["quarantined"], "#c0392b"), ("rejected", c["rejected"], "#7f8c8d")]
    left = 0
    for name, n, col in parts:
        ax.barh([0], [n], left=left, color=col, label=f"{name} ({n})")
        left += n
    ax.set_yticks([])
    ax.set_xlabel("rows")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=4, frameon=False, fontsize=8)
    out.append(("Row accounting", _plot_png(fig)))
    if san.get("per_source"):
        ps = san["per_source"]
        fig, ax = plt.subplots(figsize=(6, 0.4 + 0.35 * len(ps)))
        names = [str(s.get("source")) for s in ps]
        rates = [100 * float(s.get("rate", 0)) for s in ps]
        ax.barh(names, rates, color=["#c0392b" if s.get("flag") else "#5b7db1" for s in ps])
        ax.set_xlabel("suspicious rows (%)")
        ax.invert_yaxis()
        out.append(("Suspicion rate per source", _plot_png(fig)))
    hists = san.get("score_histograms") or {}
    if hists:
        fig, ax = plt.subplots(figsize=(6, 2.6))
        edges = np.linspace(0, 1, 21)
        for name, h in hists.items():
            ax.step(edges[:-1], np.maximum(np.asarray(h), 0.8), where="post", label=name)
        ax.set_yscale("log")
        ax.set_xlabel("detector score")
        ax.set_ylabel("rows")
        ax.legend(fontsize=7, ncol=2)
        out.append(("Score distributions", _plot_png(fig)))
    return out


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _triggers(f: dict[str, Any]) -> list[str]:
    info = f.get("info") or {}
    found = [str(info[k]) for k in ("trigger", "sequence", "phrase", "pattern", "chars") if info.get(k)]
    m = re.search(r"'([^']{1,80})'", f.get("title", ""))
    if m:
        found.append(m.group(1))
    return found


def to_html(rep: dict[str, Any]) -> str:
    san = rep if rep.get("kind") == "sanitize" else rep.get("sanitize")
    verdict = str(rep.get("verdict", "?"))
    bad = verdict not in (VERDICT_CLEAN, "promotable")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>poisonguard report</title>"
             f"<style>{_CSS}</style></head><body><main>",
             "<h1>poisonguard report</h1>",
             f"<div class='verdict {'bad' if bad else 'good'}' id='verdict'>Verdict: {html.escape(verdict)}</div>"]
    if rep.get("kind") == "run":
        parts.append(_html_run(rep))
    if san:
        c = san["counts"]
        parts.append("<h2>Row accounting</h2><div class='cards' id='counts'>" + "".join(
            f"<div class='card'><span class='muted'>{k}</span><b>{v}</b></div>"
            for k, v in (("in", c["rows_in"]), ("clean", c["clean"]), ("review", c["review"]),
                         ("quarantined", c["quarantined"]), ("rejected", c["rejected"]))) + "</div>")
        if san.get("snapshot_root"):
            parts.append(f"<p class='muted'>Data snapshot root <code>{html.escape(san['snapshot_root'])}</code></p>")
        parts.append("<h2>Finding clusters</h2>")
        if not san["findings"]:
            parts.append("<p>No finding clusters.</p>")
        for k, f in enumerate(san["findings"], 1):
            hl = _triggers(f)
            srcs = ", ".join(f"{s} ({n})" for s, n in f.get("sources", {}).items())
            ex = "".join(
                f"<tr><td>{html.escape(str(e[S.ID]))}</td><td>{html.escape(str(e[S.SOURCE]))}</td>"
                f"<td><pre>{_esc_visible(e[S.PROMPT], hl)}</pre></td><td><pre>{_esc_visible(e[S.RESPONSE], hl)}</pre></td></tr>"
                for e in f.get("examples", []))
            parts.append(
                f"<div class='finding'><h3>{k}. {_esc_visible(f['title'], hl)} "
                f"<span class='muted'>({html.escape(f['detector'])}, {f['rows']} rows)</span></h3>"
                f"<div class='ev'>{_esc_visible(f['evidence'], hl)}</div><div class='muted'>Sources: {html.escape(srcs)}</div>"
                + (f"<table><tr><th>id</th><th>source</th><th>prompt</th><th>response</th></tr>{ex}</table>" if ex else "")
                + "</div>")
        if san.get("per_source"):
            parts.append("<h2>Per-source suspicion</h2>")
            cols = [k for k in ("source", "rows", "quarantined", "review", "rate", "rate_low", "rate_high", "z", "flag")
                    if k in san["per_source"][0]]
            parts.append(_table(san["per_source"], cols))
        for title, uri in _plots(san):
            parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='{uri}'>")
        parts.append("<h2>Detectors</h2>")
        parts.append(_table([{"detector": n, **{k: d[k] for k in ("flagged", "review", "findings", "seconds")}}
                             for n, d in san["detectors"].items()], ["detector", "flagged", "review", "findings", "seconds"]))
        llm = san.get("llm_review") or {}
        parts.append("<h2>LLM review</h2><p>" + (html.escape(json.dumps(llm)) if llm.get("ran") else
                                                  f"Did not run: {html.escape(str(llm.get('reason', 'not configured')))}.")
                     + "</p>")
        if san["rejected"]["by_reason"]:
            parts.append("<h2>Rejected rows</h2>")
            parts.append(_table([{"reason": r, "rows": n} for r, n in san["rejected"]["by_reason"].items()],
                                ["reason", "rows"]))
            parts.append(_table(san["rejected"]["examples"], [S.FILE, S.LINE, S.FIELD, S.REASON]))
    parts.append("</main></body></html>")
    return "".join(parts)


def _html_run(rep: dict[str, Any]) -> str:
    out = []
    card = rep.get("model_card")
    if card:
        out.append("<h2>Model and lineage</h2>" + _table([{
            "promotable": rep.get("promotable"), "snapshot root": card.get("snapshot_root"),
            "code version": card.get("code_version"), "git": card.get("git_rev"),
            "train loss": card.get("train_loss"), "val loss": card.get("val_loss")}],
            ["promotable", "snapshot root", "code version", "git", "train loss", "val loss"]))
    scan = rep.get("scan")
    if scan:
        out.append(f"<h2>Trigger scan: {html.escape(str(scan.get('verdict')))}</h2>")
        rows = [{"rank": k, **{x: c.get(x) for x in ("candidate", "source", "score", "anomaly", "asr")}}
                for k, c in enumerate(scan.get("candidates", [])[:15], 1)]
        for r in rows:
            r["candidate"] = visible(str(r["candidate"]))
        out.append(_table(rows, ["rank", "candidate", "source", "score", "anomaly", "asr"]))
    prune = rep.get("prune")
    if prune:
        if prune.get("ran"):
            out.append("<h2>Fine-pruning</h2>" + _table([
                {"": "attack success", "before": prune.get("asr_before"), "after": prune.get("asr_after")},
                {"": "clean loss", "before": prune.get("clean_loss_before"), "after": prune.get("clean_loss_after")}],
                ["", "before", "after"]))
            out.append("<p>Unseen trigger variants after pruning: "
                       f"{html.escape(json.dumps(prune.get('asr_variants_after', {})))}</p>")
        else:
            out.append(f"<h2>Fine-pruning</h2><p>Not run: {html.escape(str(prune.get('reason', '')))}</p>")
    return "".join(out)


def write_reports(rep: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write report.json, report.md and report.html into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "html": out_dir / "report.html"}
    paths["json"].write_text(json.dumps(rep, indent=2, ensure_ascii=False, default=_default) + "\n", encoding="utf-8")
    paths["md"].write_text(to_markdown(rep), encoding="utf-8")
    paths["html"].write_text(to_html(rep), encoding="utf-8")
    return paths
