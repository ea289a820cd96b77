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
* Two-phase: ``summarize`` computes per-shard signatures, exact-prompt keys and response digests;
  ``merge`` joins candidate pairs from the global band buckets, verifies them by the estimated
  Jaccard of *both* halves (``>= threshold``) and takes connected components as groups;
  ``score_with`` scores each shard's rows against the global groups. One file and many shards
  give the same answer.
* Memory: a summary keeps each distinct signature, response preview and source once, with a
  row -> value index, and ids as a numpy string array (at 1M rows of repeated task instructions
  ~230 MB instead of ~580 MB as per-row arrays and Python strings); the merged statistics keep
  only the rows with a positive margin and the groups they are in.
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
from collections.abc import Callable
from itertools import chain
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from poisonguard import schema as S
from poisonguard.detectors import _text as T
from poisonguard.detectors.base import Detector, DetectorResult, Finding, HandedOver
from poisonguard.detectors.registry import register
from poisonguard.textfeat import combine, offload, ranges, scratch

_PREVIEW = 240
_MAX_REPS = 64


_WORDS = re.compile(r"\w+")


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
    compares_copies: ClassVar[bool] = True     # sees an incremental night's prompt twins
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
        parts = [self._summarize_chunk(chunk) for chunk in T.row_chunks(records, chunk_rows)]
        return _joined(parts or [self._summarize_chunk(records)], canonical=True)

    def _summarize_chunk(self, records: pd.DataFrame) -> dict[str, Any]:
        """One chunk's summary. Signatures, previews and sources are tables of distinct values
        with a row -> table index: at 1M rows of repeated task instructions the per-row
        signatures were 256 MB, the Python strings ~300 MB (see :func:`_joined`)."""
        p = self._resolved()
        n = len(records)
        half = p["num_perm"] // 2
        mult = T.minhash_params(p["num_perm"], p["seed"])
        ids = _strings([str(x) for x in T.ids_of(records)])
        is_ins = T.col(records, S.KIND) == S.KIND_INSTRUCTION
        ins, other = np.flatnonzero(is_ins), np.flatnonzero(~is_ins)
        part_a, part_b = np.empty(n, dtype=object), np.empty(n, dtype=object)
        if ins.size:
            part_a[ins] = _col_at(records, S.INSTRUCTION, ins)
            part_b[ins] = _col_at(records, S.INPUT, ins)
        if other.size:       # one text: both halves come from the same shingles
            part_a[other] = part_b[other] = _col_at(records, S.PROMPT, other)
        # a signature depends on its text only: each distinct text is hashed once (MinHash columns
        # are independent, so half the multipliers give half of a full signature)
        code_a, uniq_a = pd.factorize(part_a)
        code_b, uniq_b = pd.factorize(part_b)
        del part_a, part_b
        sig_a = self._signature(list(uniq_a), mult[:half], p["max_tokens"])
        sig_b = self._signature(list(uniq_b), mult[half:], p["max_tokens"])
        # an empty input is its own value: all rows without input agree on the B half
        row_b = code_b
        empty_b = is_ins & np.array([not str(x).strip() for x in uniq_b], dtype=bool)[code_b]
        if empty_b.any():
            row_b = np.where(empty_b, len(sig_b), code_b)
            sig_b = np.vstack([sig_b, np.zeros((1, half), np.uint32)])
        bandable = ~(sig_a == np.uint32(0xFFFFFFFF)).all(axis=1)[code_a]
        # exact key per distinct (A, B) pair; rows of other kinds have no B part
        nb = len(uniq_b)
        code_ab, uniq_ab = pd.factorize(code_a.astype(np.int64) * (nb + 1) + np.where(is_ins, code_b, nb))
        norm_a, norm_b = [T.norm(a) for a in uniq_a], [T.norm(b) for b in uniq_b]
        exact = T.digest64(norm_a[k // (nb + 1)] + ("\x1f" + norm_b[k % (nb + 1)] if k % (nb + 1) < nb else "")
                           for k in uniq_ab.tolist())[code_ab]
        code_r, uniq_r = pd.factorize(T.col(records, S.RESPONSE))
        resp = [T.norm(r) for r in uniq_r]
        code_s, uniq_s = pd.factorize(T.col(records, S.SOURCE))
        i32 = np.int32     # table indices: half the size of factorize's int64
        return {"ids": ids, "sig_a": sig_a, "sig_a_row": code_a.astype(i32), "sig_b": sig_b,
                "sig_b_row": row_b.astype(i32), "bandable": bandable, "exact": exact,
                "resp_digest": T.digest64(resp)[code_r], "resp_preview": _strings([r[:_PREVIEW] for r in resp]),
                "resp_preview_row": code_r.astype(i32), "source": _strings([str(s) for s in uniq_s]),
                "source_row": code_s.astype(i32)}

    @staticmethod
    def _signature(texts: list[str], mult: np.ndarray, max_tokens: int) -> np.ndarray:
        tid, h = T.tokens(texts, max_tokens)
        sid, sv = T.shingles(tid, h, len(texts), 2)
        return T.minhash(sid, sv, len(texts), mult)

    # ---------------------------------------------------------------- phase 2: global groups
    def merge(self, summaries: Any) -> dict[str, Any]:
        from poisonguard.textfeat import stable_hash, trim_heap

        p = self._resolved()
        parts = list(summaries)
        # a summary handed over (or joined here) is ours: each field is dropped once read
        handed = isinstance(summaries, HandedOver)
        owned = len(parts) > 1 or handed
        # handed-over parts are taken apart as they are joined (one field at a time held twice)
        sm = parts[0] if len(parts) == 1 else _joined(parts, canonical=False, consume=handed)
        del parts
        if handed:
            summaries.clear()
        field = sm.pop if owned else sm.__getitem__
        ids_all = field("ids")
        n = len(ids_all)
        if n == 0:
            return {"members": _strings([]), "minority": {}, "groups": [], "pairs": 0}
        half = p["num_perm"] // 2
        # canonical row order (hash of the id, then the id), so bucket pairing and verification
        # do not depend on how the rows were sharded or ordered
        step = 1 << 17      # ids as Python strings a slice at a time (1M of them: ~70 MB)
        hid = np.concatenate([stable_hash(ids_all[lo:lo + step].astype(object)) for lo in range(0, n, step)])
        canon = np.argsort(hid, kind="stable")
        hs = hid[canon]
        shared_hash = bool((hs[1:] == hs[:-1]).any())
        del hs
        if shared_hash:     # a repeated id (or a hash collision): the id breaks the tie
            canon = np.lexsort((ids_all.astype(object).astype(str), hid))
        del hid

        def row_id(i: int) -> str:
            return str(ids_all[canon[i]])

        # per canonical row: indices into the value tables (signatures are never copied per row)
        # the signature tables (~270 MB at 5M rows) in mapped files in an out-of-core merge
        sig_a, sig_b = offload(field("sig_a")), offload(field("sig_b"))
        ia, ib = field("sig_a_row")[canon], field("sig_b_row")[canon]
        bandable, exact, digest = field("bandable")[canon], field("exact")[canon], field("resp_digest")[canon]
        prev_tab, prev_row = field("resp_preview"), field("resp_preview_row")[canon]
        src_tab, src_row = field("source"), field("source_row")[canon]

        def preview(i: int) -> str:
            return str(prev_tab[prev_row[i]])

        # components are joined band by band (an edge list of every band at once cost ~1 GB at 1M
        # rows of templated prompts); the partition is the same whatever order edges come in
        label = np.arange(n, dtype=np.int32)      # int32: the index arrays of each join at half size

        def join(a: np.ndarray, b: np.ndarray) -> None:
            """Merge the components of labels ``a[k]`` and ``b[k]``."""
            nonlocal label
            keep = a != b
            if keep.any():
                graph = coo_matrix((np.ones(int(keep.sum()), np.int8), (a[keep], b[keep])), shape=(n, n))
                label = connected_components(graph, directed=False)[1][label]

        def close(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            """Rows ``x[k]`` and ``y[k]`` differ and both prompt parts reach the threshold."""
            ok = np.zeros(len(x), dtype=bool)
            for c0 in range(0, len(x), 1 << 16):    # pairs x signature copies: 16 MB batches
                a, b = x[c0:c0 + (1 << 16)], y[c0:c0 + (1 << 16)]
                ja = _agreement(sig_a, ia[a], ia[b])
                jb = _agreement(sig_b, ib[a], ib[b])
                ok[c0:c0 + len(a)] = (np.minimum(ja, jb) >= p["threshold"]) & (a != b)
            return ok

        # exact duplicates: chain each copy to the next one with the same key
        order = np.argsort(exact, kind="stable")
        same = exact[order][1:] == exact[order][:-1]
        join(label[order[:-1][same]], label[order[1:][same]])
        del order, same, exact
        # LSH buckets: each band takes r/2 values from each half
        r2 = p["rows_per_band"] // 2
        cand = np.flatnonzero(bandable)
        ia_c, ib_c = ia[cand], ib[cand]
        del bandable
        pairs = 0
        for band in range(half // r2):
            # each band's arrays (~100 MB at 1M rows) go back to the OS before the next band's
            trim_heap()
            cols = slice(band * r2, (band + 1) * r2)
            key = T.mix64(_pack(sig_a[:, cols])[ia_c] ^ T.mix64(np.full(1, band + 1, dtype=np.uint64)))
            key = T.mix64(key ^ _pack(sig_b[:, cols])[ib_c])
            o = np.argsort(key, kind="stable")
            ks = key[o]
            eq = ks[1:] == ks[:-1]
            del key, ks
            if not eq.any():
                continue
            # every member with the one before it in its bucket, and with the bucket's first member
            # (each pair list verified and labelled on its own: no joined copies of both)
            run_start = np.flatnonzero(np.r_[True, ~eq])
            right = cand[o[1:][eq]]
            left = cand[o[:-1][eq]]
            leader = cand[o[run_start[np.cumsum(~eq)[eq]]]]
            del o, eq, run_start
            ends_a, ends_b = [], []
            for first in (left, leader):
                ok = close(first, right)
                pairs += int(ok.sum())
                ends_a.append(label[first[ok]])
                ends_b.append(label[right[ok]])
            del left, leader, right, first, ok
            join(np.concatenate(ends_a), np.concatenate(ends_b))
            del ends_a, ends_b
        del cand, ia_c, ib_c, ia, ib, sig_a, sig_b
        trim_heap()
        # groups (components of 2+ rows) in order of their first row, members in row order
        rows = np.flatnonzero(np.bincount(label)[label] >= 2)
        rows = rows[np.argsort(label[rows], kind="stable")]
        starts = np.flatnonzero(np.r_[True, label[rows][1:] != label[rows][:-1]]) if len(rows) else rows
        ends = np.r_[starts[1:], len(rows)]
        by_first = np.argsort(rows[starts], kind="stable")
        del label
        groups: list[dict[str, Any] | None] = []
        # only rows with a positive margin are scored; the other group members are only counted
        minority: dict[str, tuple[float, int, int, int, int]] = {}
        cluster, sets = _response_clusters(rows, starts, ends, digest, prev_row, preview, p["response_agreement"])
        mg = _margins(starts, ends, cluster, sets, p["disagreement"])
        margin, c_size = mg["margin"], mg["c"]
        for g in by_first.tolist():
            lo, hi = int(starts[g]), int(ends[g])
            gid = len(groups)
            nmem, m = hi - lo, int(mg["m"][g])
            hit = False
            for k in (range(lo, hi) if shared_hash else (lo + np.flatnonzero(margin[lo:hi] > 0)).tolist()):
                if margin[k] > 0:
                    minority[row_id(int(rows[k]))] = (float(margin[k]), nmem, int(c_size[k]), m, gid)
                    hit = True
                else:   # a repeated id: its last row decides, as in a dict of all rows
                    minority.pop(row_id(int(rows[k])), None)
            if not hit:
                groups.append(None)     # never read by score_with: no row of it has a margin
                continue
            # a finding names the first 50 members
            cons = int(mg["consensus"][g])
            groups.append({"ids": [row_id(int(i)) for i in rows[lo:min(hi, lo + 50)]], "n": nmem,
                           "variants": int(mg["variants"][g]), "majority": m,
                           "majority_preview": preview(int(rows[cons]))[:80] if cons >= 0 else "",
                           "sources": dict(Counter(str(src_tab[src_row[i]]) for i in rows[lo:hi].tolist()))})
        members_ids = ids_all[canon[rows]] if len(rows) else _strings([])
        return {"members": members_ids, "minority": minority, "groups": groups, "pairs": pairs}

    # ---------------------------------------------------------------- phase 3: score a shard
    def score_with(self, records: pd.DataFrame, stats: dict[str, Any]) -> DetectorResult:
        p = self._resolved()
        ids = T.ids_of(records)
        n = len(records)
        if n == 0:
            return DetectorResult.empty(self.name, ids, info={"rows": 0})
        minority = stats["minority"]
        scores = np.zeros(n)
        flagged = np.zeros(n, bool)
        review = np.zeros(n, bool)
        evidence = [""] * n
        hits: dict[int, list[int]] = defaultdict(list)
        scored = [(i, minority[rid]) for i, rid in enumerate(ids) if rid in minority]
        # responses of the scored rows only (1M as Python strings: ~170 MB)
        resp = _col_at(records, S.RESPONSE, np.array([i for i, _ in scored], dtype=np.int64))
        for (i, (margin, nmem, c, m, gid)), r in zip(scored, resp):
            scores[i] = min(1.0, margin * 0.5 / p["flag_margin"])
            flagged[i] = margin >= p["flag_margin"]
            review[i] = margin >= p["review_margin"]
            g = stats["groups"][gid]
            evidence[i] = (f"prompt duplicated in {nmem} rows: {m} share the response "
                           f"{g['majority_preview']!r}, this row's answer ({c} of {nmem}) is "
                           f"{T.clip(T.norm(r), 60)!r}")
            if flagged[i] or review[i]:
                hits[gid].append(i)
        findings = []
        for gid, rows in sorted(hits.items()):
            g = stats["groups"][gid]
            findings.append(Finding(
                self.name, f"duplicate prompt x{g['n']} with {g['variants']} answers; {len(rows)} minority rows",
                f"{g['majority']} of {g['n']} copies answer {g['majority_preview']!r}",
                tuple(ids[i] for i in rows), float(scores[rows].max()),
                {"sources": g["sources"], "group": g["ids"][:50], "group_size": g["n"]}))
        del scored, resp
        members = stats["members"]      # ids of all grouped rows (~10 MB at 1M rows; as a dict ~100 MB)
        in_groups = int(ids.isin(members.astype(object)).sum()) if len(members) else 0
        info = {"rows": n, "groups": len(stats["groups"]), "rows_in_groups": in_groups,
                "flagged": int(flagged.sum()), "review": int((review & ~flagged).sum())}
        return DetectorResult.build(self.name, ids, scores, flagged, evidence, review, findings, info)


def _pack(block: np.ndarray) -> np.ndarray:
    """Mix the columns of a uint32 block into one uint64 per row."""
    out = np.zeros(len(block), dtype=np.uint64)
    for k in range(block.shape[1]):
        out = T.mix64(out ^ block[:, k].astype(np.uint64))
    return out


_STR = np.dtypes.StringDType()
# value table -> its per-row index, in a summary
_TABLES = {"sig_a": "sig_a_row", "sig_b": "sig_b_row", "resp_preview": "resp_preview_row", "source": "source_row"}


def _strings(values: list[str]) -> np.ndarray:
    """Strings as a numpy ``StringDType`` array: UTF-8 in 16-byte cells, no object per string
    (1M ids: ~15 MB, as Python ``str`` ~70 MB). An object array when one is not UTF-8 encodable
    (a lone surrogate)."""
    try:
        return np.array(values, dtype=_STR)
    except UnicodeEncodeError:
        return np.array(values, dtype=object)


def _col_at(records: pd.DataFrame, name: str, rows: np.ndarray) -> np.ndarray:
    """:func:`T.col` of the rows at ``rows`` (ascending) only. Read a block of rows at a time: a
    take from a whole Arrow string column first joins its chunks (a 120 MB copy at 1M rows)."""
    if len(rows) == len(records):
        return T.col(records, name)
    if name not in records.columns or not len(rows):
        return T.col(records[[]].iloc[rows], name)
    column = records[name]
    out = np.empty(len(rows), dtype=object)
    step = 1 << 16
    cuts = np.searchsorted(rows, np.arange(0, len(records) + step, step))
    for lo, a, b in zip(range(0, len(records), step), cuts[:-1], cuts[1:]):
        if b > a:
            out[a:b] = T.col(column.iloc[lo:lo + step].iloc[rows[a:b] - lo].to_frame(), name)
    return out


def _joined(parts: list[dict[str, Any]], canonical: bool, consume: bool = False) -> dict[str, Any]:
    """Summaries of consecutive row ranges as one: per-row arrays stacked, value tables stacked with
    their row indices shifted. ``canonical``: parts this call owns, and each table deduplicated and
    ordered by first use, so any chunking gives the same summary. The parts are emptied as they are
    joined when ``canonical`` or ``consume``."""
    from poisonguard.textfeat import trim_heap

    consume = consume or canonical
    out: dict[str, Any] = {}
    for k in list(parts[0]):
        if k in _TABLES or k in _TABLES.values():
            continue
        vals = [q.pop(k) if consume else q[k] for q in parts]
        out[k] = vals[0] if len(vals) == 1 else _concat(vals)
        del vals
        if consume and not canonical:   # a merge's join: each field's parts go back before the next
            trim_heap()
    if canonical:
        trim_heap()
    for k, kr in _TABLES.items():
        tabs = [q.pop(k) if consume else q[k] for q in parts]
        shift = np.cumsum([0] + [len(t) for t in tabs])
        codes = [q.pop(kr) if consume else q[kr] for q in parts]
        dt = np.int32 if shift[-1] < 2 ** 31 else np.int64
        code = codes[0] if len(codes) == 1 else np.concatenate([c.astype(dt) + dt(s) for c, s in zip(codes, shift)])
        del codes
        if canonical:
            out[k], out[kr] = _canonical(tabs, shift, code)
            trim_heap()     # the parts' tables and the hashing's garbage (~200 MB at 1M rows otherwise)
        else:
            out[k], out[kr] = (tabs[0] if len(tabs) == 1 else _concat(tabs)), code
    return out


def _concat(vals: list[np.ndarray]) -> np.ndarray:
    if any(v.dtype == object for v in vals) and not all(v.dtype == object for v in vals):
        vals = [v.astype(object) for v in vals]
    return np.concatenate(vals)


def _take(pieces: list[np.ndarray | None], shift: np.ndarray, idx: np.ndarray, consume: bool = False
          ) -> np.ndarray:
    """``concatenate(pieces)[idx]`` without the concatenation (0.5M previews: ~100 MB); ``consume``
    drops each piece once read."""
    from poisonguard.textfeat import trim_heap

    dtype = object if any(q.dtype == object for q in pieces if q is not None) else pieces[0].dtype
    out = np.empty((len(idx),) + pieces[0].shape[1:], dtype=dtype)
    where = np.searchsorted(shift, idx, side="right") - 1
    for k in range(len(pieces)):
        at = np.flatnonzero(where == k)
        if at.size:
            out[at] = pieces[k][idx[at] - shift[k]]
        if consume:     # its memory back before the next piece's strings are copied
            pieces[k] = None
            trim_heap()
    return out


def _canonical(tabs: list[np.ndarray | None], shift: np.ndarray, code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The value tables ``tabs`` (joined: rows ``shift[k]:shift[k+1]`` are ``tabs[k]``) as one
    without repeated values (rows of 2-d tables), in order of first use by ``code``, and ``code``
    re-pointed at it (int32); ``tabs`` is emptied. Values are grouped by a hash and checked equal (a
    sort of 0.5M previews held ~280 MB); on a collision, or strings that are not UTF-8, sorted."""
    from poisonguard.textfeat import trim_heap

    step = 1 << 16
    cls = None
    if all(q.dtype != object for q in tabs):
        if tabs[0].ndim == 2:
            h = np.concatenate([_pack(q) for q in tabs])
        else:
            h = np.concatenate([np.zeros(0, np.uint64)] + [pd.util.hash_array(q[lo:lo + step].astype(object),
                                                                              categorize=False)
                                                           for q in tabs for lo in range(0, len(q), step)])
        cls = pd.factorize(h)[0]
        del h
        first = np.unique(cls, return_index=True)[1]
        trim_heap()
        # each value that repeats an earlier hash must repeat its value
        again = np.flatnonzero(first[cls] != np.arange(len(cls)))
        for lo in range(0, len(again), step):
            at = again[lo:lo + step]
            if not np.array_equal(_take(tabs, shift, at), _take(tabs, shift, first[cls[at]])):
                cls = None
                break
        del again
    if cls is None:
        whole = _concat(tabs)
        tabs[:] = [whole]
        shift = np.array([0, len(whole)])
        first, cls = np.unique(whole, axis=0 if whole.ndim == 2 else None, return_index=True,
                               return_inverse=True)[1:]
        del whole
    code, used = pd.factorize(cls.reshape(-1)[code])
    sel = first[used]
    del cls, first, used
    trim_heap()     # the hash tables' garbage, before the table is copied
    return _take(tabs, shift, sel, consume=True), code.astype(np.int32)


def _agreement(tab: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Fraction of equal values of table rows ``x`` and ``y`` (pairwise); the same row is 1."""
    out = np.ones(len(x))
    d = np.flatnonzero(x != y)
    if d.size:
        out[d] = (tab[x[d]] == tab[y[d]]).mean(axis=1)
    return out


_JACCARD_PAIRS = 1 << 16        # pairs per block of :meth:`_PositionSets.jaccard`
_FOUNDER_TOKENS = 1 << 22       # tokens (of whole groups) per call of :func:`_founders_batched`
_TOKSET_TEXTS = 1 << 15         # texts per block of :func:`_tokset_hashes`


def _tokset_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every text's token set, its words (``_WORDS``) and word bigrams, as 64-bit hashes:
    ``(indptr, tokens)``, each text's tokens unique (``tokens[indptr[k]:indptr[k + 1]]``, in no
    particular order). A bigram hashes as the ordered pair of its words' hashes (words hold no
    space, so distinct strings stay distinct up to 64-bit collisions). A block of texts at a time
    (each text's set is its own: the Python word lists of all texts at once were 2.5 GB at 1M rows),
    each block's tokens written into one :func:`scratch` array (a mapped file in an out-of-core
    merge; ~1 GB of tokens at 5M rows) sized by a bound, no more tokens than characters (words are
    separated, so ``w`` words in ``c`` characters have ``w <= (c + 1) / 2`` and ``2w - 1 <= c``
    words and bigrams): the pages past the end are never written, so never held in memory, but a
    mapped file reserves its whole size on the spill disk until the merge ends (8 bytes per
    character: 3-6x the tokens written, on the demo's and on English answers)."""
    if len(texts) > _TOKSET_TEXTS:
        indptr = np.zeros(len(texts) + 1, dtype=np.int64)
        out = scratch(sum(map(len, texts)), np.uint64)
        at = 0
        for lo in range(0, len(texts), _TOKSET_TEXTS):
            ptr, tok = _tokset_hashes(texts[lo:lo + _TOKSET_TEXTS])
            indptr[lo + 1:lo + len(ptr)] = at + ptr[1:]
            out[at:at + len(tok)] = tok
            at += len(tok)
        return indptr, out[:at]
    words = [_WORDS.findall(s) for s in texts]
    lens = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    flat = np.array(list(chain.from_iterable(words)), dtype=object)
    del words
    h = pd.util.hash_array(flat, categorize=True).astype(np.uint64) if len(flat) else np.zeros(0, np.uint64)
    row = np.repeat(np.arange(len(texts), dtype=np.int64), lens)
    nxt = np.flatnonzero(row[1:] == row[:-1])
    tok = np.concatenate([h, combine(h[nxt], h[nxt + 1])])
    row = np.concatenate([row, row[nxt]])
    order = np.argsort(row, kind="stable")
    tok, row = tok[order], row[order]
    # a text's repeated words and bigrams once (a hash table, no sort: the rows stay in order)
    keep = ~pd.Series(combine(tok, row.astype(np.uint64)), copy=False).duplicated().to_numpy()
    tok, row = tok[keep], row[keep]
    indptr = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=len(texts)), out=indptr[1:])
    return indptr, tok


def _response_clusters(rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, digest: np.ndarray,
                       prev_row: np.ndarray, preview: Callable[[int], str], agree: float
                       ) -> tuple[np.ndarray, _PositionSets]:
    """Cluster of each row's response within its group (groups: ``rows[starts[g]:ends[g]]``,
    members in row order): in member order, a response joins the first of the first ``_MAX_REPS``
    clusters whose first response it agrees with, else founds a cluster (rows are in hashed-id
    order, so a consensus answer founds one of the first clusters: linear, not quadratic, in a big
    group of all-different answers). Vectorised (tests compare it with that rule on Python sets):

    Rows with the same digest share their first row's cluster without being compared. The first
    row of each digest is tokenised (:func:`_tokset_hashes`, once per distinct preview); then
    founder by founder: a group's next founder is its first row no earlier founder took, and
    every later row still free that agrees with it (token Jaccard >= ``agree``) joins it. That is
    the one-by-one greedy's partition (a row only ever meets founders that precede it). After
    ``_MAX_REPS`` founders every free row is its own cluster. Groups of up to ``_BATCH`` distinct
    answers go through these steps all at once, with their intersections from one block-diagonal
    product; a bigger group takes its steps alone, one product with the founder's column each.
    Also returns the token sets, by position in ``rows`` (:class:`_PositionSets`)."""
    n = len(rows)
    out = np.zeros(n, dtype=np.int64)
    none = _PositionSets(np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.uint64), np.full(n, -1, dtype=np.int64))
    if n == 0:
        return out, none
    g = np.repeat(np.arange(len(starts)), ends - starts)
    d = digest[rows]
    order = np.lexsort((np.arange(n), d, g))
    run_start = np.ones(n, dtype=bool)
    run_start[1:] = (g[order][1:] != g[order][:-1]) | (d[order][1:] != d[order][:-1])
    run_first = order[run_start]
    first_of = np.empty(n, dtype=np.int64)
    first_of[order] = run_first[np.cumsum(run_start) - 1]      # each member's first row of its digest
    firsts = np.sort(run_first)                               # group by group, in member order
    distinct = np.bincount(g[firsts], minlength=len(starts))
    sel = firsts[distinct[g[firsts]] >= 2]
    if not len(sel):
        return out, none
    # token sets of the compared rows, as CSR (one tokenisation per distinct preview)
    values, slot = np.unique(prev_row[rows[sel]], return_inverse=True)
    one = np.zeros(len(values), dtype=np.int64)
    one[slot[::-1]] = rows[sel][::-1]
    vptr, vtok = _tokset_hashes([preview(int(i)) for i in one])
    # the compared rows' token sets are taken from the distinct previews' a part at a time (a copy
    # per compared row of all of them at once: 340 MB at 1M rows)
    lens = vptr[slot + 1] - vptr[slot]
    sg = g[sel]
    cid = np.full(len(sel), -1, dtype=np.int64)
    small = distinct[sg] <= _BATCH
    if small.any():
        # whole groups at a time, about _FOUNDER_TOKENS tokens each (groups are independent; all at
        # once held every compared row's (group, token) columns: 0.5 GB at 1M rows)
        idx = np.flatnonzero(small)
        gs, cum = sg[idx], np.cumsum(lens[idx])
        lo = 0
        while lo < len(idx):
            hi = max(lo + 1, int(np.searchsorted(cum, (cum[lo - 1] if lo else 0) + _FOUNDER_TOKENS, side="right")))
            hi = int(np.searchsorted(gs, gs[hi - 1], side="right"))     # to the end of that group
            part = idx[lo:hi]
            cid[part] = _founders_batched(sg[part], _rows_of(vptr, vtok, slot[part]), lens[part], agree)
            lo = hi
    for grp in np.unique(sg[~small]).tolist():
        idx = np.flatnonzero(sg == grp)
        cid[idx] = _founders(_rows_of(vptr, vtok, slot[idx]), lens[idx], agree)
    per_first = np.zeros(n, dtype=np.int64)
    per_first[sel] = cid
    slot_of = np.full(n, -1, dtype=np.int64)
    slot_of[sel] = slot
    return per_first[first_of], _PositionSets(vptr, vtok, slot_of[first_of])


