"""One MHE-GAN training iteration as pure, engine-independent pieces (``MHE-GAN/*/train.py``).

The original's loop, per iteration: one generator step (fresh noise), then ``n_dis = 1`` discriminator
step (fresh noise, next real batch), both with Adam ``lr 1e-4, betas (0.5, 0.999)``:

* G step: ``x_hat = G(z)`` in training mode (batch statistics, running averages updated),
  ``g_loss(D(x_hat))``; only G's parameters are updated. ``D(x_hat)`` is the fake-image call, so with
  spectral norm it stores the new ``u``.
* D step: ``x_hat = G(z)`` again in training mode (G is not updated), ``d_loss(D(x), D(x_hat)) +
  d_mhe_loss``. The discriminator has no batch-dependent layer, so the real and fake batches go through
  it in one call on their concatenation: that is the original's two calls computed from the same ``u``,
  stored once (the fake call's update).

Sampling: :func:`noise_batches` draws ``z ~ N(0, I)`` with numpy's legacy ``RandomState(seed).randn``
one batch at a time, the stream of the original's ``np.random.seed(s); generator.generate_noise()``:
seed 1337 and one batch for the sample grid, seed 0 and ``50000 // 64 + 1`` batches for evaluation.
:func:`generate_images` runs G in eval mode (BN running averages, ``is_training=False``).
"""
from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from typing import Dict, Iterator, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from sphereface_plus.gan.losses import adversarial_losses, gan_mhe_loss
from sphereface_plus.gan.models import Z_DIM
from sphereface_plus.utils import atomic_write_bytes, progress

__all__ = [
    "LR",
    "BETAS",
    "BATCH_SIZE",
    "ITERATIONS",
    "EVAL_EVERY",
    "EVAL_SAMPLES",
    "SAMPLE_SEED",
    "EVAL_SEED",
    "make_optimizers",
    "images_to_tensor",
    "tensor_to_images",
    "noise_batches",
    "fixed_noise",
    "d_step",
    "g_step",
    "train_iteration",
    "generate_images",
    "grid_columns",
    "save_grid",
]

# train.py flags and constants
LR = 1e-4
BETAS = (0.5, 0.999)
BATCH_SIZE = 64
ITERATIONS = 200_000
EVAL_EVERY = 5000
EVAL_SAMPLES = 50_000
SAMPLE_SEED = 1337  # np.random.seed(1337); sample_noise = generator.generate_noise()
EVAL_SEED = 0  # np.random.seed(0) before the 50k evaluation samples


def make_optimizers(generator: nn.Module, discriminator: nn.Module, lr: float = LR,
                    betas=BETAS) -> tuple:
    """``(opt_g, opt_d)``: Adam on each network's parameters, the original's ``AdamOptimizer(1e-4, 0.5, 0.999)``.

    (The original shares one TF Adam object between the two ``apply_gradients`` calls, which only shares
    its bias-correction counters, so they advance twice per iteration; the effect vanishes after the
    first few hundred steps and is not reproduced.)
    """
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=tuple(betas))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=tuple(betas))
    return opt_g, opt_d


