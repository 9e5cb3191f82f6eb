"""The gallery (eval.gallery, eval.gallery_store, eval.vector_index): search against a float64 brute force,
open-set calibration, add / remove / reload, crash safety under SIGKILL, snapshots, locking, damaged files.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from eval import gallery_store as S
from eval import vector_index as V
from eval.gallery import Gallery, Segment, threshold_at_fpir
from sphereface_plus.errors import InputFileError, ToolkitError, UsageError

REPO = Path(__file__).resolve().parents[1]
HAVE_FAISS = V.faiss_module() is not None
if HAVE_FAISS:  # one OpenMP thread: on a busy shared machine faiss's spinning threads run 10x slower
    V.faiss_module().omp_set_num_threads(1)
KINDS = ["exact", "hnsw", "ivfpq"] if HAVE_FAISS else ["exact"]


def rows(seed: int, n: int, people: int, d: int = 24, prefix: str = "p"):
    """``n`` random vectors of ``people`` identities (each identity's vectors near a centre)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((people, d))
    who = np.arange(n) % people
    x = centres[who] + 0.6 * rng.standard_normal((n, d))
    return x, [f"{prefix}{i}" for i in who]


def brute_force(vectors, identities, probes, k):
    """Per probe: the k best identities (max cosine over their vectors), best first, in float64."""
    v = np.asarray(vectors, np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    q = np.asarray(probes, np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    names = sorted(set(identities))
    ident = np.array([names.index(i) for i in identities])
    best = np.full((q.shape[0], len(names)), -np.inf)
    for j, s in enumerate((q @ v.T).T):
        best[:, ident[j]] = np.maximum(best[:, ident[j]], s)
    out = []
    for row in best:
        order = np.argsort(-row, kind="stable")[:k]
        out.append([(names[o], row[o]) for o in order])
    return out


def assert_same_results(results, reference, atol=2e-6):
    assert len(results) == len(reference)
    for got, ref in zip(results, reference):
        assert [m["identity"] for m in got["matches"]] == [r[0] for r in ref]
        np.testing.assert_allclose([m["score"] for m in got["matches"]], [r[1] for r in ref], atol=atol)


@pytest.fixture
def no_faiss(monkeypatch):
    monkeypatch.setattr(V, "_faiss", None)
    monkeypatch.setattr(V, "_faiss_checked", True)


# --------------------------------------------------------------------------- search and calibration


def test_exact_search_equals_brute_force(tmp_path):
    x, ids = rows(0, 700, 120)
    probes = rows(1, 60, 120)[0] + 0.3 * np.random.default_rng(2).standard_normal((60, 24))
    g = Gallery.create(tmp_path / "g", x, ids, index="exact")
    assert g.index.backend == "numpy" and g.manifest["index"]["kind"] == "exact"
    for k in (1, 5, 120, 200):  # 200 > identities: every identity, once
        res = g.search(probes, k)
        assert_same_results(res, brute_force(x, ids, probes, min(k, 120)))
    # the decision: the best identity above the stored threshold, else unknown
    t = g.threshold
    assert t is not None
    for r in g.search(probes, 3):
        assert r["decision"] == (r["matches"][0]["identity"] if r["score"] > t else "unknown")
    # a reopened snapshot searches alike
    assert_same_results(Gallery.open(tmp_path / "g").search(probes, 5), brute_force(x, ids, probes, 5))


@pytest.mark.skipif(not HAVE_FAISS, reason="faiss-cpu is not installed")
def test_faiss_flat_index_finds_what_the_numpy_one_finds():
    faiss = V.faiss_module()
    rng = np.random.default_rng(19)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    q = rng.standard_normal((40, 32)).astype(np.float32)
    flat = V.FaissIndex("exact", faiss.IndexIDMap2(faiss.IndexFlatIP(32)), {})
    ours = V.NumpyExactIndex(32)
    for index in (flat, ours):
        index.add(x, np.arange(3000) + 10)
    (s1, i1), (s2, i2) = flat.search(q, 8), ours.search(q, 8)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-4)
    assert flat.remove(np.arange(10, 20)) == 10 and len(flat) == 2990 and flat.to_bytes() is None


@pytest.mark.parametrize("kind", V.INDEX_KINDS)
def test_every_kind_names_the_settings_it_takes(kind):
    for n in (2, 3000, 10 ** 8):
        assert tuple(V.default_params(kind, n, 512)) == V.INDEX_PARAMS[kind]


def test_numpy_exact_index_matches_float64_and_breaks_ties_by_id():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1000, 16)).astype(np.float32)
    x[500] = x[10]  # an exact tie: the smaller id first
    ids = np.arange(1000) * 7 + 3
    q = np.vstack([x[10], rng.standard_normal((9, 16))]).astype(np.float32)
    index = V.NumpyExactIndex(16, block_elements=1500)  # many blocks: the running top-k is exercised
    index.add(x[:600], ids[:600])
    index.add(x[600:], ids[600:])
    s, i = index.search(q, 7)
    ref = q.astype(np.float64) @ x.T.astype(np.float64)
    order = np.argsort(-ref, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(i, ids[order])
    np.testing.assert_allclose(s, np.take_along_axis(ref, order, 1), atol=1e-5)
    assert i[0, 0] == ids[10] and i[0, 1] == ids[500]
    s, i = index.search(q, 1200)  # more than held: padded
    assert (i[:, 1000:] == -1).all() and np.isneginf(s[:, 1000:]).all()


@pytest.mark.skipif(not HAVE_FAISS, reason="faiss-cpu is not installed")
@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_index_scores_are_exact_and_recall_is_reported(tmp_path, kind):
    x, ids = rows(4, 2000, 300, d=32)
    probes = x[:80] + 0.2 * np.random.default_rng(5).standard_normal((80, 32))
    g = Gallery.create(tmp_path / "g", x, ids, index=kind)
    rec = g.manifest["index"]["recall"]
    assert rec["queries"] == 1000 and 0 <= rec["recall_at_1"] <= 1 and rec["k"] == 10
    vn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = probes / np.linalg.norm(probes, axis=1, keepdims=True)
    ref = brute_force(x, ids, probes, 5)
    hits = 0
    for i, r in enumerate(g.search(probes, 5)):
        for m in r["matches"]:  # every score is the exact cosine of the vector it names
            row = int(m["source"].split()[1])
            assert ids[row] == m["identity"]
            assert m["score"] == pytest.approx(float(qn[i] @ vn[row]), abs=2e-6)
        hits += r["matches"][0]["identity"] == ref[i][0][0]
    assert hits / len(probes) >= (0.97 if kind == "hnsw" else 0.8)
    # the recall figure is the gallery's own search against exact, measured independently here
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(x), size=1000, replace=False))
    exact = V.NumpyExactIndex(32)
    exact.add(vn.astype(np.float32), np.arange(len(x)))
    again = V.recall_against_exact(g.search_vectors, exact.search, vn[pick].astype(np.float32), pick, 10)
    assert again["recall_at_1"] == pytest.approx(rec["recall_at_1"])


