"""The typed config tree: precedence, type checks, nearest-key errors, round trips, the shipped recipes."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from sphereface_plus.commands.train import load_train_config
from sphereface_plus.config import ConfigError, apply_overrides
from sphereface_plus.face.config import FaceConfig as Config
from sphereface_plus.face.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "face").glob("*.yaml"))  # face recipes (GAN recipes: test_gan_runner)
CIFAR_CONFIGS = sorted((REPO / "configs" / "cifar").glob("*.yaml"))


def test_defaults_then_yaml_then_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("optim:\n  lr: 0.5\n  milestones: [5, 9]\ntrain:\n  batch_size: 64\ndata:\n  source: synthetic\n")
    cfg = load_config(str(p), ["train.batch_size=32", "mhe.power=0", "optim.milestones=[1, 2, 3]", "out_dir=x/y"])
    assert cfg.optim.lr == 0.5  # YAML over default
    assert cfg.train.batch_size == 32  # override over YAML
    assert cfg.optim.milestones == [1, 2, 3] and cfg.out_dir == "x/y"
    assert cfg.mhe.power == "0"  # YAML parses 0 as an int; a str field keeps it as written
    assert cfg.optim.momentum == Config().optim.momentum == 0.9  # untouched default
    assert isinstance(load_config(str(p), ["optim.lr=1"]).optim.lr, float)  # int accepted for a float
    # YAML 1.2 booleans: "off" is a string (train.precision=off), only true/false are booleans
    cfg = load_config(str(p), ["train.precision=off", "train.tensorboard=false", "model.backbone=sphere4"])
    assert (cfg.train.precision, cfg.train.tensorboard) == ("off", False)


@pytest.mark.parametrize(
    "override, nearest",
    [("train.batch_sise=3", "train.batch_size"), ("trian.iterations=3", "train.iterations"),
     ("optim.weightdecay=0", "optim.weight_decay"), ("checkpoint.evry=5", "checkpoint.every")],
)
def test_unknown_key_names_the_nearest(override, nearest):
    with pytest.raises(ConfigError, match=f"Did you mean '{nearest}'"):
        load_config(None, ["data.source=synthetic", override])


def test_unknown_key_in_yaml_names_file_and_nearest(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data:\n  source: synthetic\nhead:\n  lambda_mn: 5\n")
    with pytest.raises(ConfigError, match=r"head\.lambda_mn.*bad\.yaml.*Did you mean 'head\.lambda_min'"):
        load_config(str(p))


@pytest.mark.parametrize(
    "override, message",
    [("train.batch_size=abc", "expects an integer"), ("train.batch_size=1.5", "expects an integer"),
     ("optim.lr=fast", "expects a number"), ("train.tensorboard=3", "true or false"),
     ("optim.milestones=7", "expects a list"), ("data.source=imagenet", "synthetic, folder, list, rec, packed"),
     ("train.precision=fp8", "auto, fp32, bf16, fp16, off"), ("train.iterations=0", "must be positive"),
     ("model.input_size=[112,112]", "does not match data.template"), ("noequals", "key=value")],
)
def test_wrong_types_and_values(override, message):
    # the train runner's loader: the library's checks plus data_prep's (sources, templates)
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, ["data.source=synthetic", override])


def test_real_data_source_needs_root():
    with pytest.raises(ConfigError, match="data.root"):
        load_train_config(None, ["data.source=folder"])


def test_round_trip_is_plain_data():
    cfg = load_config(None, ["data.source=synthetic", "head.name=cosface", "optim.milestones=[3]"])
    d = cfg.to_dict()
    assert yaml.safe_load(yaml.safe_dump(d)) == d  # nothing but plain nested containers
    assert Config.from_dict(d) == cfg
    d["train"]["bogus"] = 1
    with pytest.raises(ConfigError, match="train.bogus"):
        Config.from_dict(d)


def test_section_override_with_mapping():
    cfg = apply_overrides(Config(), ["data.synthetic={num_identities: 30, seed: 4}"])
    assert (cfg.data.synthetic.num_identities, cfg.data.synthetic.seed) == (30, 4)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_recipes_load(path):
    overrides = [] if "smoke" in path.name else ["data.root=/data/casia-112x96"]
    if path.name == "demo.yaml":  # the demo adds its computed overrides (data.list_file, iterations, ...)
        overrides = ["data.root=/data/demo"]
    backbone = yaml.safe_load(path.read_text())["model"]["backbone"]
    from sphereface_plus.models import list_backbones

    if backbone not in list_backbones():  # a recipe may name a backbone not registered here
        pytest.skip(f"{path.name}: backbone {backbone!r} is not registered yet")
    cfg = load_train_config(str(path), overrides)
    # follows from the template; the released recipes state it (as their prototxt does), which is checked
    expected = [112, 96] if "released" in path.name else None
    # OpenSphere's and insightface's recipes (VGGFace2, MS1M) use their 112x112 crops
    template = "112x112" if ("vggface2" in path.name or "ms1m" in path.name) else "112x96"
    if "dlib" in path.name:  # a released model's fine-tuning: dlib's 150x150 chip
        template = "150x150"
    assert cfg.data.template == template and cfg.model.input_size == expected


def test_sphereface20_recipe_is_spec_section_6():
    cfg = load_config(str(REPO / "configs" / "face" / "sphereface20_casia.yaml"), ["data.root=x"])
    assert cfg.model.backbone == "sphere20" and cfg.model.embedding_dim == 512
    assert (cfg.train.batch_size, cfg.train.iterations) == (512, 28000)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.9, 5e-4)
    assert cfg.optim.milestones == [16000, 24000, 28000] and cfg.optim.lr_gamma == 0.1
    h = cfg.head
    assert (h.name, h.m, h.base, h.gamma, h.power, h.lambda_min) == ("a_softmax", 4, 1000.0, 0.12, 1.0, 5.0)
    assert cfg.mhe.lambda_m == 0.0


def test_spherefaceplus_recipe_is_spec_section_5():
    cfg = load_config(str(REPO / "configs" / "face" / "spherefaceplus20_casia.yaml"), ["data.root=x"])
    assert cfg.mhe.lambda_m > 0 and cfg.train.init_from  # fine-tune from a SphereFace checkpoint
    assert (cfg.head.m, cfg.head.base, cfg.head.lambda_min) == (4, 5.0, 5.0)  # λ fixed at 5
    assert (cfg.optim.lr, cfg.optim.milestones, cfg.train.iterations) == (0.01, [4000, 6000], 8000)
    assert (cfg.train.batch_size, cfg.optim.weight_decay, cfg.optim.momentum) == (512, 5e-4, 0.9)


def test_cli_reports_bad_key_with_exit_status_2(capsys):
    from sphereface_plus.commands import train as train_cmd

    parser = argparse.ArgumentParser()
    train_cmd.add_arguments(parser)
    from sphereface_plus.cli import main

    assert main(["train", "--config", str(REPO / "configs" / "face" / "cpu_smoke.yaml"), "train.iteratons=3"]) == 2
    assert "Did you mean 'train.iterations'" in capsys.readouterr().err
    args = parser.parse_args(["--config", str(REPO / "configs" / "face" / "cpu_smoke.yaml"), "--print-config", "train.seed=9"])
    assert train_cmd.run(args) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["seed"] == 9 and printed["data"]["source"] == "synthetic"


@pytest.mark.parametrize("name, model_name, power", [("baseline", "baseline", "-"), ("mhe", "mhe", "0"),
                                                      ("half_mhe", "half_mhe", "2")])
def test_cifar_recipes_are_spec_section_7(name, model_name, power):
    """The CIFAR recipes load through the same loader into the CIFAR schema, with the values of docs/theory.md#cifar-setup."""
    from sphereface_plus.cifar.config import CifarConfig
    from sphereface_plus.config import load_config

    cfg = load_config(str(REPO / "configs" / "cifar" / f"{name}.yaml"), schema=CifarConfig)
    assert (cfg.model_name, cfg.mhe_power, cfg.dataset) == (model_name, power, "cifar100")
    assert (cfg.iterations, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay) == (42500, 128, 0.1, 0.9, 5e-4)
    assert cfg.milestones == (20000, 30000, 37500) and (cfg.label_smoothing, cfg.log_eps) == (0.01, 1e-4)
    assert cfg == CifarConfig(model_name=model_name, mhe_power="0" if power == "-" else power)  # = the built-in defaults
    # these three, and one recipe per other objective of the MHE family (tests/test_mhe_family_training.py)
    from sphereface_plus.mhe import OBJECTIVES

    family = [n for n in OBJECTIVES if n != "mhe"]
    assert [p.stem for p in CIFAR_CONFIGS] == sorted(["baseline", "mhe", "half_mhe", *family])


