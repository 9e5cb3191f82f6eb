"""The MHE family in training: the regulariser's weighted sum, the inner optimisers of projections and
poles against the authors' update rules (tests/mhe_family_reference.py), the draws of CoMHE-RP, the
settings' validation, and a bit-exact resume through the CIFAR trainer."""
import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn

import mhe_family_reference as ref
from sphereface_plus.cifar.config import HIDDEN_LAYERS, OUTPUT_LAYER, CifarConfig
from sphereface_plus.commands.cifar import train_cifar
from sphereface_plus.config import ConfigError
from sphereface_plus.mhe import (OBJECTIVES, MHERegularizer, ObjectiveSettings, default_coefficients, mhe_energy,
                                 resolve_settings)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 5, 2, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 3 * 3, 4)).double()


def _filts(model):
    return ref.filt_of(model[0].weight), ref.filt_of(model[3].weight)


def _reference_terms(objective, reg, model, lr):
    """The transcription's (hidden, output) terms of the tiny model, with the regulariser's state."""
    conv, lin = _filts(model)
    half = reg.half_space
    st = reg.state_dict()
    if objective == "mhe":
        return ref.thomson(conv, half), ref.thomson(lin, False)  # power 2 in this test
    if objective == "comhe_rp":
        p = reg.state.projections("0", model[0].weight).numpy()
        return ref.comhe_rp(conv, p, half), ref.thomson(lin, False)
    if objective in ("comhe_ap", "comhe_ad"):
        kind = "angle" if objective == "comhe_ap" else "adversarial"
        return ref.comhe_learned(conv, st["projections"]["0"].numpy(), lr, kind, half), ref.thomson(lin, False)
    if objective in ("mhp", "mhc"):
        f = ref.mhp if objective == "mhp" else ref.mhc
        return (-1 if objective == "mhp" else 1) * np.array([f(conv, st["poles"]["0"].numpy().reshape(1, -1), half),
                                                              f(lin, st["poles"]["3"].numpy().reshape(1, -1), False)])
    if objective == "mhs":
        return ref.mhs(conv, half), ref.mhs(lin, False)
    if objective == "r_mhp":
        return ref.r_mhp(conv), ref.r_mhp(lin)
    return ref.mgd(conv, half), ref.mgd(lin, False)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_regulariser_is_the_authors_weighted_sum(objective):
    model = _model()
    spec = OBJECTIVES[objective]
    settings = {"comhe_rp": ObjectiveSettings(projection_dim=4, projections=3),
                "comhe_ap": ObjectiveSettings(projection_dim=4, inner_steps=2),
                "comhe_ad": ObjectiveSettings(projection_dim=4, inner_steps=2),
                "mhp": ObjectiveSettings(inner_steps=2), "mhc": ObjectiveSettings(inner_steps=2)}.get(objective)
    reg = MHERegularizer(model, power="2" if spec.uses_power else None, half_space=spec.half_space,
                         objective=objective, settings=settings)
    assert reg.output_layers == ["3"] and reg.hidden_layers == ["0"]
    lr = 0.05
    reg.advance(lr)
    loss, values = reg()
    h, o = _reference_terms(objective, reg, model, lr)
    ch, co = default_coefficients(objective, "2")
    assert (reg.hidden_coef, reg.output_coef) == (ch, co)
    assert float(values["0"]) == pytest.approx(h, rel=1e-9) and float(values["3"]) == pytest.approx(o, rel=1e-9)
    assert float(loss) == pytest.approx(ch * h + co * o, rel=1e-9)


def test_authors_coefficients_and_signs():
    assert default_coefficients("mhe", "0") == (1.0, 10.0) and default_coefficients("mhe", "a1") == (0.1, 1.0)
    assert default_coefficients("comhe_rp", "2") == (1.0, 10.0)
    assert {k: default_coefficients(k) for k in ("mhs", "mhp", "r_mhp", "mhc", "mgd")} == {
        "mhs": (0.1, 1.0), "mhp": (1.0, 10.0), "r_mhp": (0.01, 0.1), "mhc": (0.01, 0.1), "mgd": (0.01, 0.1)}
    assert OBJECTIVES["mhp"].sign == -1 and all(o.sign == 1 for k, o in OBJECTIVES.items() if k != "mhp")


