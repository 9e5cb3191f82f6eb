"""eval.pairs: real LFW pairs.txt, generic pairs files, safe .bin packs, folder pairs on real AT&T faces."""
from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pytest

from eval import load_bin_pack
from eval.pairs import (
    PairsFormatError,
    folder_pairs,
    pairs_to_arrays,
    parse_lfw_pairs,
    parse_pairs_file,
    save_bin_pack,
)
from sphereface_plus.safe_pickle import UnsafePickleError
from shared_data import ATT, LFW



@pytest.mark.skipif(not (LFW / "pairs.txt").is_file(), reason=f"real LFW pairs.txt not found under {LFW}")
def test_real_lfw_pairs():
    pairs = parse_lfw_pairs(LFW / "pairs.txt")
    assert len(pairs) == 6000
    per_fold = Counter((p.fold, p.same) for p in pairs)
    assert sorted({k for k, _ in per_fold}) == list(range(10))
    assert all(per_fold[(k, s)] == 300 for k in range(10) for s in (True, False))
    # fold of line i (1-based after the header) = ceil(i / 600); matched lines come first in each block
    lines = [ln.split() for ln in (LFW / "pairs.txt").read_text().splitlines()[1:] if ln.strip()]
    for i in (1, 300, 301, 600, 601, 3456, 6000):
        p = pairs[i - 1]
        assert p.fold == -(-i // 600) - 1
        assert p.same == (len(lines[i - 1]) == 3)
    first = lines[0]
    assert pairs[0].path1 == f"{first[0]}/{first[0]}_{int(first[1]):04d}.jpg"
    unique = pairs_to_arrays(pairs)[0]
    assert len(unique) == 7701
    missing = [u for u in unique if not (LFW / "images" / u).is_file()]
    assert missing == []
    # person-disjoint folds
    people = [set() for _ in range(10)]
    for p in pairs:
        people[p.fold].update({p.path1.split("/")[0], p.path2.split("/")[0]})
    assert all(not (people[a] & people[b]) for a in range(10) for b in range(a + 1, 10))


def _lfw_file(tmp_path, body_lines, header="2 1"):
    f = tmp_path / "pairs.txt"
    f.write_text(header + "\n" + "\n".join(body_lines) + "\n")
    return f


def test_lfw_bad_lines_are_named(tmp_path):
    good = ["A 1 2", "A 1 B 3", "C 2 4", "D 1 E 1"]
    assert [p.fold for p in parse_lfw_pairs(_lfw_file(tmp_path, good))] == [0, 0, 1, 1]
    with pytest.raises(PairsFormatError, match=r"pairs.txt:4: expected 3 fields .* got 5"):
        parse_lfw_pairs(_lfw_file(tmp_path, ["A 1 2", "A 1 B 3", "C 2 4 5 6", "D 1 E 1"]))
    with pytest.raises(PairsFormatError, match=r"pairs.txt:2: 'x' is not an image number"):
        parse_lfw_pairs(_lfw_file(tmp_path, ["A 1 x", "A 1 B 3", "C 2 4", "D 1 E 1"]))
    with pytest.raises(PairsFormatError, match="promises 2 folds x 2 pairs = 4 lines, found 3"):
        parse_lfw_pairs(_lfw_file(tmp_path, good[:3]))
    with pytest.raises(PairsFormatError, match="header"):
        parse_lfw_pairs(_lfw_file(tmp_path, good, header="ten 300"))


def test_generic_pairs_tsv_csv_and_folds(tmp_path):
    tsv = tmp_path / "p.tsv"
    rows = [(f"a/{i}.jpg", f"b/{i}.jpg", 1 if i < 8 else 0) for i in range(16)]  # positives listed first
    tsv.write_text("".join(f"{a}\t{b}\t{s}\n" for a, b, s in rows))
    pairs = parse_pairs_file(tsv, num_folds=4)
    assert [p.same for p in pairs] == [bool(s) for _, _, s in rows]
    assert Counter((p.fold, p.same) for p in pairs) == {(k, s): 2 for k in range(4) for s in (True, False)}
    csv = tmp_path / "p.csv"
    csv.write_text("path1,path2,same,fold\n" + "".join(f"{a}, {b}, {'true' if s else 'false'}, {i % 3 + 5}\n"
                                                       for i, (a, b, s) in enumerate(rows)))
    pairs = parse_pairs_file(csv)
    assert [p.fold for p in pairs] == [i % 3 for i in range(16)]
    assert pairs[0].path2 == "b/0.jpg"
    (tmp_path / "bad.tsv").write_text("a.jpg\tb.jpg\t1\nc.jpg\td.jpg\n")
    with pytest.raises(PairsFormatError, match=r"bad.tsv:2: .* got 2 field"):
        parse_pairs_file(tmp_path / "bad.tsv")
    (tmp_path / "bad2.tsv").write_text("a.jpg\tb.jpg\t1\nc.jpg\td.jpg\tmaybe\n")
    with pytest.raises(PairsFormatError, match=r"bad2.tsv:2: third field 'maybe'"):
        parse_pairs_file(tmp_path / "bad2.tsv")


def test_bin_pack_round_trip(tmp_path):
    images = [bytes([i]) * (i + 3) for i in range(6)]
    issame = [True, False, True]
    for protocol in (2, 4):  # protocol 2 stores bytes through _codecs.encode
        save_bin_pack(tmp_path / f"p{protocol}.bin", images, issame, protocol=protocol)
        got, same = load_bin_pack(tmp_path / f"p{protocol}.bin")
        assert got == images
        assert same.dtype == bool and same.tolist() == issame


def test_bin_pack_python2_layout(tmp_path):
    # what Python 2 writes for (['abc', 'de'], [True]) with protocol 2: SHORT_BINSTRING, no globals
    raw = b"\x80\x02" + b"](U\x03abcU\x02dee" + b"]\x88a" + b"\x86."
    (tmp_path / "py2.bin").write_bytes(raw)
    got, same = load_bin_pack(tmp_path / "py2.bin")
    assert got == [b"abc", b"de"] and same.tolist() == [True]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def test_malicious_pack_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.bin").write_bytes(pickle.dumps(([b"x", _Evil(str(marker))], [True]), protocol=2))
    with pytest.raises(UnsafePickleError, match="evil.bin: refusing to unpickle global"):
        load_bin_pack(tmp_path / "evil.bin")
    assert not marker.exists()
    # plain data of the wrong kinds is refused too
    (tmp_path / "ints.bin").write_bytes(pickle.dumps(([b"x", b"y"], [1]), protocol=4))
    with pytest.raises(PairsFormatError, match="issame entries are not bools"):
        load_bin_pack(tmp_path / "ints.bin")
    (tmp_path / "odd.bin").write_bytes(pickle.dumps(([b"x", b"y", b"z"], [True]), protocol=4))
    with pytest.raises(PairsFormatError, match="3 images for 1 pairs"):
        load_bin_pack(tmp_path / "odd.bin")
    (tmp_path / "np.bin").write_bytes(pickle.dumps(([b"x", b"y"], np.array([True])), protocol=4))
    with pytest.raises(UnsafePickleError):
        load_bin_pack(tmp_path / "np.bin")
    (tmp_path / "junk.bin").write_bytes(b"not a pickle")
    with pytest.raises(PairsFormatError, match="junk.bin is not a readable pickle"):
        load_bin_pack(tmp_path / "junk.bin")


@pytest.mark.skipif(not ATT.is_dir(), reason=f"AT&T faces not found under {ATT}")
def test_folder_pairs_on_att_faces():
    pairs = folder_pairs(ATT, num_pairs=600, num_folds=10, seed=3)
    assert pairs == folder_pairs(ATT, num_pairs=600, num_folds=10, seed=3)
    assert pairs != folder_pairs(ATT, num_pairs=600, num_folds=10, seed=4)
    assert Counter((p.fold, p.same) for p in pairs) == {(k, s): 30 for k in range(10) for s in (True, False)}
    ident = lambda path: path.split("/")[0]  # noqa: E731
    assert all((ident(p.path1) == ident(p.path2)) == p.same for p in pairs)
    assert all(p.path1 != p.path2 for p in pairs)
    assert len({(p.path1, p.path2) for p in pairs}) == len(pairs)
    people = [set() for _ in range(10)]
    for p in pairs:
        people[p.fold].update({ident(p.path1), ident(p.path2)})
    assert all(not (people[a] & people[b]) for a in range(10) for b in range(a + 1, 10))
    assert all((ATT / p.path1).is_file() and (ATT / p.path2).is_file() for p in pairs)