def test_threshold_is_calibrated_on_held_out_identities(tmp_path):
    x, ids = rows(6, 900, 300)
    g = Gallery.create(tmp_path / "g", x, ids, index="exact", fpir=0.05)
    # reference: each identity's first vector against every other identity's vectors, float64
    v = x / np.linalg.norm(x, axis=1, keepdims=True)
    ids_arr = np.array(ids)
    nonmated = []
    for name in sorted(set(ids)):
        first = np.flatnonzero(ids_arr == name)[0]
        nonmated.append(np.max((v[ids_arr != name] @ v[first])))
    s = np.sort(nonmated)[::-1]
    assert g.manifest["calibration"]["searches"] == 300
    assert g.threshold == pytest.approx(s[int(np.floor(0.05 * 300))], abs=2e-6)
    assert np.mean(np.asarray(nonmated) > g.threshold + 1e-6) <= 0.05  # (float32 scores in the gallery)
    assert threshold_at_fpir(np.array([0.9, 0.8, 0.7, 0.1]), 0.25)["threshold"] == pytest.approx(0.8)


def test_embeddings_are_normalised_block_by_block():
    from eval.gallery import normalise_embeddings

    x = np.random.default_rng(23).standard_normal((7, 5)) * 100
    ref = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(normalise_embeddings(x, block=3), ref, atol=1e-7)
    x[5] = np.nan
    with pytest.raises(InputFileError, match="row 5"):
        normalise_embeddings(x, block=3)


