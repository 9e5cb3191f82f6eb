"""The classifier-head contract (docs/theory.md#head-contract): a head owns its loss.

A head maps ``(embeddings B x d, labels B)`` to a :class:`HeadOutput`:

- ``loss``: a 0-dim tensor (float32 in the trainer, which runs the head outside autocast; the
  dtype of the head and embeddings otherwise), the head's *whole* loss for the batch, its own auxiliary terms
  included (MagFace's regulariser, SphereFace-R soft's norm term). The trainer adds only the
  SphereFace+ term ``mhe.lambda_m * MHE(head.weight)`` (docs/theory.md#sphereface-plus) and backpropagates.
- ``logits``: ``B x C``, whose argmax is the prediction (the trainer's accuracy).
- ``terms``: ``{name: detached 0-dim tensor}`` that the trainer logs as they are, e.g. ``"ce"`` (the
  unweighted softmax cross-entropy), ``"binary"`` (the unweighted binary loss), ``"lambda"``
  (A-Softmax's annealing weight in force), ``"norm_loss"``. A head reports its schedules here; the
  trainer never asks a head for anything by duck typing.

Every head subclasses :class:`ClassifierHead` and implements a few hooks; :meth:`ClassifierHead.forward`
is written once, here, from them, and the row-sharded classifier (:mod:`sphereface_plus.parallel`)
composes the *same* hooks over blocks of rows, so every head runs sharded without code of its own:

``loss_kind``
    ``"softmax"``: ``loss = loss_weight * CE(margin_logits, labels)``, the cross-entropy over all C
    classes, mean over the batch. ``"binary"``: ``loss = loss_weight * mean_b Σ_j
    binary_loss_terms(logits, labels)[b, j]``, the sum over classes of independent per-(sample, class)
    terms (SphereFace2), so a block of rows contributes its block's sum and the blocks add up.
``margin_logits(embeddings, labels) -> B x C``
    The training logits with the margin on each sample's target column. ``labels`` may hold
    :data:`NO_TARGET` (-1) when the head is one block of rows of a sharded classifier
    (``row_block=True``): that sample's class is in another block, so its row has no target here.
    ``labels=None``: margin-free logits (inference).
``binary_loss_terms(logits, labels) -> B x C``
    Binary heads only: the per-(sample, class) loss terms (a label of :data:`NO_TARGET` makes every
    class of the block a negative).
``loss_weight``
    A float property multiplying the main loss (1 by default; SphereFace-R's ``lw / s``).
``aux_loss(embeddings) -> (0-dim tensor, terms)``
    Terms that depend on the embeddings alone (default zero). The sharded classifier computes it once
    per *global* batch, not once per block, so it must not use the rows.
``begin_forward()``
    Called once per forward, before :meth:`margin_logits`, by :meth:`forward` and by the sharded
    classifier (on the whole stored block, also when Partial FC samples rows): advance schedules (only
    in training mode) and rescale stored rows (``renorm_weight``). Schedules are buffers, so they are
    saved in checkpoints with the head's state dict.
``state_terms() -> terms``
    The schedule values in force, for the log (A-Softmax: ``{"lambda": ...}``).

Parameters: every head has a ``C x d`` :class:`~torch.nn.Parameter` ``weight`` (so the SphereFace+
MHE term composes with every head). ``row_parameters`` names the state-dict entries whose first
dimension is the class (default ``("weight",)``; the softmax head adds ``"bias"``): a sharded run splits
them by rows. ``shared_parameters`` names parameters that every rank holds whole (SphereFace2's scalar
bias): the sharded classifier replicates them and all-reduces (sums) their gradient.

Initialisation (docs/theory.md#head-init): :meth:`ClassifierHead.init_rows_` (the function
:func:`init_rows`) draws the rows of the whole ``C x d`` classifier in world-size-independent chunks from ``(seed, chunk)`` generators, so
the same seed gives the same classifier whether it is replicated or split over any number of
processes. A head created alone (``create_head``) is initialised by :meth:`reset_parameters` from the
default generator; the trainer then calls ``init_rows_(seed)`` (docs/heads.md).

A head for your own loss: subclass :class:`ClassifierHead`, implement :meth:`margin_logits` (and, for
a binary loss, :meth:`binary_loss_terms`), register a builder with
:func:`sphereface_plus.heads.register_head`; its constructor's keyword arguments are its settings
(``head.<name>=value`` in a recipe), with their defaults.
"""
from __future__ import annotations

import abc
import math
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from sphereface_plus.heads.functional import NO_TARGET, check_labels

