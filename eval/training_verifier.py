"""The verifier a face training run validates with, from its recipe's ``eval`` section (docs/train.md).

``eval.packs`` (standard insightface packs in ``eval.pack_dir``, insightface's protocol) or ``eval.pairs`` /
``eval.root`` (an LFW-style pairs file on aligned crops, the sphereface protocol; ``auto``: the synthetic
set's own person-disjoint pairs), or none. The verifier is a callable the trainer gives its backbone
(``verifier(backbone, device, precision=, channels_last=) -> report``, docs/interfaces.md).
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

from eval.lfw import pairs_verifier
from eval.packs import packs_verifier
from sphereface_plus.templates import TEMPLATE_SIZES

logger = logging.getLogger(__name__)

__all__ = ["training_verifier"]


def training_verifier(cfg, dataset=None) -> Optional[Callable]:
    """The verifier of a face recipe ``cfg`` (see the module docstring), or None. ``dataset``: the run's
    training set (``eval.pairs=auto`` reads the synthetic set's ``verification_pairs``)."""
    if cfg.eval.packs:
        return packs_verifier(cfg.eval.pack_dir, cfg.eval.packs, input_size=TEMPLATE_SIZES[cfg.data.template],
                              batch_size=cfg.eval.batch_size)
    pairs, root = cfg.eval.pairs, cfg.eval.root
    if not pairs:
        return None
    if pairs == "auto":  # the synthetic set's own person-disjoint pairs, on its aligned crops, if any
        own = getattr(dataset, "verification_pairs", None)
        if own is None:
            logger.info("eval.pairs=auto: no synthetic pairs, no verification during training (give "
                        "eval.pairs=<pairs.txt> eval.root=<crops> to verify on your own pairs)")
            return None
        pairs, root = (str(p) for p in own)
    return pairs_verifier(pairs, root, batch_size=cfg.eval.batch_size)