# ------------------------------------------------------------------------------------------ inner optimisers


@pytest.mark.parametrize("objective, kind, steps", [("comhe_ap", "angle", 1), ("comhe_ad", "adversarial", 3)])
def test_projection_steps_follow_the_authors_gradient_descent(objective, kind, steps):
    model = _model(1)
    reg = MHERegularizer(model, half_space=True, objective=objective,
                         settings=ObjectiveSettings(projection_dim=4, inner_steps=steps))
    p0 = reg.state.projection("0", model[0].weight).numpy().copy()
    lr = 0.2
    reg.advance(lr)
    expected = ref.projection_steps(_filts(model)[0], p0, lr, kind, steps)
    np.testing.assert_allclose(reg.state_dict()["projections"]["0"].numpy(), expected, rtol=1e-9, atol=1e-12)
    assert "3" not in reg.state_dict()["projections"]  # the output layer is not projected


@pytest.mark.parametrize("objective", ["mhp", "mhc"])
def test_pole_steps_follow_the_authors_momentum(objective):
    model = _model(2)
    reg = MHERegularizer(model, half_space=True, objective=objective, settings=ObjectiveSettings(inner_steps=4))
    conv, lin = _filts(model)
    v0 = {n: reg.state.pole(n, m.weight).numpy().reshape(1, -1).copy() for n, m in (("0", model[0]), ("3", model[3]))}
    lr = 0.1
    reg.advance(lr)
    st = reg.state_dict()
    for name, filt, half, coef in (("0", conv, True, reg.hidden_coef), ("3", lin, False, reg.output_coef)):
        expected = ref.pole_steps(filt, v0[name], half, objective, coef, lr, 4)
        np.testing.assert_allclose(st["poles"][name].numpy(), expected.reshape(-1), rtol=1e-9, atol=1e-12)
    # a second update continues the momentum (the buffers are state too)
    reg.advance(lr)
    expected = ref.pole_steps(conv, v0["0"], True, objective, reg.hidden_coef, lr, 8)
    np.testing.assert_allclose(reg.state_dict()["poles"]["0"].numpy(), expected.reshape(-1), rtol=1e-8)


def test_random_projections_are_drawn_anew_each_update_and_replayable():
    model = _model(3)
    settings = ObjectiveSettings(projection_dim=4, projections=3, seed=5)
    reg = MHERegularizer(model, objective="comhe_rp", settings=settings)
    w = model[0].weight
    p0 = reg.state.projections("0", w).clone()
    assert p0.shape == (3, 4, 12)
    reg.advance(0.1)
    p1 = reg.state.projections("0", w).clone()
    assert not torch.equal(p0, p1)
    saved = reg.state_dict()
    other = MHERegularizer(model, objective="comhe_rp", settings=settings)
    other.load_state_dict(saved)
    assert torch.equal(other.state.projections("0", w), p1)
    assert float(other()[0]) == float(reg()[0])
    with pytest.raises(ValueError, match="objective"):
        MHERegularizer(model, objective="mhs").load_state_dict(saved)


def test_default_stays_plain_mhe():
    model = _model(4)
    loss, values = MHERegularizer(model)()
    assert float(values["0"]) == float(mhe_energy(model[0].weight, "0"))
    assert float(loss) == float(1.0 * mhe_energy(model[0].weight, "0") + 10.0 * mhe_energy(model[3].weight, "0"))


# ------------------------------------------------------------------------------------------------ settings


