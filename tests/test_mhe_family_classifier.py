"""The MHE family as the SphereFace+ classifier term: each objective's forms on the classifier rows
against the transcriptions (tests/mhe_family_reference.py) and brute-force loops, the stateful
ClassifierMHE, and an exact resume of the face trainer with an objective that keeps state."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import mhe_family_reference as ref
from sphereface_plus.config import ConfigError
from sphereface_plus.face.config import load_config
from sphereface_plus.face.trainer import FaceTrainer
from sphereface_plus.mhe import OBJECTIVES, ClassifierMHE, ObjectiveSettings, classifier_mhe
from tests.trainer_stubs import TinyFaces

C, D = 12, 7


def _w(seed=0, c=C, d=D):
    return torch.randn(c, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _extra(objective, d=D):
    g = torch.Generator().manual_seed(99)
    if objective == "comhe_rp":
        return {"projections": torch.randn(3, 4, d, dtype=torch.float64, generator=g)}
    if objective in ("comhe_ap", "comhe_ad"):
        return {"projections": torch.randn(4, d, dtype=torch.float64, generator=g), "lr": 0.2}
    if objective in ("mhp", "mhc"):
        return {"pole": torch.randn(d, dtype=torch.float64, generator=g)}
    return {}


def _reference(objective, w, extra):
    """The network's term of ``objective`` on the rows ``w`` (the sign it is minimised with)."""
    f = ref.filt_of(w)
    if objective == "comhe_rp":
        return ref.comhe_rp(f, extra["projections"].numpy(), False)
    if objective in ("comhe_ap", "comhe_ad"):
        kind = "angle" if objective == "comhe_ap" else "adversarial"
        return ref.comhe_learned(f, extra["projections"].numpy(), extra["lr"], kind, False)
    if objective == "mhp":
        return -ref.mhp(f, extra["pole"].numpy().reshape(1, -1), False)
    if objective == "mhc":
        return ref.mhc(f, extra["pole"].numpy().reshape(1, -1), False)
    return {"mhs": lambda: ref.mhs(f, False), "r_mhp": lambda: ref.r_mhp(f), "mgd": lambda: ref.mgd(f, False)}[objective]()


FAMILY = [name for name in OBJECTIVES if name != "mhe"]


@pytest.mark.parametrize("objective", FAMILY)
def test_full_and_batch_unique_forms(objective):
    w, extra = _w(1), _extra(objective)
    got = classifier_mhe(w, None, mode="full", objective=objective, **extra)
    assert float(got) == pytest.approx(_reference(objective, w, extra), rel=1e-9)
    labels = torch.tensor([3, 7, 3, 0, 11, 7])
    got = classifier_mhe(w, labels, mode="batch_unique", objective=objective, **extra)
    assert float(got) == pytest.approx(_reference(objective, w[torch.tensor([0, 3, 7, 11])], extra), rel=1e-9)


def test_batch_vs_all_forms_match_loops():
    w, labels = _w(2), torch.tensor([1, 5, 5, 9])
    extra = _extra("comhe_rp")
    total = 0.0
    for p in extra["projections"].numpy():
        rows = w.numpy() @ p.T
        u = rows / np.sqrt((rows * rows).sum(1, keepdims=True) + 1e-4)
        total += np.mean([1.0 / (2 - 2 * u[y] @ u[j]) for y in labels.tolist() for j in range(C) if j != y])
    got = classifier_mhe(w, labels, mode="batch_vs_all", objective="comhe_rp", **extra)
    assert float(got) == pytest.approx(total / 3, rel=1e-9)
    # MHS over the pairs (y_b, j): minus the smallest squared distance, every tied pair counted; rows 5 and 6
    # are the closest pair, and class 5 is twice in the batch
    w[6] = w[5] + 0.05 * w[6]
    u = ref.norm(ref.norm(ref.filt_of(w))).T  # rows n(n(w))
    d = {(b, j): 2 - 2 * u[y] @ u[j] for b, y in enumerate(labels.tolist()) for j in range(C) if j != y}
    m = min(d.values())
    expected = -sum(v for v in d.values() if abs(v - m) <= 1e-12 * m)
    assert float(classifier_mhe(w, labels, mode="batch_vs_all", objective="mhs")) == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(-2 * d[(1, 6)], rel=1e-12)


def test_mhs_full_is_blocked_with_the_same_value_and_gradient():
    w = _w(3, c=150, d=9).requires_grad_(True)
    dense = classifier_mhe(w, None, mode="full", objective="mhs", block_size=150)
    (g_dense,) = torch.autograd.grad(dense, w)
    for block in (7, 64):
        blocked = classifier_mhe(w, None, mode="full", objective="mhs", block_size=block)
        (g,) = torch.autograd.grad(blocked, w)
        assert float(blocked) == float(dense) and torch.equal(g, g_dense)
    assert float(dense) == pytest.approx(ref.mhs(ref.filt_of(w), False), rel=1e-12)