class _PositionSets:
    """Token sets (:func:`_tokset_hashes`) per distinct preview, and each position's set (-1: its
    group was not compared, one answer only)."""

    def __init__(self, ptr: np.ndarray, toks: np.ndarray, set_of: np.ndarray) -> None:
        self.ptr, self.toks, self.set_of = ptr, toks, set_of

    def jaccard(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Token Jaccard of the sets of positions ``a[k]`` and ``b[k]`` (two empty sets: 1.0), all
        pairs at once: a pair's shared tokens are the repeats of
        (pair, token) among both sets' tokens."""
        if len(a) > _JACCARD_PAIRS:     # pairs are independent: a block of them at a time (all at once
            # held the (pair, token) arrays of every pair: 1.2 GB at 1M rows)
            return np.concatenate([self.jaccard(a[lo:lo + _JACCARD_PAIRS], b[lo:lo + _JACCARD_PAIRS])
                                   for lo in range(0, len(a), _JACCARD_PAIRS)])
        sa, sb = self.set_of[a], self.set_of[b]
        if (sa < 0).any() or (sb < 0).any():
            raise ValueError("a position without a token set")
        la, lb = self.ptr[sa + 1] - self.ptr[sa], self.ptr[sb + 1] - self.ptr[sb]
        pair = np.concatenate([np.repeat(np.arange(len(a)), la), np.repeat(np.arange(len(b)), lb)])
        tok = np.concatenate([self.toks[ranges(self.ptr[sa], la)], self.toks[ranges(self.ptr[sb], lb)]])
        shared = pd.Series(combine(tok, pair.astype(np.uint64)), copy=False).duplicated().to_numpy()
        inter = np.bincount(pair[shared], minlength=len(a)).astype(np.float64)
        union = la + lb - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, inter / union, 1.0)


