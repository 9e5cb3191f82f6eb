"""Layers shared by the backbones: a :class:`PReLU` whose training step costs what a ReLU's does.

PReLU (He et al., ICCV 2015, eq. 1) is ``f(x_c) = max(0, x_c) + a_c min(0, x_c)`` with one learned
slope ``a_c`` per channel; its gradients (eq. 2 and 4 there) are

    dL/dx = dL/dy * (1 if x > 0 else a_c),     dL/da_c = sum over every position of channel c of dL/dy * min(0, x)

(``docs/theory.md#prelu-gradient``).

The forward of PyTorch's ``nn.PReLU`` is as fast as a ReLU on a CPU, but its backward
(``aten::_prelu_kernel_backward``, one scalar loop that writes a full-size slope-gradient tensor before
reducing it) was measured 17-30x slower than ReLU's (``threshold_backward``), and ``nn.PReLU`` keeps its
input for the backward while the next convolution keeps its output: two saved tensors per activation where
a ReLU network keeps one. Together that made the SphereFace-20 training step 1.05-1.10x as long as the same
network with ReLU (``bench/prelu_speed.py``, ``docs/performance.md``). :class:`PReLU` keeps ``nn.PReLU``'s
forward kernel and, on a CPU, replaces its backward by vectorised passes that read the saved tensor ``s``:

    b     = min(0, s) * g                       # one buffer, the only full-size allocation (as ReLU's)
    dL/da = channel sums of b                    # summed in float32 (float64 for float64)
    b     = threshold_backward(g, s, 0)         # g where x > 0 (ReLU's own backward kernel), into b
    dL/dx = lerp(b, g, a) = b + a * (g - b)      # in place: g where x > 0, a * g where x <= 0

``s`` is the **output** ``y`` when every slope is positive (then ``y > 0`` exactly where ``x > 0`` and
``min(0, x) = y / a``, so the slope gradient is the channel sum divided by ``a``; the network then saves one
tensor per activation, as with ReLU), and the input ``x`` otherwise (a slope <= 0 loses the sign of ``x``).
Both are the exact gradient above up to rounding (``x == 0`` counts as negative, as in ``nn.PReLU``; an
``a * x`` that underflows to zero drops its ``|x| < 1e-38 / a`` from the slope gradient). Like ``nn.ReLU``'s
saved output, a saved ``y`` must not be changed in place before the backward (autograd refuses it).

It is the default for every floating dtype on a CPU (``FAST_BACKWARD_DTYPES``): measured the sphere20 step at
1.00-1.03x the ReLU network against 1.05-1.10x with ``nn.PReLU`` (float32, channels_last and contiguous,
``bench/results/prelu_speed.md``). Other devices, inference, ``torch.compile`` (Inductor fuses the plain
formulation itself), ``torch.jit`` and ONNX export run the plain ``F.prelu``.

It is a drop-in replacement: a subclass of ``nn.PReLU`` with the same constructor (plus ``fast_backward``),
the same parameter ``weight`` (shape ``num_parameters``) and so the same state-dict keys.
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


def prelu_backward(grad: torch.Tensor, saved: torch.Tensor, weight: torch.Tensor, from_output: bool = False):
    """``(dL/dx, dL/dweight)`` of ``y = prelu(x, weight)`` for the incoming ``grad = dL/dy``, from ``saved = x``
    or (``from_output``, every slope positive) ``saved = y`` (see the module doc).

    The slopes are used as the forward used them (cast to the activation dtype). Built from differentiable
    operations, so a double backward still works (in place only when no graph is being recorded)."""
    slope = weight.to(saved.dtype)
    a = _slope_view(slope, saved).to(grad.dtype)
    per_channel = weight.numel() > 1 and saved.dim() >= 2
    if torch.is_grad_enabled():  # double backward: out of place, so autograd keeps what it saved
        grad_w = _channel_sum(grad * saved.clamp(max=0), per_channel)
        grad_x = torch.lerp(torch.ops.aten.threshold_backward(grad, saved, 0), grad, a)
    else:  # one full-size buffer, as ReLU's backward: the step is memory-bound on the large early maps
        buf = saved.clamp(max=0).mul_(grad)
        grad_w = _channel_sum(buf, per_channel)
        grad_x = torch.ops.aten.threshold_backward.grad_input(grad, saved, 0, grad_input=buf)
        grad_x.lerp_(grad, a)
    if from_output:  # sum of g * min(0, y) = a * sum of g * min(0, x)
        grad_w = grad_w / slope.to(grad_w.dtype).reshape(grad_w.shape)
    return grad_x, grad_w.to(weight.dtype).reshape(weight.shape)


class _PReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        slope = weight.to(x.dtype)
        y = F.prelu(x, slope)
        # every slope > 0: keep y (the next layer keeps it anyway) instead of x; else x (see the module doc)
        ctx.from_output = bool((slope > 0).all())
        ctx.save_for_backward(y if ctx.from_output else x, weight)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        saved, weight = ctx.saved_tensors
        grad_x, grad_w = prelu_backward(grad, saved, weight, ctx.from_output)
        return (grad_x if ctx.needs_input_grad[0] else None), (grad_w if ctx.needs_input_grad[1] else None)


#: activation dtypes whose backward takes :func:`prelu_backward` by default on a CPU (measured in the module
#: doc; on other devices torch's own fused kernels run unless ``fast_backward=True``)
FAST_BACKWARD_DTYPES: frozenset = frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16})


def prelu(x: torch.Tensor, weight: torch.Tensor, fast: Optional[bool] = None) -> torch.Tensor:
    """``F.prelu``, with the backward of :func:`prelu_backward` where a gradient is recorded in eager mode and
    ``fast`` is True (None: a CPU tensor whose dtype is in :data:`FAST_BACKWARD_DTYPES`)."""
    if fast is None:
        fast = x.device.type == "cpu" and x.dtype in FAST_BACKWARD_DTYPES
    if (fast and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
            and not torch.jit.is_scripting() and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()):
        return _PReLUFunction.apply(x, weight)
    return F.prelu(x, weight.to(x.dtype) if weight.dtype != x.dtype else weight)


class PReLU(nn.PReLU):
    """``nn.PReLU`` (same arguments, parameter ``weight``, state-dict keys) with a backward as cheap as ReLU's.

    ``PReLU(num_parameters=1, init=0.25)``: one slope per channel (dimension 1) or a single shared one.
    ``fast_backward``: None (default) = the vectorised backward on a CPU, torch's kernels elsewhere; True /
    False force one (True on a GPU costs one host synchronisation per call: the check that every slope is
    positive, ``bench/device_check.sh`` times it against torch's there). Under bfloat16 autocast the slopes
    stay float32 and are cast to the activation dtype for the product, as ``nn.PReLU`` does.
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