def test_settings_are_validated():
    assert resolve_settings("comhe_rp") == ObjectiveSettings(projection_dim=40, projections=20)
    assert resolve_settings("comhe_ad").inner_steps == 10 and resolve_settings("mhc").gamma == 10.0
    with pytest.raises(ValueError, match="has no setting 'gamma'"):
        resolve_settings("mhs", gamma=3.0)
    with pytest.raises(ValueError, match="projections must be 1"):
        resolve_settings("comhe_ap", projections=4)
    with pytest.raises(ValueError, match="unknown MHE objective"):
        MHERegularizer(_model(), objective="comhe")
    with pytest.raises(ValueError, match="no half-space form"):
        MHERegularizer(_model(), objective="r_mhp", half_space=True)
    with pytest.raises(ValueError, match="has no kernel"):
        MHERegularizer(_model(), objective="mgd", power="2")
    with pytest.raises(ConfigError, match="no half-space form"):
        CifarConfig(model_name="half_mhe", mhe_objective="r_mhp")
    with pytest.raises(ConfigError, match="mhe_objective 'mhs' has no setting 'mhe_projection_dim'"):
        CifarConfig(mhe_objective="mhs", mhe_projection_dim=3)
    cfg = CifarConfig(model_name="half_mhe", mhe_objective="comhe_rp", mhe_power="2", iterations=75000,
                            lr_schedule="comhe")
    assert cfg.setting == "half_comhe_rp_2" and cfg.milestones == (30000, 50000, 65000)
    assert CifarConfig(model_name="mhe", mhe_objective="r_mhp").setting == "r_mhp"
    # a checkpoint written before these settings existed resumes: they are compared at their defaults
    from sphereface_plus.config import stored_config_as_read

    added = ("mhe_objective", "mhe_projection_dim", "mhe_projections", "mhe_inner_steps", "mhe_gamma", "lr_schedule")
    old = {k: v for k, v in CifarConfig().to_dict().items() if k not in added}
    assert stored_config_as_read(old, CifarConfig) == CifarConfig().to_dict()


@pytest.mark.parametrize("objective", [n for n in OBJECTIVES if n != "mhe"])
def test_cifar_family_recipes_are_the_authors(objective):
    # configs/cifar/<objective>.yaml: the authors' CNN-9 schedule (75k updates, x0.1 at 30k/50k/65k), the
    # objective's half-space form where it has one, and its coefficients
    from pathlib import Path

    from sphereface_plus.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / "cifar" / f"{objective}.yaml"
    cfg = load_config(str(path), schema=CifarConfig)
    assert (cfg.mhe_objective, cfg.iterations, cfg.batch_size, cfg.lr) == (objective, 75000, 128, 0.1)
    assert cfg.milestones == (30000, 50000, 65000)
    assert cfg.model_name == ("half_mhe" if OBJECTIVES[objective].half_space else "mhe")
    power = None if cfg.mhe_power == "-" else cfg.mhe_power
    assert cfg.coefficients() == default_coefficients(objective, power)


# --------------------------------------------------------------------------------------- resume, bit-exact


def _write_synthetic_cifar10(folder):
    g = np.random.default_rng(0)
    root = folder / "cifar-10-batches-py"
    root.mkdir(parents=True)
    for i in range(1, 6):
        blob = {b"batch_label": b"b", b"labels": [int(v) for v in g.integers(0, 10, 16)],
                b"data": g.integers(0, 256, (16, 3072), dtype=np.uint8)}
        (root / f"data_batch_{i}").write_bytes(pickle.dumps(blob, protocol=2))
    blob = {b"batch_label": b"t", b"labels": [int(v) for v in g.integers(0, 10, 10)],
            b"data": g.integers(0, 256, (10, 3072), dtype=np.uint8)}
    (root / "test_batch").write_bytes(pickle.dumps(blob, protocol=2))
    return folder