def test_one_identity_has_no_threshold_and_matches_everything(tmp_path, caplog):
    x, ids = rows(7, 5, 1)
    with caplog.at_level(logging.WARNING):
        g = Gallery.create(tmp_path / "g", x, ids)
    assert g.threshold is None and "no threshold" in caplog.text
    assert [r["decision"] for r in g.search(-x, 1)] == ["p0"] * 5
    assert [r["decision"] for r in g.search(-x, 1, threshold=0.0)] == ["unknown"] * 5


def test_identification_report_and_gallery_agree_on_rank_1():
    """IJB 1:N (brute force through the same kernel) and an exact gallery rank the same mates first."""
    from eval.ijb_1n import identification_report

    rng = np.random.default_rng(8)
    gal = rng.standard_normal((50, 16))
    gal /= np.linalg.norm(gal, axis=1, keepdims=True)
    probe_subjects = rng.integers(0, 70, 200)
    probes = np.where(probe_subjects[:, None] < 50, gal[np.minimum(probe_subjects, 49)], 0) \
        + 0.9 * rng.standard_normal((200, 16))
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    rep = identification_report(probes, probe_subjects, gal, np.arange(50), fpirs=(0.1,), ranks=(1,))
    seg = Segment({}, gal.astype(np.float32), np.arange(50), [str(i) for i in range(50)], np.arange(50),
                  [f"row {i}" for i in range(50)])
    g = Gallery("in-memory", {"dim": 16, "calibration": {}}, [seg])  # the search, not the storage, is compared
    top = np.array([int(r["matches"][0]["identity"]) for r in g.search(probes, 1, check_model=False)])
    mated = probe_subjects < 50
    assert rep["rank"]["1"] == pytest.approx(np.mean(top[mated] == probe_subjects[mated]))


# --------------------------------------------------------------------------- add, remove, reload


@pytest.mark.parametrize("kind", KINDS)
def test_add_remove_reload_round_trip(tmp_path, kind):
    x, ids = rows(9, 600, 100)
    more, more_ids = rows(10, 90, 30, prefix="q")
    more_ids[:10] = ["p1"] * 10  # more rows of a known identity
    probes = rows(11, 40, 100)[0]
    g = Gallery.create(tmp_path / "g", x, ids, index=kind)
    g = g.add(more, more_ids)
    g = g.remove(["p1", "q3"])
    keep = [i for i, n in enumerate(ids + more_ids) if n not in ("p1", "q3")]
    all_x = np.vstack([x, more])[keep]
    all_ids = [(ids + more_ids)[i] for i in keep]
    reopened = Gallery.open(tmp_path / "g")
    assert reopened.manifest["version"] == 3 and reopened.num_vectors == len(keep)
    assert "p1" not in reopened.names and "q3" not in reopened.names
    ref = brute_force(all_x, all_ids, probes, 5)
    res = reopened.search(probes, 5)
    assert res == g.search(probes, 5)  # the stored index is the one the writer held
    if kind == "exact":
        assert_same_results(res, ref)
    else:  # approximate: the top identity mostly agrees, and no score exceeds the identity's true best
        agree = np.mean([r["matches"][0]["identity"] == f[0][0] for r, f in zip(res, ref)])
        assert agree >= {"hnsw": 0.9, "ivfpq": 0.6}[kind]
        best = [dict(f) for f in brute_force(all_x, all_ids, probes, 200)]
        for i, r in enumerate(res):
            assert all(m["score"] <= best[i][m["identity"]] + 2e-6 for m in r["matches"])
    # nothing on disk holds a removed vector any more
    removed = np.vstack([x, more])[[i for i, n in enumerate(ids + more_ids) if n in ("p1", "q3")]]
    removed = (removed / np.linalg.norm(removed, axis=1, keepdims=True)).astype("<f4")
    blob = b"".join(p.read_bytes() for p in (tmp_path / "g" / S.DATA).iterdir())
    assert not any(r.tobytes() in blob for r in removed)
    assert sorted(p.name for p in (tmp_path / "g" / S.DATA).iterdir()) == sorted(S.referenced_files(g.manifest))
    assert not (tmp_path / "g" / S.JOURNAL).exists()