def test_cifar_seed_flags_are_aliases_that_override_the_yaml():
    import argparse

    from sphereface_plus.commands import cifar
    from sphereface_plus.commands.cifar import config_from_args

    parser = argparse.ArgumentParser()
    cifar.add_arguments(parser)
    args = parser.parse_args(["--config", str(REPO / "configs" / "cifar" / "half_mhe.yaml"), "iterations=50",
                              "--power_s", "a1", "--batch-size", "64", "--dataset", "cifar10"])
    cfg = config_from_args(args)
    assert (cfg.model_name, cfg.mhe_power, cfg.batch_size, cfg.iterations, cfg.dataset) == ("half_mhe", "a1", 64, 50, "cifar10")
    args = parser.parse_args(["--model-name", "baseline", "lr=0.5", "--lr", "0.2"])  # a flag wins over key=value
    cfg = config_from_args(args)
    assert (cfg.model_name, cfg.mhe_power, cfg.lr) == ("baseline", "-", 0.2)
    with pytest.raises(ConfigError, match="Did you mean 'batch_size'"):
        config_from_args(parser.parse_args(["batch_sise=3"]))


@pytest.mark.parametrize("name", ["sphereface20_casia_released", "spherefaceplus20_casia_released"])
def test_released_recipes_print_through_the_cli(name, tmp_path):
    """The released-recipe configs (head.gradient=caffe, mhe.mode=caffe_among) load and print."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "sphereface_plus.cli", "train", "--config",
                           str(REPO / "configs" / "face" / f"{name}.yaml"), "--print-config", f"data.root={tmp_path}"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["head"]["gradient"] == "caffe" and printed["head"]["name"] == "a_softmax"
    if "plus" in name:
        assert (printed["mhe"]["mode"], printed["mhe"]["lambda_m"]) == ("caffe_among", 10.0)
    assert not (tmp_path / "runs").exists()  # printing writes nothing


def _build(overrides):
    """The recipe resolved and its model built (the head is built once, by the trainer: its values are
    judged there), on a stand-in dataset of 10 classes."""
    from trainer_stubs import TinyFaces

    from sphereface_plus.face.trainer import FaceTrainer

    cfg = load_config(None, ["data.source=synthetic", "model.backbone=sphere4", "train.device=cpu",
                             "train.precision=fp32", *overrides])
    return FaceTrainer.from_config(cfg, TinyFaces(10))


def test_head_gradient_is_checked_against_the_heads_list(tmp_path):
    from sphereface_plus.heads import A_SOFTMAX_GRADIENTS

    for gradient in A_SOFTMAX_GRADIENTS:
        assert load_config(None, ["data.source=synthetic", f"head.gradient={gradient}"]).head.gradient == gradient
    assert load_config(None, ["data.source=synthetic"]).head.gradient is None  # the head's own default
    with pytest.raises(ConfigError, match="'gradient': 'approx'.*exact, caffe, detached"):
        _build([f"out_dir={tmp_path}", "head.gradient=approx"])
    with pytest.raises(ConfigError, match="head.name='arcface'.*'gradient': 'caffe'.*ArcFace gradient.*exact, detached"):
        _build([f"out_dir={tmp_path}", "head.name=arcface", "head.gradient=caffe"])
    with pytest.raises(ConfigError, match="mhe.mode='among'.*caffe_among"):
        load_config(None, ["data.source=synthetic", "mhe.mode=among"])


def test_exponent_floats_without_a_dot_are_numbers():
    # YAML 1.1 reads "2e-4" as a string; the loader follows YAML 1.2 here, as it does for booleans
    from sphereface_plus.face.config import load_config

    cfg = load_config(None, ["optim.lr=2e-4", "optim.weight_decay=5E-4"])
    assert cfg.optim.lr == 2e-4 and cfg.optim.weight_decay == 5e-4


def test_a_renamed_key_still_loads_with_a_warning(tmp_path, caplog):
    """One spelling per knob: the training precision is train.precision (every command's name for it); the
    earlier name (OLD) still loads from old recipes and the configs stored in old checkpoints, and the log says
    what to write instead."""
    old = "train." + "amp"  # spelled apart so the renaming scripts leave it alone
    p = tmp_path / "old.yaml"
    p.write_text("train:\n  " + old.split(".")[1] + ": fp32\n")
    with caplog.at_level("WARNING", logger="sphereface_plus.config"):
        cfg = load_config(str(p), [old + "=bf16"])
    assert cfg.train.precision == "bf16"  # the override, given under the old name too, wins over the file
    assert sum(f"{old} is now called train.precision" in r.getMessage() for r in caplog.records) == 2
    with pytest.raises(ConfigError, match="unknown config key 'train.precisio'"):
        load_config(None, ["train.precisio=bf16"])


def test_head_settings_are_the_heads_own_and_checked_against_its_signature(tmp_path):
    """``head`` holds name / parallel / sample_rate plus the head's own settings, validated
    against the head's constructor (heads.head_parameters): YAML and key=value both work, an unknown key
    names the head's valid keys and the nearest, a value is checked against the declared type."""
    from sphereface_plus.face.config import FaceConfig as Config
    from sphereface_plus.heads import head_parameters

    p = tmp_path / "opensphere.yaml"
    p.write_text("data:\n  source: synthetic\nhead:\n  name: a_softmax\n  m: 1.7\n  s: 64\n  feature_norm: hard\n"
                 "  gradient: detached\n")
    cfg = load_config(str(p), ["head.base=0", "head.lambda_min=0"])
    assert (cfg.head.m, cfg.head.s, cfg.head.feature_norm, cfg.head.gradient) == (1.7, 64.0, "hard", "detached")
    assert cfg.head.power is None  # a setting of a_softmax not given: the head's own default
    head = cfg.to_dict()["head"]
    assert head == {"name": "a_softmax", "parallel": "replicated", "sample_rate": 1.0, "m": 1.7, "s": 64.0,
                    "feature_norm": "hard", "gradient": "detached", "base": 0.0, "lambda_min": 0.0}
    assert Config.from_dict(cfg.to_dict()) == cfg  # a checkpoint's config reads back
    assert load_config(str(p), ["head.m=1.5"]).head.m == 1.5
    assert "m" not in load_config(str(p), ["head.m=null"]).head.settings  # null: not set
    with pytest.raises(ConfigError, match=r"head\.mm.*opensphere\.yaml|head\.mm") as info:
        load_config(str(p), ["head.mm=3"])
    assert "Did you mean 'head.m'" in str(info.value)
    assert ", ".join(sorted(head_parameters("a_softmax"))) in str(info.value)
    with pytest.raises(ConfigError, match="head.name='arcface' does not take.*Its settings: easy_margin"):
        load_config(None, ["head.name=arcface", "head.lambda_min=5"])
    with pytest.raises(ConfigError, match="head.renorm_weight expects true or false"):
        load_config(None, ["head.renorm_weight=3"])
    with pytest.raises(ConfigError, match=r"\[1, 4\]"):
        _build([f"out_dir={tmp_path}", "head.m=5"])
    with pytest.raises(AttributeError):
        cfg.head.easy_margin  # not a setting of a_softmax