__all__ = ["HeadOutput", "ClassifierHead", "LOSS_KINDS", "NO_TARGET", "INIT_CHUNK", "init_rows", "zero_loss"]

#: the losses a head can declare (``ClassifierHead.loss_kind``)
LOSS_KINDS = ("softmax", "binary")

INIT_CHUNK = 4096  # rows per independently seeded chunk of the world-size-independent initialisation

Terms = Dict[str, torch.Tensor]


class HeadOutput(NamedTuple):
    """What a head returns for a batch (see the module docstring).

    ``loss``: 0-dim, the head's whole loss (None when called without labels: inference);
    ``logits``: ``B x C`` (argmax = prediction); ``terms``: detached 0-dim tensors to log.
    """

    loss: Optional[torch.Tensor]
    logits: torch.Tensor
    terms: Terms


def zero_loss(like: torch.Tensor) -> torch.Tensor:
    """A 0-dim zero of ``like``'s dtype and device (the default auxiliary loss)."""
    return torch.zeros((), dtype=like.dtype, device=like.device)


def init_rows(weight: torch.Tensor, start: int, num_classes: int, seed: int, unit_rows: bool) -> None:
    """Initialise rows ``[start, start + len(weight))`` of a ``num_classes x d`` classifier in place.

    Xavier-uniform with the fan of the *whole* classifier (bound ``sqrt(6 / (d + C))``, Caffe's xavier
    filler as the SphereFace prototxt uses it), drawn in chunks of :data:`INIT_CHUNK` rows from
    generators seeded by ``(seed, chunk)``: so the initial classifier is the same whatever the world
    size and layout (a replicated head calls it with ``start=0`` and all rows), and no two ranks draw
    the same rows. ``unit_rows``: then rescale every row to unit length.
    """
    rows, dim = weight.shape
    bound = math.sqrt(6.0 / (dim + num_classes))
    out = torch.empty(rows, dim, dtype=torch.float32)
    end = start + rows
    for chunk in range(start // INIT_CHUNK, (end - 1) // INIT_CHUNK + 1):
        lo = chunk * INIT_CHUNK
        hi = min(lo + INIT_CHUNK, num_classes)
        gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + chunk) % (1 << 63))
        block = torch.empty(hi - lo, dim).uniform_(-bound, bound, generator=gen)
        a, b = max(lo, start), min(hi, end)
        out[a - start:b - start] = block[a - lo:b - lo]
    if unit_rows:
        out.div_(out.norm(dim=1, keepdim=True).clamp_min(1e-12))
    with torch.no_grad():
        weight.copy_(out)


