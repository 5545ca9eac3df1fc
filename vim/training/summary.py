"""The model summary of a classifier's fit: Lightning's, of the network it trains alone.

Lightning's default summary lists every child of the LightningModule: the EMA copy counts as a second set of
"Non-trainable params" and the metric collections as empty rows, and a FLOPs column of zeros (Lightning counts FLOPs
only for a module with an ``example_input_array``). :class:`NetworkSummary` keeps its table for the network.
"""

from __future__ import annotations

import lightning.pytorch.callbacks.model_summary as lightning_summary
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.model_summary import ModelSummary as Summary
from torch import nn
from torchmetrics import MetricCollection

__all__ = ["NetworkSummary"]


class _NetworkSummary(Summary):
    """Lightning's summary of a LightningModule restricted to the network it trains: its EMA copy (a second, frozen
    copy of the same parameters) and its metric collections (no parameters) are left out of the rows and totals."""

    @property
    def named_modules(self) -> list[tuple[str, nn.Module]]:
        ema = getattr(self._model, "ema", None)
        return [
            (name, module)
            for name, module in super().named_modules
            if module is not ema and not isinstance(module, MetricCollection)
        ]

    @property
    def total_parameters(self) -> int:
        return sum(p.numel() for _, module in self.named_modules for p in module.parameters())

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for _, module in self.named_modules for p in module.parameters() if p.requires_grad)

    def _get_summary_data(self) -> list[tuple[str, list[str]]]:
        """Lightning's columns without FLOPs, which it counts only for a module with an ``example_input_array``."""
        return [column for column in super()._get_summary_data() if column[0] != "FLOPs"]


class NetworkSummary(ModelSummary):
    """Lightning's model summary of the trained network alone (see :class:`_NetworkSummary`), without the FLOPs that
    it does not count; a classifier puts it in place of Lightning's default one."""

    def _summary(self, trainer: Trainer, pl_module: LightningModule) -> Summary:
        return _NetworkSummary(pl_module, max_depth=self._max_depth)

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes, total_flops, **kw):
        """Lightning's table without its "Total Flops" line."""
        table = lightning_summary._format_summary_table(
            total_parameters, trainable_parameters, model_size, total_training_modes, total_flops, *summary_data
        )
        lines = [line for line in table.splitlines() if not line.endswith("Total Flops")]
        lightning_summary.log.info("\n" + "\n".join(lines))