def _margins(starts: np.ndarray, ends: np.ndarray, cluster: np.ndarray, sets: _PositionSets,
             disagreement: float) -> dict[str, np.ndarray]:
    """Per group (``rows[starts[g]:ends[g]]``, clusters ``cluster``): the largest cluster's size
    ``m``, the number of clusters, the position of the consensus (the first member of the largest
    cluster when it is the only one that large, else -1); per member: its cluster's size ``c`` and
    its margin ``(m - c) / (n + 1)`` (n: the group's size) when the group has one consensus and the
    member is outside it and its answer's token Jaccard with the consensus is below
    ``disagreement``, else 0."""
    sizes = ends - starts
    gpos = np.repeat(np.arange(len(starts)), sizes)
    width = int(cluster.max(initial=0)) + 1
    ukey, inv, cnt = np.unique(gpos * width + cluster, return_inverse=True, return_counts=True)
    c = cnt[inv]
    kg = ukey // width
    m = np.zeros(len(starts), dtype=np.int64)
    np.maximum.at(m, kg, cnt)
    at_max = cnt == m[kg]
    n_top = np.bincount(kg[at_max], minlength=len(starts))
    variants = np.bincount(kg, minlength=len(starts))
    top = np.full(len(starts), -1, dtype=np.int64)
    top[kg[at_max]] = ukey[at_max] % width
    one = n_top == 1
    in_top = one[gpos] & (cluster == top[gpos])
    cons = np.full(len(starts), -1, dtype=np.int64)
    tg, first = np.unique(gpos[in_top], return_index=True)
    cons[tg] = np.flatnonzero(in_top)[first]
    mg = np.zeros(len(cluster), dtype=np.float64)
    out = np.flatnonzero(one[gpos] & (c < m[gpos]))
    mg[out] = (m[gpos[out]] - c[out]) / (sizes[gpos[out]] + 1)
    if len(out):
        variant = sets.jaccard(out, cons[gpos[out]]) >= disagreement
        mg[out[variant]] = 0.0  # a variant of the consensus answer (code style, wording), not a contradiction
    return {"m": m, "variants": variants, "consensus": cons, "c": c, "margin": mg}


