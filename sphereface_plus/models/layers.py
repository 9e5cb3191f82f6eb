"""Layers shared by the backbones: a :class:`PReLU` whose training step costs what a ReLU's does.

PReLU (He et al., ICCV 2015, eq. 1) is ``f(x_c) = max(0, x_c) + a_c min(0, x_c)`` with one learned
slope ``a_c`` per channel; its gradients (eq. 2 and 4 there) are

    dL/dx = dL/dy * (1 if x > 0 else a_c),     dL/da_c = sum over every position of channel c of dL/dy * min(0, x)

(``docs/theory.md#prelu-gradient``).

The forward of PyTorch's ``nn.PReLU`` is as fast as a ReLU on a CPU, but its backward
(``aten::_prelu_kernel_backward``) was measured 10-40x slower than ReLU's (``threshold_backward``) on this
project's CPU, float32 and bfloat16, channels_last and contiguous (``bench/prelu_speed.py``,
``docs/performance.md``): it is one scalar TensorIterator loop that writes a full-size slope-gradient
tensor before reducing it. That made the SphereFace-20 training step 1.1-1.2x slower than the same network
with ReLU. :class:`PReLU` keeps ``nn.PReLU``'s forward and can compute the backward with vectorised
passes instead:

    g_pos = threshold_backward(g, x, 0)         # g where x > 0 (ReLU's own backward kernel)
    g_neg = g - g_pos                            # g where x <= 0
    dL/dx = g_pos + a * g_neg                    # one addcmul
    dL/da = channel sums of g_neg * x            # g * min(0, x), summed in float32

which is exactly the gradient above (``x == 0`` counts as negative, as in ``nn.PReLU``), and the slope
gradient is accumulated in float32 also when the activations are bfloat16 under autocast.

Measured (``bench/results/prelu_speed.md``, ``docs/performance.md``): the backward alone is 3-8x faster
than torch's at the middle sphere20 stages, but in the whole float32 training step on this project's (AVX2,
2-core, shared) CPU it lost to ``nn.PReLU`` (1.14-1.20x the ReLU net against 1.09x): its passes are
memory-bound on the large early maps. So it is **not** the default: ``PReLU`` runs torch's kernels unless
``fast_backward=True`` (or the activation dtype is in :data:`FAST_BACKWARD_DTYPES`, empty by default; the
bf16 step could not be timed here, this CPU has no bf16 in oneDNN). What does bring the step to ReLU's cost
is ``torch.compile`` (Inductor fuses PReLU's forward and backward): the compiled PReLU net ran at 0.89x
(contiguous) and 0.99x (channels_last) of the eager ReLU net, and ``train.compile=auto`` compiles CPU runs of
80 iterations or more (:mod:`sphereface_plus.engine.compile`).

It is a drop-in replacement: a subclass of ``nn.PReLU`` with the same constructor (plus ``fast_backward``),
the same parameter ``weight`` (shape ``num_parameters``) and so the same state-dict keys. The fast backward
is used only where a gradient is needed in eager mode; inference, ``torch.compile`` (Inductor fuses the
plain formulation itself), ``torch.jit`` and ONNX export see the plain ``F.prelu``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PReLU", "prelu", "prelu_backward", "FAST_BACKWARD_DTYPES", "check_image_batch"]


def _slope_view(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weight`` shaped to broadcast over ``x``'s channel dimension 1 (a single slope: a scalar view)."""
    if weight.numel() == 1 or x.dim() < 2:
        return weight.reshape(())
    return weight.view((1, -1) + (1,) * (x.dim() - 2))


def _channel_sum(t: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Sum of ``t`` over every dimension but 1 (all of them when not ``per_channel``), in float32 (or float64)."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    if not per_channel:
        return t.sum(dtype=acc).reshape(1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        # N x C x H x W stored as (N*H*W) x C: one column sum over contiguous rows
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).sum(0, dtype=acc)
    if t.is_contiguous() and t.dim() >= 3:
        return t.reshape(t.shape[0], t.shape[1], -1).sum(2, dtype=acc).sum(0)
    dims = [d for d in range(t.dim()) if d != 1]
    return t.sum(dims, dtype=acc)


def prelu_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor):
    """``(dL/dx, dL/dweight)`` of ``y = prelu(x, weight)`` for the incoming ``grad = dL/dy`` (see the module doc).

    Built from differentiable operations, so a double backward still works (in-place only when no graph
    is being recorded)."""
    a = _slope_view(weight, x).to(grad.dtype)
    g_pos = torch.ops.aten.threshold_backward(grad, x, 0)
    g_neg = grad - g_pos
    if torch.is_grad_enabled():  # double backward: out-of-place, so autograd keeps what it saved
        grad_x = torch.addcmul(g_pos, g_neg, a)
        prod = g_neg * x
    else:  # two temporaries in all: the step is memory-bound on the large early maps
        grad_x = g_pos.addcmul_(g_neg, a)
        prod = g_neg.mul_(x)
    grad_w = _channel_sum(prod, weight.numel() > 1 and x.dim() >= 2).to(weight.dtype)
    return grad_x, grad_w.reshape(weight.shape)


class _PReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.prelu(x, weight.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x, grad_w = prelu_backward(grad, x, weight)
        return (grad_x if ctx.needs_input_grad[0] else None), (grad_w if ctx.needs_input_grad[1] else None)


#: activation dtypes whose backward takes :func:`prelu_backward` by default: none, since it won no measured
#: training step (see the module docstring); add ``torch.bfloat16`` where a bf16 CPU measures a gain
FAST_BACKWARD_DTYPES: frozenset = frozenset()


def prelu(x: torch.Tensor, weight: torch.Tensor, fast: Optional[bool] = None) -> torch.Tensor:
    """``F.prelu``, with the backward of :func:`prelu_backward` where a gradient is recorded in eager mode and
    ``fast`` is True (None: when ``x`` is in :data:`FAST_BACKWARD_DTYPES`)."""
    if fast is None:
        fast = x.dtype in FAST_BACKWARD_DTYPES
    if (fast and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
            and not torch.jit.is_scripting() and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()):
        return _PReLUFunction.apply(x, weight)
    return F.prelu(x, weight.to(x.dtype) if weight.dtype != x.dtype else weight)


class PReLU(nn.PReLU):
    """``nn.PReLU`` (same arguments, parameter ``weight``, state-dict keys) with a backward as cheap as ReLU's.

    ``PReLU(num_parameters=1, init=0.25)``: one slope per channel (dimension 1) or a single shared one.
    Under bfloat16 autocast the slopes stay float32 and are cast to the activation dtype for the product.
    """

    def __init__(self, num_parameters: int = 1, init: float = 0.25, device=None, dtype=None,
                 fast_backward: Optional[bool] = None):
        super().__init__(num_parameters, init, device=device, dtype=dtype)
        self.fast_backward = fast_backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return prelu(x, self.weight, self.fast_backward)


def check_image_batch(x: torch.Tensor, input_size) -> None:
    """``x`` must be ``B x 3 x H x W`` with ``(H, W)`` the ``input_size`` the network was built for (its final
    layer's size follows from it); a ``ValueError`` naming both shapes otherwise."""
    if x.dim() != 4 or tuple(x.shape[-2:]) != tuple(input_size) or x.shape[1] != 3:
        raise ValueError(f"expected input of shape B x 3 x {input_size[0]} x {input_size[1]} "
                         f"(this network was built with input_size={input_size}), got {tuple(x.shape)}")
