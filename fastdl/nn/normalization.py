"""Drop-in normalisation modules.

Each subclasses its ``torch.nn`` counterpart, so the constructor, initialisation, parameter names
and ``state_dict`` keys are torch's by construction; only ``forward`` changes, to call
:mod:`fastdl.functional`.
"""

from __future__ import annotations

import torch

from .. import functional as F


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` computed by fastdl's kernels."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` computed by fastdl's kernels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (torch's RMSNorm names it x)
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class _BatchNormForward:
    """The forward of ``torch.nn.modules.batchnorm._BatchNorm``, calling fastdl's ``batch_norm``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        # As torch: momentum=None means the cumulative average over the batches seen so far.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        # Batch statistics in training, and in eval when there are no running buffers.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # Buffers are passed only where they are read (eval) or updated (tracked training).
        pass_buffers = not self.training or self.track_running_stats
        return F.batch_norm(input, self.running_mean if pass_buffers else None,
                            self.running_var if pass_buffers else None, self.weight, self.bias,
                            use_batch_stats, factor, self.eps)


class BatchNorm1d(_BatchNormForward, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` over (N, C) or (N, C, L) input, computed by fastdl's kernels."""


class BatchNorm2d(_BatchNormForward, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` over (N, C, H, W) input (contiguous or channels_last), computed by
    fastdl's kernels."""


class BatchNorm3d(_BatchNormForward, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` over (N, C, D, H, W) input (contiguous or channels_last_3d),
    computed by fastdl's kernels."""