_BATCH = 64                     # groups of up to this many distinct answers are clustered together
_DENSE_CELLS = 1 << 22          # incidence matrices up to 4M cells are dense


def _rows_of(ptr: np.ndarray, toks: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR ``(indptr, tokens)`` of rows ``idx`` of CSR ``(ptr, toks)``."""
    lens = ptr[idx + 1] - ptr[idx]
    out = np.zeros(len(idx) + 1, dtype=np.int64)
    np.cumsum(lens, out=out[1:])
    return out, toks[ranges(ptr[idx], lens)]


def _agrees(x: np.ndarray, nt: np.ndarray, nr: np.ndarray, agree: float) -> np.ndarray:
    """Token Jaccard ``x / (nt + nr - x) >= agree`` (sets of sizes ``nt``, ``nr`` sharing ``x``);
    empty sets agree with nothing."""
    union = nt + nr - x
    with np.errstate(divide="ignore", invalid="ignore"):
        return ~(np.minimum(nt, nr) < agree * np.maximum(nt, nr)) & (union > 0) & (x / union >= agree)


def _founders(csr: tuple[np.ndarray, np.ndarray], lens: np.ndarray, agree: float) -> np.ndarray:
    """One group's clusters (see :func:`_response_clusters`), a founder at a time."""
    from scipy.sparse import csr_matrix

    ptr, toks = csr
    k = len(lens)
    vocab, col = np.unique(toks, return_inverse=True)
    if k * len(vocab) <= _DENSE_CELLS:
        m: Any = np.zeros((k, len(vocab)), dtype=np.float32)
        m[np.repeat(np.arange(k), lens), col] = 1.0
    else:
        m = csr_matrix((np.ones(len(col), dtype=np.float32), col, ptr), shape=(k, len(vocab)))
    nf = lens.astype(np.float64)
    cid = np.full(k, -1, dtype=np.int64)
    founders, u = 0, 0
    while u < k and founders < _MAX_REPS:
        cid[u] = founders
        later = u + 1 + np.flatnonzero(cid[u + 1:] < 0)
        if len(later):
            x = m @ m[u].T          # the founder's column (no copy of the rows it is compared with)
            x = np.rint(np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64).ravel())[later]
            cid[later[_agrees(x, nf[later], nf[u], agree)]] = founders
        founders += 1
        free = np.flatnonzero(cid[u + 1:] < 0)
        u = u + 1 + int(free[0]) if len(free) else k
    rest = np.flatnonzero(cid < 0)
    cid[rest] = founders + np.arange(len(rest))
    return cid