@pytest.mark.parametrize("objective", ["comhe_rp", "comhe_ap", "comhe_ad", "mhp", "mhc"])
def test_state_round_trip_resumes_bit_exactly(objective):
    # three SGD updates of a tiny model with the regulariser, against one update, a save (model, optimiser,
    # regulariser's state_dict), fresh objects loading it, and two more updates
    def run(updates, state=None):
        model = _model(6)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        settings = ObjectiveSettings(projection_dim=4, projections=2) if objective == "comhe_rp" else \
            ObjectiveSettings(projection_dim=4, inner_steps=2) if objective.startswith("comhe") else \
            ObjectiveSettings(inner_steps=2)
        reg = MHERegularizer(model, half_space=True, objective=objective, settings=settings)
        if state is not None:
            model.load_state_dict(state[0])
            opt.load_state_dict(state[1])
            reg.load_state_dict(state[2])
        x = torch.randn(4, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        for _ in range(updates):
            reg.advance(opt.param_groups[0]["lr"])
            loss = model(x).square().mean() + reg()[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model, opt, reg

    whole = run(3)
    m, o, r = run(1)
    saved = pickle.loads(pickle.dumps((m.state_dict(), o.state_dict(), r.state_dict())))
    resumed = run(2, saved)
    for a, b in zip(whole[0].parameters(), resumed[0].parameters()):
        assert torch.equal(a, b)
    assert float(whole[2]()[0]) == float(resumed[2]()[0])


def test_cifar_resume_is_bit_exact(tmp_path):
    # through the CIFAR trainer: the regulariser's state (here MHP's poles and their momentum) travels in the
    # checkpoint (mhe_state) and an interrupted run retraces the uninterrupted one bit for bit
    objective = "mhp"
    data = _write_synthetic_cifar10(tmp_path / "data")
    cfg = CifarConfig(model_name="half_mhe", mhe_objective=objective, dataset="cifar10", data=str(data),
                            iterations=3, batch_size=4, eval_every=2, seed=1, precision="fp32", lr=0.01,
                            lr_schedule="comhe", mhe_inner_steps=2)
    whole = train_cifar(cfg, tmp_path / "a", device="cpu")
    part = train_cifar(cfg, tmp_path / "b", device="cpu", stop_after=1)
    assert part["stopped"] and whole["iterations"] == 3
    train_cifar(cfg, tmp_path / "b", device="cpu", resume=True)
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    poles_a, poles_b = a["mhe_state"], b["mhe_state"]
    assert poles_a["poles"].keys() == poles_b["poles"].keys() == set(HIDDEN_LAYERS + (OUTPUT_LAYER,))
    for key in ("poles", "momentum"):
        for name in poles_a[key]:
            assert torch.equal(poles_a[key][name], poles_b[key][name]), (key, name)
    rows = [[json.loads(line) for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in "ab"]
    assert [r["iteration"] for r in rows[1]] == [0, 2, 3]
    for x, y in zip(*rows):
        assert (x["loss"], x["mhe_hidden"], x["mhe_output"]) == (y["loss"], y["mhe_hidden"], y["mhe_output"])


# ---------------------------------------------------------------------------------------- the GAN discriminator


def test_gan_discriminator_takes_any_objective():
    from sphereface_plus.gan.config import GanConfig
    from sphereface_plus.gan import Discriminator, Generator, gan_mhe_loss
    from sphereface_plus.gan import steps as S
    from sphereface_plus.gan.losses import discriminator_regularizer

    torch.manual_seed(0)
    d = Discriminator(spectral_norm=True)
    reg = discriminator_regularizer(d, "r_mhp")
    convs = [m for _, m in d.layers() if m.weight.shape[0] >= 2]
    assert len(reg.layers) == len(convs) == 7 and reg.output_layers == []
    expected = 1e-3 * sum(ref.r_mhp(ref.filt_of(m.weight)) for m in convs)  # raw weights, coefficient 1 each
    assert float(gan_mhe_loss(d, 1e-3, regularizer=reg)) == pytest.approx(expected, rel=1e-6)
    # a discriminator update advances the objective's state (MHP's poles) at D's learning rate
    g = Generator()
    opt_g, opt_d = S.make_optimizers(g, d)
    mhp = discriminator_regularizer(d, "mhp", half_space=True, settings=ObjectiveSettings(inner_steps=1))
    before = {n: mhp.state.pole(n, m.weight).clone() for n, m, _ in mhp.layers}
    out = S.d_step(g, d, opt_d, torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 128), mhe_magnitude=1e-3,
                   mhe_regularizer=mhp)
    after = mhp.state_dict()["poles"]
    assert after.keys() == before.keys() and all(not torch.equal(after[n], before[n]) for n in before)
    assert float(out["mhe"]) < 0  # MHP's polarisation enters D's loss negated
    with pytest.raises(ConfigError, match="needs a toolkit kernel"):
        GanConfig(mhe_objective="comhe_rp")
    with pytest.raises(ConfigError, match="has no kernel"):
        GanConfig(mhe_objective="mhs", mhe_power="2")
    assert GanConfig(mhe_objective="comhe_rp", mhe_power="2", mhe_half_space=True).mhe_regularizer(d).objective == "comhe_rp"