def test_iter_rows_gives_every_stored_row(tmp_path):
    x, ids = rows(20, 250, 25)
    g = Gallery.create(tmp_path / "g", x[:200], ids[:200]).add(x[200:], ids[200:]).remove(["p3"])
    got = list(Gallery.open(tmp_path / "g").iter_rows(batch=64))
    vid = np.concatenate([b["vector_id"] for b in got])
    keep = [i for i, n in enumerate(ids) if n != "p3"]
    np.testing.assert_array_equal(np.sort(vid), np.array(keep))  # vector ids are the enrolment order
    order = np.argsort(vid)
    names = [n for b in got for n in b["identity"]]
    vectors = np.concatenate([b["vector"] for b in got])
    assert [names[i] for i in order] == [ids[i] for i in keep] and g.num_vectors == len(keep)
    np.testing.assert_allclose(vectors[order], x[keep] / np.linalg.norm(x[keep], axis=1, keepdims=True), atol=1e-6)


def test_many_adds_merge_segments(tmp_path, monkeypatch):
    import eval.gallery_writer as W

    monkeypatch.setattr(W, "MAX_SEGMENTS", 3)
    x, ids = rows(12, 60, 12)
    g = Gallery.create(tmp_path / "g", x[:10], ids[:10])
    for a in range(10, 60, 10):
        g = g.add(x[a:a + 10], ids[a:a + 10])
        assert len(g.manifest["segments"]) <= 3
    assert_same_results(Gallery.open(tmp_path / "g").search(x[:7], 4), brute_force(x, ids, x[:7], 4))


def test_inputs_are_checked_before_anything_is_written(tmp_path):
    x, ids = rows(13, 50, 10)
    g = Gallery.create(tmp_path / "g", x, ids)
    before = folder_digest(tmp_path / "g")
    bad = x[:3].copy()
    bad[1] = 0
    cases = [(lambda: g.add(bad, ids[:3]), "zero or not finite"),
             (lambda: g.add(x[:3], ids[:2]), "2 identities for 3 embeddings"),
             (lambda: g.add(x[:3, :10], ids[:3]), "10-d"),
             (lambda: g.add(x[:3], ["a", "", "b"]), "identity 2 is empty"),
             (lambda: g.remove(["p1", "nobody"]), "no identity 'nobody'"),
             (lambda: g.search(x[:2], 0), "--top-k"),
             (lambda: Gallery.create(tmp_path / "g", x, ids), "already holds a gallery")]
    for call, text in cases:
        with pytest.raises(ToolkitError, match=text):
            call()
    assert folder_digest(tmp_path / "g") == before


def folder_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != S.LOCK}


# --------------------------------------------------------------------------- crash safety


ADD = """
import sys
import numpy as np
sys.path.insert(0, {repo!r})
from eval.gallery import Gallery
g = Gallery.open(sys.argv[1])
rng = np.random.default_rng(int(sys.argv[2]))
print("ready", flush=True)
g.add(rng.standard_normal((40, 24)), ["new%d" % (i % 7) for i in range(40)])
print("done", flush=True)
"""