def _founders_batched(grp: np.ndarray, csr: tuple[np.ndarray, np.ndarray], lens: np.ndarray,
                      agree: float) -> np.ndarray:
    """Clusters of many small groups at once (``grp``: each row's group, rows group by group in
    member order); the founder steps of :func:`_founders`, every group's at the same time."""
    from scipy.sparse import csr_matrix

    ptr, toks = csr
    r = len(lens)
    # columns are (group, token) pairs: the product of the incidence matrix with its transpose is
    # then block diagonal, one k x k block of intersections per group
    row_of_tok = np.repeat(np.arange(r), lens)
    key_g = grp[row_of_tok]
    o = np.lexsort((toks, key_g))
    new = np.ones(len(o), dtype=bool)
    new[1:] = (toks[o][1:] != toks[o][:-1]) | (key_g[o][1:] != key_g[o][:-1])
    col = np.empty(len(o), dtype=np.int64)
    col[o] = np.cumsum(new) - 1
    m = csr_matrix((np.ones(len(col), dtype=np.float32), col, ptr), shape=(r, int(new.sum())))
    prod = (m @ m.T).tocoo()
    # group offsets, sizes, each row's position in its group, and where each group's block starts
    _, g_start, g_size = np.unique(grp, return_index=True, return_counts=True)
    gi = np.repeat(np.arange(len(g_start)), g_size)
    pos = np.arange(r) - g_start[gi]
    base = np.zeros(len(g_start), dtype=np.int64)
    np.cumsum((g_size * g_size)[:-1], out=base[1:])
    inter = np.zeros(int((g_size * g_size).sum()), dtype=np.float64)
    i, j = prod.row.astype(np.int64), prod.col.astype(np.int64)
    inter[base[gi[i]] + pos[i] * g_size[gi[i]] + pos[j]] = np.rint(prod.data)
    nf = lens.astype(np.float64)
    cid = np.full(r, -1, dtype=np.int64)
    founders = np.zeros(len(g_start), dtype=np.int64)
    fpos = np.zeros(len(g_start), dtype=np.int64)       # each active group's founder position
    active = np.ones(len(g_start), dtype=bool)
    while active.any():
        ga = np.flatnonzero(active)
        f = g_start[ga] + fpos[ga]
        cid[f] = founders[ga]
        cand = np.flatnonzero(active[gi] & (pos > fpos[gi]) & (cid < 0))
        if len(cand):
            cg = gi[cand]
            fr = g_start[cg] + fpos[cg]
            x = inter[base[cg] + pos[cand] * g_size[cg] + fpos[cg]]
            ok = _agrees(x, nf[cand], nf[fr], agree)
            cid[cand[ok]] = founders[cg[ok]]
        founders[ga] += 1
        # next founder: the first free row of each group (none, or _MAX_REPS founders: done)
        active[:] = False
        free = np.flatnonzero(cid < 0)
        fg, first_free = np.unique(gi[free], return_index=True)
        go = founders[fg] < _MAX_REPS
        active[fg[go]] = True
        fpos[fg[go]] = pos[free[first_free[go]]]
    rest = np.flatnonzero(cid < 0)
    if len(rest):       # past _MAX_REPS founders: each free row is its own cluster, in member order
        rg = gi[rest]
        rank = np.arange(len(rest)) - np.searchsorted(rg, rg)
        cid[rest] = founders[rg] + rank
    return cid
