"""Text and metadata readers: pairs lists, landmark files, MegaFace features and lists, IJB metadata, YAML."""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, List, Optional, Sequence

import numpy as np

from ..mutate import mutate_bytes, mutate_text, mutate_tree, wide_alias
from . import Case, Target
from .common import encode, face, features_npz, lfw_names, mutate_json, mutate_npz


def _lfw_pairs_text(names: Sequence[str], folds: int, per: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = [f"{folds}\t{per}"]
    for _ in range(folds):
        for _ in range(per):
            lines.append(f"{rng.choice(names)}\t{rng.randint(1, 3)}\t{rng.randint(1, 3)}")
        for _ in range(per):
            a, b = rng.sample(list(names), 2)
            lines.append(f"{a}\t{rng.randint(1, 3)}\t{b}\t{rng.randint(1, 3)}")
    return "\n".join(lines) + "\n"


def _lfw_paths(names: Sequence[str]) -> List[str]:
    from eval.pairs import lfw_image_path

    return [lfw_image_path(n, k) for n in names for k in range(1, 4)]


def _check_pairs(pairs: Any) -> Optional[str]:
    if not isinstance(pairs, list) or not pairs:
        return f"not a non-empty list of pairs: {type(pairs).__name__}"
    folds = sorted({p.fold for p in pairs})
    if folds[0] < 0:
        return f"negative fold index {folds[0]}"
    if not all(isinstance(p.path1, str) and isinstance(p.path2, str) and isinstance(p.same, bool) for p in pairs):
        return "a pair with fields of the wrong type"
    return None


class LfwPairs(Target):
    name = "pairs_lfw"
    reader = "eval.pairs.parse_lfw_pairs (LFW View 2 pairs.txt); verify lfw --features"
    text = True
    outputs = ("report.json",)

    def seeds(self, context: Path) -> List[Case]:
        names = lfw_names(6)
        (context / "feats.npz").write_bytes(features_npz(_lfw_paths(names)))
        return [{"pairs.txt": _lfw_pairs_text(names, f, p, s).encode()} for f, p, s in ((2, 3, 0), (3, 2, 1), (10, 1, 2))]

    def run(self, case: Path) -> Any:
        from eval.pairs import parse_lfw_pairs

        return parse_lfw_pairs(case / "pairs.txt")

    def check(self, result: Any, case: Path) -> Optional[str]:
        return _check_pairs(result)

    def argv(self, case: Path) -> List[str]:
        return ["verify", "lfw", "--features", str(self.context / "feats.npz"), "--pairs", "pairs.txt",
                "--json", "report.json"]


class PairsFile(Target):
    name = "pairs_file"
    reader = "eval.pairs.parse_pairs_file (path1 path2 same [fold]); verify pairs --features"
    text = True
    outputs = ("report.json",)

    def seeds(self, context: Path) -> List[Case]:
        names = lfw_names(6)
        paths = _lfw_paths(names)
        (context / "feats.npz").write_bytes(features_npz(paths))
        rng = random.Random(3)
        out = []
        for sep, fold, header in (("\t", True, False), (",", False, True), (" ", False, False)):
            lines = ["path1,path2,same" if sep == "," else "path1\tpath2\tsame\tfold"] if header else []
            for i in range(12):
                a, b = rng.sample(paths, 2)
                row = [a, b, rng.choice(("1", "0", "same", "diff", "true"))] + ([str(i % 3)] if fold else [])
                lines.append(sep.join(row))
            out.append({"pairs.txt": ("\n".join(lines) + "\n").encode()})
        return out

    def run(self, case: Path) -> Any:
        from eval.pairs import parse_pairs_file

        return parse_pairs_file(case / "pairs.txt", num_folds=3)

    def check(self, result: Any, case: Path) -> Optional[str]:
        return _check_pairs(result)

    def argv(self, case: Path) -> List[str]:
        return ["verify", "pairs", "--features", str(self.context / "feats.npz"), "--pairs", "pairs.txt",
                "--folds", "3", "--json", "report.json"]


class Landmarks(Target):
    name = "landmarks"
    reader = "data_prep.landmarks (5-point landmark files); align --landmarks"
    text = True
    outputs = ("aligned",)
    ok_status = (0, 3)  # align: 3 when some images were skipped or failed (its manifest names them)
    weight = 2.0

    def seeds(self, context: Path) -> List[Case]:
        photos = context / "photos"
        rows = []
        for ident in range(2):
            for idx in range(2):
                image, points = face(ident, idx)
                rel = f"id{ident}/img{idx}.png"
                (photos / rel).parent.mkdir(parents=True, exist_ok=True)
                (photos / rel).write_bytes(encode(image, ".png"))
                rows.append((rel, points))
        tab = "\n".join(rel + "\t" + "\t".join(f"{v:.3f}" for v in p.ravel()) for rel, p in rows) + "\n"
        spaced = "# x1 y1 ... x5 y5\n" + "\n".join("./" + rel + " " + " ".join(f"{v:g}" for v in p.ravel())
                                                     for rel, p in rows) + "\n"
        return [{"landmarks.txt": tab.encode()}, {"landmarks.txt": spaced.encode()}]

    def run(self, case: Path) -> Any:
        from data_prep.landmarks import parse_landmark_file, read_landmarks

        entries, problems = parse_landmark_file(case / "landmarks.txt")  # align's lenient reader: never refuses
        return entries, read_landmarks(case / "landmarks.txt")  # the strict one (verify, the synthetic sets)

    def check(self, result: Any, case: Path) -> Optional[str]:
        entries, strict = result
        for rel, e in entries.items():
            if e.points is not None and (len(e.points) != 10 or not all(math.isfinite(v) for v in e.points)):
                return f"entry {rel!r}: points {e.points}"
        for rel, pts in strict.items():
            if pts.shape != (5, 2) or not np.isfinite(pts).all():
                return f"{rel!r}: {pts}"
        return None

    def argv(self, case: Path) -> List[str]:
        return ["align", "--input", str(self.context / "photos"), "--output", "aligned", "--landmarks",
                "landmarks.txt", "--workers", "1"]


class MegaFace(Target):
    name = "megaface"
    reader = "eval.megaface (devkit feature files, image lists); megaface score"
    outputs = ("scores.json",)

    def seeds(self, context: Path) -> List[Case]:
        import json

        from eval.megaface import feature_bytes

        rng = np.random.default_rng(0)
        probes = [f"Ann/Ann_{i}.png" for i in range(3)] + [f"Bob/Bob_{i}.png" for i in range(3)]
        dist = [f"d/{i:03d}.jpg" for i in range(5)]
        case: Case = {"probes.json": json.dumps({"path": probes, "id": [p.split("/")[0] for p in probes]}).encode(),
                      "distractors.txt": ("\n".join(dist) + "\n").encode()}
        for rel in probes:
            case[f"fp/{rel}_sphereface.bin"] = feature_bytes(rng.normal(size=8), normalize=True)
        for rel in dist:
            case[f"fd/{rel}_sphereface.bin"] = feature_bytes(rng.normal(size=8), normalize=True)
        other = dict(case)
        other["probes.json"] = ("\n".join(f"{p} {p.split('/')[0]}" for p in probes) + "\n").encode()
        other["distractors.txt"] = json.dumps(dist).encode()
        return [case, other]

    def mutate(self, rng: random.Random, case: Case, seeds: Sequence[Case]) -> Case:
        out = dict(case)
        name = rng.choice(["probes.json", "distractors.txt"] * 3 + sorted(k for k in case if k.endswith(".bin")))
        data = case[name]
        if name.endswith(".bin"):
            out[name] = mutate_bytes(rng, data, hot=(0, 4, 8, 12))
        elif data.lstrip()[:1] in (b"{", b"[") and rng.random() < 0.5:
            out[name] = mutate_json(rng, data)
        else:
            out[name] = mutate_text(rng, data)
        return out

    def run(self, case: Path) -> Any:
        from eval.megaface import read_feature, read_image_list

        probes, labels = read_image_list(case / "probes.json")
        dist, _ = read_image_list(case / "distractors.txt")
        feats = [read_feature(p) for p in sorted((case / "fp").rglob("*.bin")) + sorted((case / "fd").rglob("*.bin"))]
        return probes, labels, dist, feats

    def check(self, result: Any, case: Path) -> Optional[str]:
        probes, labels, dist, feats = result
        if not all(isinstance(p, str) for p in list(probes) + list(dist)):
            return "a path that is not a string"
        for f in feats:
            if f.ndim != 1 or f.dtype != np.float32:
                return f"a feature of shape {f.shape} {f.dtype}"
        return None

    def argv(self, case: Path) -> List[str]:
        return ["megaface", "score", "--probe-list", "probes.json", "--probe-dir", "fp", "--distractor-list",
                "distractors.txt", "--distractor-dir", "fd", "--sizes", "1,3", "--far", "0.1", "--json", "scores.json"]


IJB_FILES = ("meta/ijbc_face_tid_mid.txt", "meta/ijbc_template_pair_label.txt", "meta/ijbc_name_5pts_score.txt",
             "meta/ijbc_1N_gallery_G1.csv", "meta/ijbc_1N_gallery_G2.csv", "meta/ijbc_1N_probe_mixed.csv")


class Ijb(Target):
    name = "ijb"
    reader = "eval.ijb (IJB-C meta files, 1:N lists) + an .npz of face features; verify ijb --features"
    outputs = ("report.json",)

    def seeds(self, context: Path) -> List[Case]:
        rng = random.Random(5)
        faces, subjects = [], {}
        for t in range(1, 9):
            subjects[t] = 100 + (t - 1) // 2
            for m in range(2):
                faces.append((f"img/{t}_{m}.jpg", t, t * 10 + m))
        names = [f for f, _, _ in faces]
        tid_mid = "".join(f"{n} {t} {m}\n" for n, t, m in faces)
        pairs = "".join(f"{a} {b} {int(subjects[a] == subjects[b])}\n" for a in range(1, 9) for b in range(a + 1, 9))
        pts = "".join(f"{n} " + " ".join(f"{rng.uniform(10, 100):.2f}" for _ in range(10)) + f" {rng.random():.3f}\n"
                      for n in names)
        header = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n"
        g1 = header + "".join(f"{t},{subjects[t]},x.jpg\n" for t in (1, 3))
        g2 = header + "".join(f"{t},{subjects[t]},x.jpg\n" for t in (5, 7))
        probe = header + "".join(f"{t},{subjects[t]},x.jpg\n" for t in (2, 4, 6, 8))
        case = dict(zip(IJB_FILES, (s.encode() for s in (tid_mid, pairs, pts, g1, g2, probe))))
        case["feats.npz"] = features_npz(names, dim=8, seed=1)
        return [case]

    def mutate(self, rng: random.Random, case: Case, seeds: Sequence[Case]) -> Case:
        out = dict(case)
        name = rng.choice(sorted(case))
        out[name] = mutate_npz(rng, case[name]) if name.endswith(".npz") else mutate_text(rng, case[name])
        return out

    def run(self, case: Path) -> Any:
        from eval.features import load_features_npz
        from eval.ijb import IJB_GALLERIES, evaluate_ijb, load_ijb_meta, read_template_subjects
        from eval.ijb_1n import evaluate_ijb_1n

        meta = load_ijb_meta(case, "IJBC", need_landmarks=True, need_pairs=True)
        for key in ["probes"] + [f"gallery_{g}" for g in IJB_GALLERIES["IJBC"]]:
            read_template_subjects(meta.files[key])
        names, feats = load_features_npz(case / "feats.npz")
        report = evaluate_ijb(meta, names, feats, detector_score=True, source=str(case / "feats.npz"))[0]
        report["identification"] = evaluate_ijb_1n(meta, names, feats, "IJBC", True, False,
                                                   source=str(case / "feats.npz"))
        return report

    def check(self, result: Any, case: Path) -> Optional[str]:
        tars = result.get("tar_at_far", {})
        if any(not (0.0 <= float(v) <= 1.0) for v in tars.values()):
            return f"TAR outside [0, 1]: {tars}"
        return None

    def argv(self, case: Path) -> List[str]:
        return ["verify", "ijb", "--root", ".", "--dataset", "IJBC", "--features", "feats.npz", "--task", "both",
                "--detector-score", "--json", "report.json"]


class YamlRecipe(Target):
    name = "yaml"
    reader = "sphereface_plus.face.config.load_config (YAML face recipes); train --print-config"
    weight = 2.0

    def seeds(self, context: Path) -> List[Case]:
        root = Path(__file__).resolve().parents[3] / "configs"  # the repository's own recipes (any sub-folder)
        picks = ("cpu_smoke.yaml", "sphereface20_casia.yaml", "spherefaceplus20_casia.yaml",
                 "arcface_sfnet20_vggface2.yaml", "demo.yaml")
        found = [next(iter(sorted(root.rglob(p))), None) for p in picks]
        return [{"recipe.yaml": f.read_bytes()} for f in found if f is not None]

    def mutate(self, rng: random.Random, case: Case, seeds: Sequence[Case]) -> Case:
        import yaml

        data = case["recipe.yaml"]
        roll = rng.random()
        if roll < 0.45:
            tree = yaml.safe_load(data) or {}
            text = yaml.safe_dump(mutate_tree(rng, tree), sort_keys=False, allow_unicode=rng.random() < 0.5)
            return {"recipe.yaml": text.encode()}
        if roll < 0.5:  # an alias bomb or a deep structure written as YAML text
            bomb = yaml.safe_dump({"model": {"kwargs": {"x": wide_alias(rng.choice((4, 9)))}},
                                   "train": {"batch_size": wide_alias(9)}} if rng.random() < 0.5 else
                                  {"head": {"m": wide_alias(9)}})
            return {"recipe.yaml": bomb.encode() if rng.random() < 0.5 else
                    b"a: &a [" + b"x," * 10 + b"]\n" + b"".join(b"%c: &%c [*%c,*%c,*%c,*%c,*%c,*%c,*%c,*%c]\n"
                                                              % ((97 + i + 1,) * 2 + (97 + i,) * 8) for i in range(9))
                    + b"model: {kwargs: {x: *j}}\n"}
        if roll < 0.55:
            return {"recipe.yaml": b"[" * rng.choice((100, 5000, 100000)) + b"]" * rng.choice((0, 1))}
        return {"recipe.yaml": mutate_text(rng, data, [s["recipe.yaml"] for s in seeds])}

    def run(self, case: Path) -> Any:
        from sphereface_plus.config import config_to_yaml
        from sphereface_plus.face.config import load_config

        cfg = load_config(str(case / "recipe.yaml"))
        return config_to_yaml(cfg)

    def argv(self, case: Path) -> List[str]:
        return ["train", "--config", "recipe.yaml", "--print-config"]


TARGETS = [LfwPairs, PairsFile, Landmarks, MegaFace, Ijb, YamlRecipe]
