"""Fine-tuning an imported model (``train.init_from``, sphereface_plus/face/init_source.py): the run takes the
model's network and template, feeds it the model's own input convention, and its checkpoints load in ``verify``
with that convention again.

The reference is written out here: the source network applied to ``(pixels[RGB] - mean) / std`` of the same
uint8 pixels, computed from the pixels themselves (not through the toolkit's adapter)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sphereface_plus.commands.train import resolve_recipe, train
from sphereface_plus.config import ConfigError
from sphereface_plus.face.config import load_config
from sphereface_plus.face.trainer import FaceTrainer
from sphereface_plus.importers import face_checkpoint
from sphereface_plus.importers.preprocessing import Preprocessing
from sphereface_plus.models import create_backbone
from sphereface_plus.utils import atomic_torch_save
from tests.trainer_stubs import TinyFaces

MEAN, STD = [120.0, 110.0, 100.0], [60.0, 62.0, 64.0]  # per channel, RGB order: not the toolkit's


def _imported(tmp_path, head=None, head_name="cosface"):
    """A model as `sphereface-plus import` writes it: sphere4, 112x112 RGB crops, its own mean / std."""
    torch.manual_seed(3)
    net = create_backbone("sphere4", input_size=(112, 112), embedding_dim=128)
    pre = Preprocessing(template="112x112", color="rgb", mean=MEAN, std=STD, flip="sum", embedding="fc5",
                        source="test")
    src = tmp_path / "weights.bin"
    src.write_bytes(b"released")
    ckpt = face_checkpoint("sphere4", net.state_dict(), pre, [src], "pytorch", 128, head=head,
                           head_config={"name": head_name} if head is not None else None)
    path = tmp_path / "imported.pt"
    atomic_torch_save(ckpt, path)
    return path, net


def _source_reference(net, pixels_bgr: np.ndarray) -> torch.Tensor:
    """The source pipeline from the uint8 pixels: RGB, (p - mean) / std, then the network (float64 math)."""
    rgb = torch.from_numpy(pixels_bgr[:, ::-1].copy()).double()
    x = (rgb - torch.tensor(MEAN).double().view(1, 3, 1, 1)) / torch.tensor(STD).double().view(1, 3, 1, 1)
    return net.double()(x).float()


def _recipe(tmp_path, init, *extra):
    return load_config("configs/face/cpu_smoke.yaml", [f"out_dir={tmp_path / 'run'}", f"train.init_from={init}",
                                                       "train.precision=fp32", "train.iterations=2",
                                                       "eval.pairs=", *extra])


def test_the_run_takes_the_imported_network_template_and_input_convention(tmp_path):
    init, net = _imported(tmp_path)
    resolved = resolve_recipe(_recipe(tmp_path, init))
    cfg = resolved.config
    assert (cfg.model.backbone, cfg.model.embedding_dim, cfg.data.template) == ("sphere4", 128, "112x112")
    assert resolved.input_size == (112, 112) and resolved.preprocessing["color"] == "rgb"

    trainer = FaceTrainer(resolved, TinyFaces(5, input_size=(112, 112)))
    for k, v in net.state_dict().items():  # the imported weights, untouched
        assert torch.equal(trainer.network.state_dict()[k], v), k
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 112, 112)).astype(np.uint8)
    toolkit_input = (torch.from_numpy(pixels).float() - 127.5) / 128  # what the data pipeline feeds
    trainer.model.eval()
    with torch.no_grad():
        got = trainer.model.backbone(toolkit_input)
        want = _source_reference(net, pixels)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())), (got - want).abs().max()


def test_a_fine_tuned_run_loads_in_verify_with_the_models_convention(tmp_path):
    from eval.features import load_embedding_model

    init, _ = _imported(tmp_path)
    summary = train(_recipe(tmp_path, init))
    ckpt = torch.load(summary["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["preprocessing"]["color"] == "rgb" and ckpt["preprocessing"]["mean"] == MEAN
    model, info = load_embedding_model(summary["checkpoint"])
    assert info["template"] == "112x112" and info["flip_policy"] == "sum"
    tuned = create_backbone("sphere4", input_size=(112, 112), embedding_dim=128)
    tuned.load_state_dict(ckpt["model"])
    pixels = np.random.default_rng(1).integers(0, 256, (2, 3, 112, 112)).astype(np.uint8)
    with torch.no_grad():
        got = model((torch.from_numpy(pixels).float() - 127.5) / 128)
        want = _source_reference(tuned.eval(), pixels)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_a_recipe_naming_another_network_is_refused(tmp_path):
    init, _ = _imported(tmp_path)
    with pytest.raises(ConfigError, match=r"model.backbone='sphere10' .*sphere4"):
        resolve_recipe(_recipe(tmp_path, init, "model.backbone=sphere10"))
    with pytest.raises(ConfigError, match=r"model.embedding_dim=64 .*128"):
        resolve_recipe(_recipe(tmp_path, init, "model.embedding_dim=64"))


@pytest.mark.parametrize("classes,name,kept", [(5, "a_softmax", True), (7, "a_softmax", False),
                                               (5, "cosface", False)])
def test_the_head_is_kept_only_when_it_is_the_same_head_over_the_same_classes(tmp_path, classes, name, kept):
    from sphereface_plus.heads import HEADS

    torch.manual_seed(5)
    head = HEADS.get(name)(128, classes).state_dict()
    init, _ = _imported(tmp_path, head=head, head_name=name)
    trainer = FaceTrainer(resolve_recipe(_recipe(tmp_path, init)), TinyFaces(5, input_size=(112, 112)))
    own = trainer.model.head.state_dict()
    same = set(own) == set(head) and all(torch.equal(own[k], head[k]) for k in own)
    assert same == kept


@pytest.mark.parametrize("scale", [0.0, 0.25])
def test_backbone_lr_scale_scales_the_backbones_first_update_alone(tmp_path, scale):
    """The first SGD step is ``w -= lr (g + wd w)`` (momentum has no history yet): from the same start on the
    same batch, the backbone moves ``scale`` times as far as at scale 1 and the head exactly as far."""
    torch.set_num_threads(1)
    init, _ = _imported(tmp_path)
    g = torch.Generator().manual_seed(7)
    images, labels = torch.randn(8, 3, 112, 112, generator=g), torch.randint(0, 5, (8,), generator=g)
    moves = {}
    for s in (1.0, scale):
        cfg = _recipe(tmp_path / str(s), init, f"optim.backbone_lr_scale={s}", "train.float64=true",
                      "mhe.lambda_m=0")
        trainer = FaceTrainer(resolve_recipe(cfg), TinyFaces(5, input_size=(112, 112)))
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.train_step(images.double(), labels)
        moves[s] = {k: trainer.model.state_dict()[k] - before[k] for k in before}
    for k, full in moves[1.0].items():
        want = full * scale if k.startswith("backbone.") else full
        assert torch.allclose(moves[scale][k], want, rtol=1e-9, atol=1e-12), k
    assert any(full.abs().max() > 0 for k, full in moves[1.0].items() if k.startswith("backbone."))


def test_backbone_lr_scale_is_refused_out_of_range_and_with_a_sharded_head(tmp_path):
    with pytest.raises(ConfigError, match="backbone_lr_scale=1.5 must be in"):
        load_config(None, ["optim.backbone_lr_scale=1.5"])
    with pytest.raises(ConfigError, match="replicated head only"):
        load_config(None, ["optim.backbone_lr_scale=0.1", "head.parallel=sharded"])
