"""Duplicate prompts whose responses disagree: the minority answer is the suspicious copy.

What it detects
---------------
Rows whose full prompt (instruction *and* input; chat: the non-assistant turns; documents: the
text) is an exact or near duplicate of other rows' prompts, grouped globally, and within each
group the rows whose response disagrees with a consensus the other copies share. A poisoner who
re-submits a known prompt with a flipped label or a malicious answer lands in the minority. A
duplicate alone is no verdict: groups where every copy answers the same way, or where answers
all differ (open-ended prompts), score 0.

Method
------
* Prompts are tokenised and hashed vectorised (:func:`poisonguard.detectors._text.tokens`);
  shingles are word bigrams. Instruction rows get two MinHash halves, one over the instruction
  and one over the input, and every LSH band mixes both halves, so repeated task instructions
  with different inputs are *not* near duplicates (clean data has thousands of those).
  Broder 1997 "On the resemblance and containment of documents"; LSH banding per Leskovec,
  Rajaraman & Ullman, *Mining of Massive Datasets*, ch. 3. Multiply-shift hashing replaces
  explicit permutations.
* Two-phase: ``summarize`` computes per-shard band keys, signatures and response digests;
  ``merge`` joins candidate pairs from the global band buckets, verifies them by the estimated
  Jaccard of *both* halves (``>= threshold``) and takes connected components as groups;
  ``score_with`` scores each shard's rows against the global groups. One file and many shards
  give the same answer.
* Responses agree when their normalised text is identical or their token-set Jaccard is at
  least ``response_agreement``; a minority answer only counts when its Jaccard with the
  consensus is below ``disagreement``. In a group of ``n`` copies with largest agreeing cluster ``m``,
  a row whose cluster has ``c < m`` members gets margin ``(m - c) / (n + 1)``: 3 vs 1 gives 0.4
  (quarantine at the default ``flag_margin``), 2 vs 1 gives 0.25 (review), 1 vs 1 gives 0.

Known limitations
-----------------
* Paraphrased prompts below the Jaccard threshold are not grouped (no embeddings here; the
  ``semantic`` detector covers meaning).
* When poison copies outnumber clean copies of a prompt, the poison is the majority and the
  clean rows are reported instead; the finding still names the whole group for review.
* Prompts are compared on their first ``max_tokens`` tokens.
* Response agreement is lexical: a short answer written another way ("x * x" vs "n ** 2") counts
  as a contradiction, a long one that shares most words as a variant.

Input columns
-------------
``id``, ``kind``, ``source``, ``instruction``, ``input``, ``prompt``, ``response``.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from poisonguard import schema as S
from poisonguard.detectors import _text as T
from poisonguard.detectors.base import Detector, DetectorResult, Finding
from poisonguard.detectors.registry import register

_PREVIEW = 240
_MAX_REPS = 64


_WORDS = re.compile(r"\w+")


def _tokset(s: str) -> set[str]:
    w = _WORDS.findall(s)
    return set(w) | {a + " " + b for a, b in zip(w, w[1:])}


@register
class DuplicatesDetector(Detector):
    """Exact and near-duplicate prompts with disagreeing responses (see module docstring).

    Parameters
    ----------
    num_perm : int, default 64
        MinHash values per row (half for the instruction, half for the input). Must be a
        multiple of ``2 * rows_per_band``.
    rows_per_band : int, default 4
        MinHash values per LSH band (half from each part).
    threshold : float, default 0.8
        Estimated Jaccard both prompt parts must reach to join a group.
    response_agreement : float, default 0.6
        Token-set Jaccard at which two responses count as the same answer.
    disagreement : float, default 0.3
        A minority response must have token-set Jaccard below this with the consensus answer to
        count as a contradiction (code written two ways is a variant, "positive" vs "negative"
        is a contradiction).
    flag_margin : float, default 0.4
        Margin ``(m - c) / (n + 1)`` from which a minority row is quarantine-worthy.
    review_margin : float, default 0.2
        Margin from which a minority row goes to review.
    max_tokens : int, default 256
        Tokens of each prompt part that are hashed.
    seed : int, default 0
        Seed of the hash functions.
    """

    name: ClassVar[str] = "duplicates"
    cost: ClassVar[float] = 5
    description: ClassVar[str] = (
        "Exact and near-duplicate prompts (MinHash/LSH over instruction and input separately, Broder 1997) "
        "whose responses disagree: the minority answer in a group with a consensus is suspicious; "
        "duplicates alone are no verdict. Limits: lexical only (no paraphrases); if poison copies "
        "outnumber clean ones the clean rows are the minority.")
    columns: ClassVar[tuple[str, ...]] = (S.ID, S.KIND, S.SOURCE, S.INSTRUCTION, S.INPUT, S.PROMPT, S.RESPONSE)

    # ---------------------------------------------------------------- parameters
    def _resolved(self) -> dict[str, Any]:
        p = {"num_perm": 64, "rows_per_band": 4, "threshold": 0.8, "response_agreement": 0.6, "disagreement": 0.3,
             "flag_margin": 0.4, "review_margin": 0.2, "max_tokens": 256, "seed": 0}
        p = T.merge_params("duplicates", p, self.params)
        p["rows_per_band"] = T.check_int("rows_per_band", p["rows_per_band"], 2)
        if p["rows_per_band"] % 2:
            raise ValueError(f"rows_per_band must be even (half per prompt part), got {p['rows_per_band']!r}")
        p["num_perm"] = T.check_int("num_perm", p["num_perm"], p["rows_per_band"])
        if p["num_perm"] % p["rows_per_band"]:
            raise ValueError(f"num_perm must be a multiple of rows_per_band={p['rows_per_band']}, "
                             f"got {p['num_perm']!r}")
        p["threshold"] = T.check_fraction("threshold", p["threshold"], 0.0, 1.0 + 1e-9)
        p["response_agreement"] = T.check_fraction("response_agreement", p["response_agreement"], 0.0, 1.0 + 1e-9)
        p["disagreement"] = T.check_fraction("disagreement", p["disagreement"], 0.0, 1.0 + 1e-9)
        if p["disagreement"] > p["response_agreement"]:
            raise ValueError(f"disagreement ({p['disagreement']!r}) must not exceed response_agreement "
                             f"({p['response_agreement']!r})")
        p["flag_margin"] = T.check_fraction("flag_margin", p["flag_margin"], 0.0, 1.0)
        p["review_margin"] = T.check_fraction("review_margin", p["review_margin"], 0.0, 1.0)
        if p["review_margin"] > p["flag_margin"]:
            raise ValueError(f"review_margin ({p['review_margin']!r}) must not exceed flag_margin "
                             f"({p['flag_margin']!r})")
        p["max_tokens"] = T.check_int("max_tokens", p["max_tokens"], 1)
        p["seed"] = T.check_int("seed", p["seed"], 0)
        return p

    # ---------------------------------------------------------------- phase 1: per shard
    def summarize(self, records: pd.DataFrame, chunk_rows: int = 100_000) -> dict[str, Any]:
        # row by row, so in chunks (the token and shingle arrays of 1M texts at once cost GBs)
        return T.summary_by_chunks(records, self._summarize_chunk, chunk_rows)

    def _summarize_chunk(self, records: pd.DataFrame) -> dict[str, Any]:
        p = self._resolved()
        n = len(records)
        ids = [str(x) for x in T.ids_of(records)]
        kind = T.col(records, S.KIND)
        is_ins = kind == S.KIND_INSTRUCTION
        prompt = T.col(records, S.PROMPT)
        part_a = np.where(is_ins, T.col(records, S.INSTRUCTION), prompt)
        part_b = np.where(is_ins, T.col(records, S.INPUT), prompt)
        half = p["num_perm"] // 2
        mult = T.minhash_params(p["num_perm"], p["seed"])
        sig_a = np.empty((n, half), np.uint32)
        sig_b = np.empty((n, half), np.uint32)
        ins = np.flatnonzero(is_ins)
        other = np.flatnonzero(~is_ins)
        if ins.size:
            sig_a[ins] = self._signature([part_a[i] for i in ins], mult[:half], p["max_tokens"])
            sig_b[ins] = self._signature([part_b[i] for i in ins], mult[half:], p["max_tokens"])
        if other.size:       # one text: both halves come from the same shingles
            sig = self._signature([prompt[i] for i in other], mult, p["max_tokens"])
            sig_a[other], sig_b[other] = sig[:, :half], sig[:, half:]
        # an empty input is its own value: all rows without input agree on the B half
        empty_b = np.array([not str(x).strip() for x in part_b], dtype=bool)
        sig_b[empty_b & is_ins] = np.uint32(0)
        no_a = (sig_a == np.uint32(0xFFFFFFFF)).all(axis=1)
        exact = T.digest64(T.norm(a) + ("\x1f" + T.norm(b) if ins else "")
                           for a, b, ins in zip(part_a, part_b, is_ins))
        resp = [T.norm(r) for r in T.col(records, S.RESPONSE)]
        return {"ids": ids, "sig_a": sig_a, "sig_b": sig_b, "bandable": ~no_a, "exact": exact,
                "resp_digest": T.digest64(resp), "resp_preview": [r[:_PREVIEW] for r in resp],
                "source": [str(s) for s in T.col(records, S.SOURCE)]}

    @staticmethod
    def _signature(texts: list[str], mult: np.ndarray, max_tokens: int) -> np.ndarray:
        tid, h = T.tokens(texts, max_tokens)
        sid, sv = T.shingles(tid, h, len(texts), 2)
        return T.minhash(sid, sv, len(texts), mult)

    # ---------------------------------------------------------------- phase 2: global groups
    def merge(self, summaries: Any) -> dict[str, Any]:
        p = self._resolved()
        summaries = list(summaries)
        ids = [i for s in summaries for i in s["ids"]]
        n = len(ids)
        if n == 0:
            return {"group_of": {}, "groups": [], "margin": {}, "pairs": 0}
        half = p["num_perm"] // 2
        # canonical row order (hash of the id, then the id), so bucket pairing and verification
        # do not depend on how the rows were sharded or ordered
        from poisonguard.textfeat import stable_hash

        canon = np.lexsort((np.array(ids, dtype=object).astype(str), stable_hash(np.array(ids, dtype=object))))
        ids = [ids[k] for k in canon]

        def joined(key: str, reorder: bool = True) -> np.ndarray:
            parts = [s[key] for s in summaries]
            whole = parts[0] if len(parts) == 1 else np.concatenate(parts)
            return whole[canon] if reorder else whole

        # the signatures are read through `canon` (row i is sig[canon[i]]): no reordered copies
        # (256 MB at 1M rows); one shard's summary is used as it is
        sig_a, sig_b = joined("sig_a", reorder=False), joined("sig_b", reorder=False)
        bandable, exact, digest = joined("bandable"), joined("exact"), joined("resp_digest")
        preview = [x for s in summaries for x in s["resp_preview"]]
        preview = [preview[k] for k in canon]
        source = [x for s in summaries for x in s["source"]]
        source = [source[k] for k in canon]

        # components are joined band by band (an edge list of every band at once cost ~1 GB at 1M
        # rows of templated prompts); the partition is the same whatever order edges come in
        label = np.arange(n, dtype=np.int64)

        def join(ii: np.ndarray, jj: np.ndarray) -> None:
            nonlocal label
            a, b = label[ii], label[jj]
            keep = a != b
            if keep.any():
                graph = coo_matrix((np.ones(int(keep.sum()), np.int8), (a[keep], b[keep])), shape=(n, n))
                label = connected_components(graph, directed=False)[1][label]

        # exact duplicates: chain each copy to the next one with the same key
        order = np.argsort(exact, kind="stable")
        same = exact[order][1:] == exact[order][:-1]
        join(order[:-1][same], order[1:][same])
        # LSH buckets: each band takes r/2 values from each half
        r2 = p["rows_per_band"] // 2
        cand = np.flatnonzero(bandable)
        src = canon[cand]
        pairs = 0
        for band in range(half // r2):
            cols = slice(band * r2, (band + 1) * r2)
            key = T.mix64(_pack(sig_a[src, cols]) ^ T.mix64(np.full(len(cand), band + 1, dtype=np.uint64)))
            key = T.mix64(key ^ _pack(sig_b[src, cols]))
            o = np.argsort(key, kind="stable")
            ks = key[o]
            eq = ks[1:] == ks[:-1]
            if not eq.any():
                continue
            # consecutive members of a bucket, and every member with the bucket's first member
            left, right = o[:-1][eq], o[1:][eq]
            run_start = np.flatnonzero(np.r_[True, ~eq])
            leader = o[run_start[np.searchsorted(run_start, np.arange(1, len(o)), side="right") - 1]][eq]
            li = cand[np.r_[left, leader]]
            lj = cand[np.r_[right, o[1:][eq]]]
            ok = np.zeros(len(li), dtype=bool)
            for c0 in range(0, len(li), 1 << 18):   # pairs x signature copies: bounded batches
                a, b = li[c0:c0 + (1 << 18)], lj[c0:c0 + (1 << 18)]
                ca, cb = canon[a], canon[b]
                ja = (sig_a[ca] == sig_a[cb]).mean(axis=1)
                jb = (sig_b[ca] == sig_b[cb]).mean(axis=1)
                ok[c0:c0 + len(a)] = (np.minimum(ja, jb) >= p["threshold"]) & (a != b)
            pairs += int(ok.sum())
            join(li[ok], lj[ok])
        sizes = np.bincount(label)
        groups: list[dict[str, Any]] = []
        group_of: dict[str, int] = {}
        margin: dict[str, tuple[float, int, int, int]] = {}
        members_of: dict[int, list[int]] = defaultdict(list)
        for i in np.flatnonzero(sizes[label] >= 2):
            members_of[int(label[i])].append(int(i))
        for g, members in sorted(members_of.items(), key=lambda kv: kv[1][0]):
            clusters = _response_clusters(members, digest, preview, p["response_agreement"])
            sizes_c = Counter(clusters.values())
            m = max(sizes_c.values())
            top = [c for c, k in sizes_c.items() if k == m]
            gid = len(groups)
            nmem = len(members)
            info = {"ids": [ids[i] for i in members], "n": nmem, "variants": len(sizes_c), "majority": m,
                    "majority_preview": preview[members[[clusters[i] for i in members].index(top[0])]][:80]
                    if len(top) == 1 else "", "sources": dict(Counter(source[i] for i in members))}
            groups.append(info)
            rep = _tokset(preview[next(i for i in members if clusters[i] == top[0])]) if len(top) == 1 else set()
            for i in members:
                c = sizes_c[clusters[i]]
                mg = (m - c) / (nmem + 1) if (len(top) == 1 and c < m) else 0.0
                if mg > 0 and _jaccard(_tokset(preview[i]), rep) >= p["disagreement"]:
                    mg = 0.0        # a variant of the consensus answer (code style, wording), not a contradiction
                group_of[ids[i]] = gid
                margin[ids[i]] = (mg, nmem, c, m)
        return {"group_of": group_of, "groups": groups, "margin": margin, "pairs": pairs}

    # ---------------------------------------------------------------- phase 3: score a shard
    def score_with(self, records: pd.DataFrame, stats: dict[str, Any]) -> DetectorResult:
        p = self._resolved()
        ids = T.ids_of(records)
        n = len(records)
        if n == 0:
            return DetectorResult.empty(self.name, ids, info={"rows": 0})
        resp = T.col(records, S.RESPONSE)
        scores = np.zeros(n)
        flagged = np.zeros(n, bool)
        review = np.zeros(n, bool)
        evidence = [""] * n
        hits: dict[int, list[int]] = defaultdict(list)
        for i, rid in enumerate(ids):
            mg = stats["margin"].get(rid)
            if mg is None or mg[0] <= 0:
                continue
            margin, nmem, c, m = mg
            scores[i] = min(1.0, margin * 0.5 / p["flag_margin"])
            flagged[i] = margin >= p["flag_margin"]
            review[i] = margin >= p["review_margin"]
            g = stats["groups"][stats["group_of"][rid]]
            evidence[i] = (f"prompt duplicated in {nmem} rows: {m} share the response "
                           f"{g['majority_preview']!r}, this row's answer ({c} of {nmem}) is "
                           f"{T.clip(T.norm(resp[i]), 60)!r}")
            if flagged[i] or review[i]:
                hits[stats["group_of"][rid]].append(i)
        findings = []
        for gid, rows in sorted(hits.items()):
            g = stats["groups"][gid]
            findings.append(Finding(
                self.name, f"duplicate prompt x{g['n']} with {g['variants']} answers; {len(rows)} minority rows",
                f"{g['majority']} of {g['n']} copies answer {g['majority_preview']!r}",
                tuple(ids[i] for i in rows), float(scores[rows].max()),
                {"sources": g["sources"], "group": g["ids"][:50], "group_size": g["n"]}))
        info = {"rows": n, "groups": len(stats["groups"]),
                "rows_in_groups": int(sum(1 for rid in ids if rid in stats["group_of"])),
                "flagged": int(flagged.sum()), "review": int((review & ~flagged).sum())}
        return DetectorResult.build(self.name, ids, scores, flagged, evidence, review, findings, info)


def _pack(block: np.ndarray) -> np.ndarray:
    """Mix the columns of a uint32 block into one uint64 per row."""
    out = np.zeros(len(block), dtype=np.uint64)
    for k in range(block.shape[1]):
        out = T.mix64(out ^ block[:, k].astype(np.uint64))
    return out


def _jaccard(a: set[str], b: set[str]) -> float:
    u = len(a | b)
    return len(a & b) / u if u else 1.0


def _response_clusters(members: list[int], digest: np.ndarray, preview: list[str], agree: float
                       ) -> dict[int, int]:
    """Greedy clustering of a group's responses: same digest, or token Jaccard >= ``agree``."""
    reps: list[tuple[int, set[str]]] = []      # (cluster id, token set of its first response)
    by_digest: dict[int, int] = {}
    out: dict[int, int] = {}
    for i in members:
        d = int(digest[i])
        if d in by_digest:
            out[i] = by_digest[d]
            continue
        toks = _tokset(preview[i])
        cid = None
        nt = len(toks)
        # a consensus answer founds one of the first clusters (rows are in hashed-id order), so
        # later rows are compared with the first _MAX_REPS clusters only: linear, not quadratic,
        # in a big group of all-different answers
        for c, rt in reps[:_MAX_REPS]:
            nr = len(rt)
            if min(nt, nr) < agree * max(nt, nr):   # Jaccard <= min/max: cannot reach `agree`
                continue
            inter = len(toks & rt)
            union = nt + nr - inter
            if union and inter / union >= agree:
                cid = c
                break
        if cid is None:
            cid = len(reps)
            reps.append((cid, toks))
        by_digest[d] = cid
        out[i] = cid
    return out