def run_add(folder, seed, fault=None, **popen):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop(S.FAULT_ENV, None)
    if fault:
        env[S.FAULT_ENV] = fault
    return subprocess.Popen([sys.executable, "-c", ADD.format(repo=str(REPO)), str(folder), str(seed)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def state(folder):
    g = Gallery.open(folder)
    probes = rows(99, 12, 30)[0]
    return g.manifest["version"], g.num_vectors, g.names, [(r["decision"], [m["identity"] for m in r["matches"]],
                                                            [round(m["score"], 5) for m in r["matches"]])
                                                           for r in g.search(probes, 3)]


@pytest.fixture(scope="module")
def crash_states(tmp_path_factory):
    """A gallery per index kind and its state before and after the add the crash tests interrupt."""
    out = {}
    for kind in ("exact", "hnsw") if HAVE_FAISS else ("exact",):
        base = tmp_path_factory.mktemp(f"crash-{kind}")
        x, ids = rows(14, 300, 30)
        Gallery.create(base / "before", x, ids, index=kind)
        shutil.copytree(base / "before", base / "after")
        p = run_add(base / "after", 0)
        assert p.wait(60) == 0, p.stderr.read()
        out[kind] = (base / "before", state(base / "before"), state(base / "after"))
    return out


def check_recovers(folder, before, after, caplog, expect=None):
    """The gallery reopens as exactly ``before`` or ``after``, says which, and a writer then cleans up."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        now = state(folder)
    assert now in (before, after)
    which = "before" if now == before else "after"
    if expect:
        assert which == expect
    journal = (folder / S.JOURNAL).exists()
    if journal:
        said = "interrupted before it committed" if which == "before" else "had committed before it was interrupted"
        assert said in caplog.text and f"is as {which} it" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        g = Gallery.open(folder).remove(["p0"])  # the next writer finishes or rolls back, and says so
    if journal:
        assert "leftover file(s) removed" in caplog.text
    assert sorted(p.name for p in (folder / S.DATA).iterdir()) == sorted(S.referenced_files(g.manifest))
    assert not (folder / S.JOURNAL).exists() and not list(folder.rglob(".*.tmp"))
    return which


POINTS = [("journal", "before"), ("segment", "before"), ("index", "before"), ("commit", "before"),
          ("committed", "after"), ("cleanup", "after")]


@pytest.mark.parametrize("point,expect", POINTS)
def test_sigkill_at_each_step_of_add(tmp_path, crash_states, caplog, point, expect):
    for kind, (source, before, after) in crash_states.items():
        if point == "index" and kind == "exact":
            continue  # an exact gallery stores no index file
        folder = tmp_path / kind
        shutil.copytree(source, folder)
        p = run_add(folder, 0, fault=f"{point}:kill")
        assert p.wait(60) == -signal.SIGKILL
        assert check_recovers(folder, before, after, caplog, expect) == expect


def test_sigkill_at_random_moments_of_add(tmp_path, crash_states, caplog):
    source, before, after = crash_states["hnsw" if HAVE_FAISS else "exact"]
    shutil.copytree(source, tmp_path / "timed")
    p = run_add(tmp_path / "timed", 0, fault="*:sleep=0.03")  # every step a little longer, so kills spread
    assert p.stdout.readline().strip() == "ready"
    t0 = time.perf_counter()
    assert p.wait(60) == 0
    duration = time.perf_counter() - t0
    rng = np.random.default_rng(2024)
    seen = set()
    n = 14
    for seed in range(n):
        folder = tmp_path / f"s{seed}"
        shutil.copytree(source, folder)
        p = run_add(folder, 0, fault="*:sleep=0.03")
        assert p.stdout.readline().strip() == "ready"
        time.sleep(duration * (seed + rng.uniform()) / n)  # one random moment in each n-th of the add
        p.send_signal(signal.SIGKILL)
        p.wait(60)
        seen.add(check_recovers(folder, before, after, caplog))
    assert seen == {"before", "after"}  # the kills landed on both sides of the commit


def test_search_reads_a_snapshot_while_add_runs(tmp_path, crash_states):
    source, before, after = crash_states["exact"]
    folder = tmp_path / "g"
    shutil.copytree(source, folder)
    p = run_add(folder, 0, fault="commit:sleep=3")
    assert p.stdout.readline().strip() == "ready"
    deadline = time.time() + 30
    while not (folder / S.DATA / "seg-000002-0.rows.npz").exists():  # the new segment is written ...
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.02)
    assert state(folder) == before  # ... but not committed: readers see the old version, whole
    with pytest.raises(UsageError, match="another gallery writer"):  # and a second writer is refused
        Gallery.open(folder).remove(["p1"])
    assert p.wait(60) == 0
    assert state(folder) == after


def test_a_write_that_fails_is_rolled_back_at_once(tmp_path, monkeypatch):
    import errno

    x, ids = rows(21, 80, 10)
    g = Gallery.create(tmp_path / "g", x, ids, index="hnsw" if HAVE_FAISS else "exact")
    before = folder_digest(tmp_path / "g")
    probes = x[:5]
    expected = g.search(probes, 3)

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(S, "write_blob", full_disk)  # the segment's vectors are written, its rows are not
    with pytest.raises(OSError):
        g.add(x[:4] + 1, ["z"] * 4)
    monkeypatch.undo()
    assert folder_digest(tmp_path / "g") == before and not (tmp_path / "g" / S.JOURNAL).exists()
    assert g.search(probes, 3) == expected  # the snapshot in hand is whole (its index was not touched)
    assert g.add(x[:4] + 1, ["z"] * 4).num_vectors == 84


def test_a_manifest_naming_files_outside_the_gallery_is_refused(tmp_path):
    x, ids = rows(22, 30, 5)
    Gallery.create(tmp_path / "g", x, ids)
    m = S.read_manifest(tmp_path / "g")
    m["segments"][0]["vectors"]["name"] = "../../etc/passwd"
    S.commit_manifest(tmp_path / "g", m)  # a well-formed checksum over a crafted content
    with pytest.raises(InputFileError, match="not a plain file name"):
        Gallery.open(tmp_path / "g")


def test_stale_lock_of_a_dead_writer_is_taken_over(tmp_path, caplog):
    x, ids = rows(15, 40, 8)
    Gallery.create(tmp_path / "g", x, ids)
    (tmp_path / "g" / S.LOCK).write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": os.uname().nodename,
                                                     "command": "gallery add", "started": "then"}))
    with caplog.at_level(logging.WARNING):
        g = Gallery.open(tmp_path / "g").remove(["p2"])
    assert "stale lock" in caplog.text and g.manifest["version"] == 2


# --------------------------------------------------------------------------- damaged files and models


@pytest.mark.parametrize("target", ["manifest", "vectors", "rows", "index"])
def test_damaged_file_is_one_error_and_nothing_is_overwritten(tmp_path, target):
    from sphereface_plus.cli import main

    if target == "index" and not HAVE_FAISS:
        pytest.skip("faiss-cpu is not installed")
    x, ids = rows(16, 200, 20)
    np.save(tmp_path / "E.npy", x[:5])
    (tmp_path / "IDS.txt").write_text("a\nb\nc\nd\ne\n")
    g = Gallery.create(tmp_path / "g", x, ids, index="hnsw" if target == "index" else "exact")
    seg = g.manifest["segments"][0]
    path = {"manifest": tmp_path / "g" / S.MANIFEST, "vectors": S.data_path(tmp_path / "g", seg["vectors"]["name"]),
            "rows": S.data_path(tmp_path / "g", seg["rows"]["name"]),
            "index": S.data_path(tmp_path / "g", g.manifest["index"].get("file", {}).get("name", "-"))}[target]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    before = folder_digest(tmp_path / "g")
    for argv in (["gallery", "info", "--gallery", str(tmp_path / "g")],
                 ["gallery", "add", "--gallery", str(tmp_path / "g"), "--embeddings", str(tmp_path / "E.npy"),
                  "--ids", str(tmp_path / "IDS.txt")],
                 ["gallery", "remove", "--gallery", str(tmp_path / "g"), "--id", "p1"]):
        assert main(argv) == 2
    with pytest.raises(InputFileError, match="damaged|sha256"):
        Gallery.open(tmp_path / "g")
    assert folder_digest(tmp_path / "g") == before


def test_probes_of_another_model_are_refused(tmp_path):
    a = {"file": "a.pt", "sha256": "a" * 64, "flip": "concat", "dim": 24, "preprocessing": {"template": "112x96"}}
    b = {**a, "file": "b.pt", "sha256": "b" * 64}
    x, ids = rows(17, 60, 6)
    g = Gallery.create(tmp_path / "g", x, ids, model=a)
    assert g.search(x[:2], 1, model=a)[0]["decision"] == "p0"
    with pytest.raises(UsageError, match="b.pt .* but gallery .* a.pt"):
        g.search(x[:2], 1, model=b)
    with pytest.raises(UsageError, match="do not say which model"):
        g.search(x[:2], 1)
    with pytest.raises(UsageError, match="b.pt"):
        g.add(x[:2], ["z", "z"], model=b)
    with pytest.raises(UsageError, match="flip"):
        g.search(x[:2], 1, model={**a, "flip": "sum"})
    assert g.search(x[:2], 1, model={**a, "flip": None})  # declared with --checkpoint: flip unknown, sha256 matches


def test_without_faiss_every_kind_is_exact_numpy_with_one_hint(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(V, "_faiss", None)
    monkeypatch.setattr(V, "_faiss_checked", False)
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    x, ids = rows(18, 100, 10)
    with caplog.at_level(logging.WARNING):
        g = Gallery.create(tmp_path / "g", x, ids, index="hnsw")
    assert caplog.text.count("pip install faiss-cpu") == 1
    assert g.manifest["index"]["kind"] == "exact" and g.index.backend == "numpy"
    assert_same_results(g.search(x[:5], 3), brute_force(x, ids, x[:5], 3))