def images_to_tensor(images: np.ndarray, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """``N x H x W x 3`` uint8 RGB -> ``N x 3 x H x W`` float32 in [-1, 1]: ``(x - 127.5) / 127.5`` (input_helper.py)."""
    x = torch.as_tensor(np.ascontiguousarray(images), device=device).permute(0, 3, 1, 2).to(torch.float32)
    return (x - 127.5) / 127.5


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """Generator output (``N x 3 x H x W`` in [-1, 1]) -> ``N x H x W x 3`` uint8, rounded.

    The original clips to [-1, 1] before its Inception network (and truncates in its PNG writer);
    rounding is the unbiased 8-bit quantisation that FID's uint8 input needs.
    """
    x = ((x.detach().clamp(-1, 1) + 1) * 127.5).round_().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def noise_batches(n: int, batch_size: int = BATCH_SIZE, z_dim: int = Z_DIM, seed: int = EVAL_SEED,
                  device: Union[str, torch.device] = "cpu") -> Iterator[torch.Tensor]:
    """``ceil(n / batch_size)`` noise batches (the last one cut to ``n``) from ``RandomState(seed).randn``."""
    rng = np.random.RandomState(seed)
    done = 0
    while done < n:
        z = rng.randn(batch_size, z_dim).astype(np.float32)[: n - done]
        done += z.shape[0]
        yield torch.from_numpy(z).to(device)


def fixed_noise(n: int = BATCH_SIZE, z_dim: int = Z_DIM, seed: int = SAMPLE_SEED,
                device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """The sample-grid noise: ``n`` vectors of ``RandomState(seed).randn`` (the original's 64 with seed 1337)."""
    return torch.cat(list(noise_batches(n, batch_size=n, z_dim=z_dim, seed=seed, device=device)))


@contextlib.contextmanager
def _frozen(module: nn.Module):
    """Parameters of ``module`` without ``requires_grad`` inside the block (no weight gradients computed)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def g_step(generator: nn.Module, discriminator: nn.Module, opt_g: torch.optim.Optimizer, z: torch.Tensor,
           loss: str = "nonsaturating") -> Dict[str, torch.Tensor]:
    """One generator update; returns ``{"g_loss"}`` (detached; no host sync)."""
    _, g_loss_fn = adversarial_losses(loss)
    generator.train()
    fake = generator(z)
    with _frozen(discriminator):  # gradients flow through D to the images, not into D's weights
        g_loss = g_loss_fn(discriminator(fake, update_u=True))
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    return {"g_loss": g_loss.detach()}


def d_step(generator: nn.Module, discriminator: nn.Module, opt_d: torch.optim.Optimizer, real: torch.Tensor,
           z: torch.Tensor, loss: str = "nonsaturating", mhe_magnitude: float = 0.0,
           mhe_power: str = "original", mhe_half_space: bool = False,
           mhe_regularizer=None) -> Dict[str, torch.Tensor]:
    """One discriminator update on a real batch (``N x 3 x 32 x 32`` in [-1, 1]) and ``G(z)``.

    The loss is ``d_loss + gan_mhe_loss(D, mhe_magnitude, ...)``; returns ``{"d_loss", "mhe"}`` (the
    adversarial part and the MHE term as added, detached). ``mhe_regularizer``: another objective of the
    MHE family (:func:`~sphereface_plus.gan.losses.discriminator_regularizer`), advanced here once per
    update at D's learning rate.
    """
    d_loss_fn, _ = adversarial_losses(loss)
    generator.train()  # the original feeds is_training=True here too: BN batch stats, running averages move
    with torch.no_grad():
        fake = generator(z)
    logits = discriminator(torch.cat([fake, real]), update_u=True)
    d_fake, d_real = logits[: fake.shape[0]], logits[fake.shape[0]:]
    d_loss = d_loss_fn(d_real, d_fake)
    if mhe_regularizer is not None and mhe_magnitude > 0:
        mhe_regularizer.advance(opt_d.param_groups[0]["lr"])
    mhe = gan_mhe_loss(discriminator, mhe_magnitude, kernel=mhe_power, half_space=mhe_half_space,
                       regularizer=mhe_regularizer)
    opt_d.zero_grad(set_to_none=True)
    (d_loss + mhe).backward()
    opt_d.step()
    return {"d_loss": d_loss.detach(), "mhe": mhe.detach()}


def train_iteration(generator: nn.Module, discriminator: nn.Module, opt_g: torch.optim.Optimizer,
                    opt_d: torch.optim.Optimizer, real: torch.Tensor, z_g: torch.Tensor, z_d: torch.Tensor,
                    loss: str = "nonsaturating", mhe_magnitude: float = 0.0, mhe_power: str = "original",
                    mhe_half_space: bool = False, mhe_regularizer=None) -> Dict[str, torch.Tensor]:
    """One iteration in the original order: G step on ``z_g``, then D step on ``real`` and ``z_d``."""
    out = g_step(generator, discriminator, opt_g, z_g, loss)
    out.update(d_step(generator, discriminator, opt_d, real, z_d, loss, mhe_magnitude, mhe_power, mhe_half_space,
                      mhe_regularizer))
    return out


def generate_images(generator: nn.Module, n: int, batch_size: int = BATCH_SIZE, seed: int = EVAL_SEED,
                    device: Union[str, torch.device] = "cpu", show_progress: bool = True) -> np.ndarray:
    """``n`` uint8 ``32 x 32 x 3`` samples of G in eval mode from :func:`noise_batches` (``seed``).

    G's train/eval mode is restored afterwards.
    """
    was_training = generator.training
    generator.eval()
    out = []
    try:
        batches = noise_batches(n, batch_size, generator.z_dim, seed, device)
        total = math.ceil(n / batch_size)
        with torch.inference_mode():
            for z in progress(batches, total=total, desc="sampling", unit="batch", disable=None if show_progress else True):
                out.append(tensor_to_images(generator(z)))
    finally:
        generator.train(was_training)
    return np.concatenate(out)


def grid_columns(n: int) -> int:
    """Images per row of the original's ``save_images``: rows = the largest divisor of n <= sqrt(n)."""
    rows = int(math.sqrt(n))
    while n % rows:
        rows -= 1
    return n // rows


def save_grid(images: Union[np.ndarray, torch.Tensor], path: Union[str, Path], columns: Optional[int] = None) -> Path:
    """A sample grid PNG (no border, as the original's ``save_images``), written atomically.

    ``images``: uint8 ``N x H x W x 3`` or a generator output tensor (``N x 3 x H x W`` in [-1, 1]).
    """
    from torchvision.utils import save_image

    if isinstance(images, torch.Tensor):
        images = tensor_to_images(images)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    buf = io.BytesIO()
    save_image(x, buf, format="png", nrow=columns or grid_columns(x.shape[0]), padding=0)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