class ClassifierHead(nn.Module, abc.ABC):
    """Base class of every classifier head: a ``C x d`` ``weight`` and the hooks of the contract.

    Class attributes a subclass may change: ``loss_kind`` (:data:`LOSS_KINDS`), ``row_parameters``,
    ``shared_parameters``, ``unit_rows`` (rows initialised to unit length; the hyperspherical heads),
    ``main_term`` (the name of the unweighted main loss in ``terms``: ``"ce"`` or ``"binary"``).
    Instance attributes: ``row_block`` (set by the sharded classifier: labels may be :data:`NO_TARGET`),
    ``renorm_weight`` (rescale the stored rows to unit length at each training forward).
    """

    loss_kind: str = "softmax"
    row_parameters: Tuple[str, ...] = ("weight",)
    shared_parameters: Tuple[str, ...] = ()
    unit_rows: bool = True
    # True on a head that holds one block of rows of a row-sharded classifier (sphereface_plus.parallel
    # sets it on its instance): its labels may then be NO_TARGET (-1), "this sample's class is elsewhere"
    row_block: bool = False

    def __init__(self, in_features: int, num_classes: int, renorm_weight: bool = False):
        super().__init__()
        if int(in_features) < 1 or int(num_classes) < 2:
            raise ValueError(
                f"a classifier head needs in_features >= 1 and num_classes >= 2, got in_features={in_features}, "
                f"num_classes={num_classes}"
            )
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.renorm_weight = bool(renorm_weight)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.in_features))

    @classmethod
    def settings_in_force(cls, settings: Dict[str, Any]) -> Dict[str, Any]:
        """The values this head would use for ``settings`` (its constructor's keyword arguments, the given ones
        and the plain defaults): a head whose default is derived from another setting (``None`` in its
        signature) fills it in, so a run's recorded config names every value it trained with. Pure: nothing
        is built; a setting it cannot derive (an invalid other setting) is left out for the constructor to
        report."""
        return dict(settings)

    # ------------------------------------------------------------------ initialisation
    def reset_parameters(self) -> None:
        """Default initialisation from the default generator: Caffe's xavier filler (uniform, fan of
        the whole classifier), unit rows when ``unit_rows``. Subclasses with more parameters extend it."""
        nn.init.xavier_uniform_(self.weight)
        if self.unit_rows:
            with torch.no_grad():
                self.weight.div_(self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def init_rows_(self, seed: int, start: int = 0, num_classes: Optional[int] = None) -> None:
        """World-size-independent initialisation of the rows (:func:`init_rows`): this head holds rows
        ``[start, start + self.num_classes)`` of a ``num_classes``-class classifier (default: all of
        them). Parameters other than the rows keep :meth:`reset_parameters`' values (a subclass whose
        other parameters are random overrides this and draws them from ``seed`` too)."""
        init_rows(self.weight, int(start), int(num_classes or self.num_classes), seed, unit_rows=self.unit_rows)

    # ------------------------------------------------------------------ hooks
    @property
    def main_term(self) -> str:
        return "ce" if self.loss_kind == "softmax" else "binary"

    @property
    def loss_weight(self) -> float:
        """Multiplies the main loss (CE or the binary loss); 1 unless the head says otherwise."""
        return 1.0

    def begin_forward(self) -> None:
        """Once per forward, before :meth:`margin_logits`: rescale the stored rows (``renorm_weight``,
        training mode) and advance schedules. A subclass with a schedule calls ``super().begin_forward()``."""
        # The SphereFace Caffe layer rescales the stored weight rows to unit length at every training
        # forward; the logits still normalise in the graph, so the gradient is the exact one of the
        # normalised model. An in-place update: call backward() on one forward's loss before the next.
        if self.renorm_weight and self.training:
            with torch.no_grad():
                self.weight.div_(self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @abc.abstractmethod
    def margin_logits(self, embeddings: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """``B x C`` training logits (margin on each target; ``labels=None``: margin-free)."""

    def binary_loss_terms(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``B x C`` per-(sample, class) loss terms of a binary head (``NO_TARGET``: all negatives)."""
        raise TypeError(f"{type(self).__name__} has loss_kind={self.loss_kind!r}, not 'binary': it has no binary "
                        "loss terms")

    def aux_loss(self, embeddings: torch.Tensor) -> Tuple[torch.Tensor, Terms]:
        """Loss terms of the embeddings alone (added to the loss once per global batch): default none."""
        return zero_loss(embeddings), {}

    def state_terms(self) -> Terms:
        """Schedule values in force, for the log (e.g. ``{"lambda": tensor}``)."""
        return {}

    # ------------------------------------------------------------------ composed from the hooks
    #: check each batch's label range (False when the caller checked it already: the face trainer does,
    #: once per batch on the host, so that the step has no host sync for it)
    check_label_range = True

    def check_labels(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``labels`` as a flat long tensor on the embeddings' device, checked against this head's
        classes (:data:`NO_TARGET` only when ``row_block``; the range only when ``check_label_range``)."""
        labels = check_labels(labels, embeddings.shape[0], self.num_classes, allow_no_target=self.row_block,
                              check_range=self.check_label_range)
        return labels.to(embeddings.device)

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Margin-free ``B x C`` logits (inference; no schedule advances)."""
        return self.margin_logits(embeddings, None)

    def main_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The unweighted main loss of a whole (unsharded) head: mean CE, or the mean over samples of
        the per-sample sums of :meth:`binary_loss_terms`."""
        if self.loss_kind == "softmax":
            return F.cross_entropy(logits, labels)
        if self.loss_kind == "binary":
            return self.binary_loss_terms(logits, labels).sum(dim=1).mean()
        raise ValueError(f"{type(self).__name__}.loss_kind={self.loss_kind!r}: choose one of {', '.join(LOSS_KINDS)}")

    def forward(self, embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None) -> HeadOutput:
        """``HeadOutput(loss, logits, terms)``; ``labels=None``: margin-free logits, ``loss`` None."""
        if labels is None:
            return HeadOutput(None, self.logits(embeddings), {})
        labels = self.check_labels(embeddings, labels)
        self.begin_forward()
        logits = self.margin_logits(embeddings, labels)
        main = self.main_loss(logits, labels)
        aux, aux_terms = self.aux_loss(embeddings)
        loss = self.loss_weight * main + aux
        terms = {self.main_term: main.detach(), **{k: v.detach() for k, v in aux_terms.items()}, **self.state_terms()}
        return HeadOutput(loss, logits, terms)
