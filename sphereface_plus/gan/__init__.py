"""MHE-GAN (wy1iu/MHE ``MHE-GAN``): networks, losses, the MHE term, training steps and FID/KID.

::

    from sphereface_plus.gan import Generator, Discriminator, gan_mhe_loss, fid_kid

- :mod:`~sphereface_plus.gan.models`: ``Generator(z_dim=128)`` (DCGAN) and
  ``Discriminator(spectral_norm=True|False)`` (SN-DCGAN standard CNN), as in ``net.py``.
- :mod:`~sphereface_plus.gan.losses`: non-saturating and hinge losses, ``gan_mhe_loss`` (``ops.py``).
- :mod:`~sphereface_plus.gan.steps`: ``g_step``, ``d_step``, ``train_iteration``, noise, sampling, grids.
- :mod:`~sphereface_plus.gan.inception_metrics`: FID and KID in the TF-2015 Inception pool3 space (offline),
  IS only with a user-supplied weights file.

Importing this package loads nothing heavy; the Inception network is loaded when first asked for.
"""
from __future__ import annotations

from sphereface_plus.lazy_exports import lazy_exports

_EXPORTS = {
    "Generator": "sphereface_plus.gan.models",
    "Discriminator": "sphereface_plus.gan.models",
    "spectral_normalize": "sphereface_plus.gan.models",
    "Z_DIM": "sphereface_plus.gan.models",
    "LOSSES": "sphereface_plus.gan.losses",
    "MHE_KERNELS": "sphereface_plus.gan.losses",
    "MHE_MAGNITUDE": "sphereface_plus.gan.losses",
    "adversarial_losses": "sphereface_plus.gan.losses",
    "original_mhe_term": "sphereface_plus.gan.losses",
    "gan_mhe_loss": "sphereface_plus.gan.losses",
    "make_optimizers": "sphereface_plus.gan.steps",
    "images_to_tensor": "sphereface_plus.gan.steps",
    "tensor_to_images": "sphereface_plus.gan.steps",
    "noise_batches": "sphereface_plus.gan.steps",
    "fixed_noise": "sphereface_plus.gan.steps",
    "g_step": "sphereface_plus.gan.steps",
    "d_step": "sphereface_plus.gan.steps",
    "train_iteration": "sphereface_plus.gan.steps",
    "generate_images": "sphereface_plus.gan.steps",
    "save_grid": "sphereface_plus.gan.steps",
    "InceptionPool3": "sphereface_plus.gan.inception_metrics",
    "FeatureStats": "sphereface_plus.gan.inception_metrics",
    "inception_file": "sphereface_plus.gan.inception_metrics",
    "feature_stats": "sphereface_plus.gan.inception_metrics",
    "real_stats": "sphereface_plus.gan.inception_metrics",
    "frechet_distance": "sphereface_plus.gan.inception_metrics",
    "kernel_inception_distance": "sphereface_plus.gan.inception_metrics",
    "inception_score": "sphereface_plus.gan.inception_metrics",
    "fid_kid": "sphereface_plus.gan.inception_metrics",
    "compare_stats": "sphereface_plus.gan.inception_metrics",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
