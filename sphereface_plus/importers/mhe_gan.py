"""The MHE-GAN TensorFlow 1 checkpoints (wy1iu/MHE ``MHE-GAN/{sn,non-sn}-model``) to the toolkit's GAN.

Variable names of the original ``net.py`` / ``libs/ops.py`` (scopes ``generator`` and ``critic``):

* ``generator/l0/w`` ``[128, 8192]`` (``linear``, no bias) -> ``l0.weight`` (transposed);
  ``generator/bn{0..3}/{gamma,beta,moving_mean,moving_variance}`` (``tf.contrib.layers.batch_norm``) ->
  ``bn{i}.{weight,bias,running_mean,running_var}``;
  ``generator/dc{1..4}/w`` ``[kh, kw, out, in]`` (``conv2d_transpose`` filter) -> ``dc{i}.weight``
  ``[in, out, kh, kw]``; ``generator/dc{i}/b`` -> ``dc{i}.bias``.
* ``critic/{c0_0..c3_0}/w`` ``[kh, kw, in, out]`` -> ``[out, in, kh, kw]``, ``/b`` -> bias;
  ``critic/l4/w`` ``[8192, 1]`` -> ``l4.weight`` (transposed; the NHWC flatten is the module's own);
  spectral norm's power-iteration vector ``critic/<layer>/u`` ``[1, out]`` (``libs/sn.py``) ->
  ``<layer>.sn_u``. Its presence tells the SN model from the non-SN one.

Optimiser slots (``.../Adam``, ``beta1_power``) are ignored; ``global_step`` becomes the iteration.
The kernel transposes are the ones :mod:`sphereface_plus.gan.models` documents (its layers keep TF's
NHWC order at the two reshapes, so no other permutation is needed).
"""
from __future__ import annotations

import logging
from typing import Any, Dict

import numpy as np
import torch

from sphereface_plus.errors import CheckpointError

logger = logging.getLogger(__name__)

__all__ = ["import_mhe_gan", "generator_state", "discriminator_state", "G_SCOPE", "D_SCOPE"]

G_SCOPE, D_SCOPE = "generator", "critic"


def _get(variables: Dict[str, np.ndarray], name: str, where: str) -> np.ndarray:
    if name not in variables:
        near = sorted(k for k in variables if k.split("/")[0] == name.split("/")[0])[:3]
        raise CheckpointError(f"{where}: no variable {name!r} (an MHE-GAN checkpoint of the original net.py has it"
                              + (f"; found e.g. {', '.join(near)}" if near else "; is it an MHE-GAN checkpoint?") + ")")
    return variables[name]


def generator_state(variables: Dict[str, np.ndarray], where: str) -> Dict[str, torch.Tensor]:
    state: Dict[str, torch.Tensor] = {"l0.weight": torch.from_numpy(_get(variables, f"{G_SCOPE}/l0/w", where).T.copy())}
    for i in range(4):
        for tf_name, name in (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"),
                              ("moving_variance", "running_var")):
            state[f"bn{i}.{name}"] = torch.from_numpy(_get(variables, f"{G_SCOPE}/bn{i}/{tf_name}", where).copy())
    for i in range(1, 5):
        w = _get(variables, f"{G_SCOPE}/dc{i}/w", where)
        if w.ndim != 4:
            raise CheckpointError(f"{where}: {G_SCOPE}/dc{i}/w has shape {w.shape}, a 4-D deconvolution filter expected")
        state[f"dc{i}.weight"] = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
        state[f"dc{i}.bias"] = torch.from_numpy(_get(variables, f"{G_SCOPE}/dc{i}/b", where).copy())
    return state


def discriminator_state(variables: Dict[str, np.ndarray], where: str, spectral_norm: bool) -> Dict[str, torch.Tensor]:
    from sphereface_plus.gan.models import D_CONVS, D_LINEAR

    state: Dict[str, torch.Tensor] = {}
    for name, *_ in D_CONVS:
        w = _get(variables, f"{D_SCOPE}/{name}/w", where)
        if w.ndim != 4:
            raise CheckpointError(f"{where}: {D_SCOPE}/{name}/w has shape {w.shape}, a 4-D convolution filter expected")
        state[f"{name}.weight"] = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
        state[f"{name}.bias"] = torch.from_numpy(_get(variables, f"{D_SCOPE}/{name}/b", where).copy())
    state[f"{D_LINEAR}.weight"] = torch.from_numpy(_get(variables, f"{D_SCOPE}/{D_LINEAR}/w", where).T.copy())
    if spectral_norm:
        for name in [n for n, *_ in D_CONVS] + [D_LINEAR]:
            state[f"{name}.sn_u"] = torch.from_numpy(_get(variables, f"{D_SCOPE}/{name}/u", where).copy())
    return state


def import_mhe_gan(path) -> Dict[str, Any]:
    """A checkpoint for ``sphereface-plus gan --init-from``: ``generator``, ``discriminator``, ``config``
    (``sn`` as found), ``iteration``, ``imported_from``."""
    from sphereface_plus.gan.models import Discriminator, Generator
    from sphereface_plus.importers import check_state_dict
    from sphereface_plus.utils import sha256_file
    from sphereface_plus.importers.tf_bundle import read_tf_checkpoint, resolve_prefix

    prefix = resolve_prefix(path)
    where = f"{prefix}.index"
    variables = read_tf_checkpoint(prefix)
    sn = f"{D_SCOPE}/c0_0/u" in variables
    G, D = Generator(), Discriminator(spectral_norm=sn)
    check_state_dict(G, generator_state(variables, where), where, "MHE-GAN generator")
    # num_batches_tracked is the toolkit's own counter; TF has none (it is only used with momentum=None)
    check_state_dict(D, discriminator_state(variables, where, sn), where,
                     f"MHE-GAN {'SN ' if sn else ''}discriminator")
    step = variables.get("global_step")
    iteration = int(np.asarray(step).reshape(-1)[0]) if step is not None and np.size(step) == 1 else 0
    logger.info("read %d variables of %s (%s discriminator, step %d)", len(variables), prefix,
                "SN" if sn else "plain", iteration)
    return {"generator": G.state_dict(), "discriminator": D.state_dict(), "iteration": iteration,
            "config": {"sn": sn}, "imported_from": {"format": "mhe-gan", "files": [prefix.name + ".index"],
                                                     "sha256": [sha256_file(where)]}}