def test_modes_and_arguments_are_checked():
    w = _w(4)
    with pytest.raises(ValueError, match="offers the modes"):
        classifier_mhe(w, torch.tensor([1, 2]), mode="batch_vs_all", objective="mgd")
    with pytest.raises(ValueError, match="needs its pole"):
        classifier_mhe(w, None, mode="full", objective="mhp")
    with pytest.raises(ValueError, match="offers the modes"):
        ClassifierMHE("mhp", mode="caffe_among")
    with pytest.raises(ConfigError, match="offers mhe.mode"):
        load_config(None, ["mhe.objective=mgd", "mhe.mode=batch_vs_all"])
    with pytest.raises(ConfigError, match="head.parallel=sharded"):
        load_config(None, ["mhe.objective=mhs", "mhe.mode=full", "mhe.lambda_m=1", "head.parallel=sharded"])
    with pytest.raises(ConfigError, match="has no setting 'mhe.gamma'"):
        load_config(None, ["mhe.objective=mhs", "mhe.mode=full", "mhe.gamma=2"])


@pytest.mark.parametrize("objective", ["comhe_rp", "comhe_ad", "mhp", "mhc"])
def test_classifier_state_is_what_the_term_uses(objective):
    settings = {"comhe_rp": ObjectiveSettings(projection_dim=4, projections=3),
                "comhe_ad": ObjectiveSettings(projection_dim=4, inner_steps=2)}.get(objective, ObjectiveSettings(inner_steps=3))
    term = ClassifierMHE(objective, mode="full", settings=settings, coefficient=0.5)
    w, labels = _w(5), torch.tensor([0, 1])
    term.advance(w, labels, 0.1)
    st = term.state_dict()
    if objective == "comhe_rp":
        extra = {"projections": term.state.projections("classifier", w)}
    elif objective == "comhe_ad":
        extra = {"projections": st["projections"]["classifier"], "lr": 0.1}
    else:
        extra = {"pole": st["poles"]["classifier"]}
        # the poles' steps: the authors' momentum on coefficient x term (+ decay), on all rows in mode full
        v0 = ClassifierMHE(objective, mode="full", settings=settings).state.pole("classifier", w).numpy().reshape(1, -1)
        expected = ref.pole_steps(ref.filt_of(w), v0, False, objective, 0.5, 0.1, 3)
        np.testing.assert_allclose(st["poles"]["classifier"].numpy(), expected.reshape(-1), rtol=1e-9)
    assert float(term(w, labels)) == pytest.approx(_reference(objective, w, extra), rel=1e-9)
    other = ClassifierMHE(objective, mode="full", settings=settings, coefficient=0.5)
    other.load_state_dict(term.state_dict())
    assert float(other(w, labels)) == float(term(w, labels))


# ------------------------------------------------------------------------------------------ the face trainer

NUM_CLASSES, BATCH, STEPS, SAVE_AT = 8, 4, 3, 1


def _trainer(out):
    cfg = load_config(None, [
        f"out_dir={out}", "model.backbone=sphere4", "model.embedding_dim=16", "head.name=a_softmax",
        "mhe.lambda_m=0.5", "mhe.objective=mhp", "mhe.mode=full", "mhe.inner_steps=2", "optim.lr=0.05",
        "train.seed=2", f"train.batch_size={BATCH}", f"train.iterations={STEPS}", "train.tensorboard=false",
        "train.precision=fp32", "train.device=cpu", "checkpoint.every=100", "eval.pairs=",
    ])
    return FaceTrainer.from_config(cfg, TinyFaces(NUM_CLASSES))


def _run(trainer, steps):
    out = []
    for step in steps:
        g = torch.Generator().manual_seed(300 + step)
        stats = trainer.train_step(torch.randn(BATCH, 3, 112, 96, generator=g),
                                   torch.randint(0, NUM_CLASSES, (BATCH,), generator=g))
        out.append((float(stats["loss"]), float(stats["mhe"])))
    return out


def test_face_trainer_resumes_an_objective_with_state_exactly(tmp_path):
    torch.set_num_threads(1)
    whole = _trainer(tmp_path / "whole")
    want = _run(whole, range(STEPS))
    assert all(m < 0 for _, m in want)  # MHP's polarisation enters the loss negated
    first = _trainer(tmp_path / "part")
    assert _run(first, range(SAVE_AT)) == want[:SAVE_AT]
    first.save()
    resumed = _trainer(tmp_path / "part")
    assert resumed.resume("auto") is not None
    assert _run(resumed, range(SAVE_AT, STEPS)) == want[SAVE_AT:]
    a, b = resumed.state_dict()["mhe_state"], whole.state_dict()["mhe_state"]
    for key, name in itertools.product(("poles", "momentum"), ("classifier",)):
        assert torch.equal(a[key][name], b[key][name])
