"""The lesion classifier: any MONAI 2-D network with one output (the lesion logit), in Lightning.

The network comes from conf/network (`hydra.utils.instantiate`), so a DenseNet121 at 512 px and a
small ResNet at 64 px train through the same module. Loss: binary cross-entropy on the logit.
Validation logs the AUROC (torchmetrics) on the real validation split.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import BinaryAUROC


class LesionClassifier(L.LightningModule):
    def __init__(self, network: nn.Module, lr: float = 1e-3, weight_decay: float = 1e-4):
        super().__init__()
        self.network = network
        self.save_hyperparameters(ignore=["network"])
        self.val_auroc = BinaryAUROC()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """B×1×H×W in [0, 1] -> B lesion logits."""
        return self.network(images).reshape(images.shape[0], -1)[:, 0]

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.binary_cross_entropy_with_logits(self(images), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        logits = self(images)
        self.val_auroc.update(torch.sigmoid(logits), labels.long())
        self.log("val/loss", F.binary_cross_entropy_with_logits(logits, labels), on_epoch=True)
        self.log("val/auroc", self.val_auroc, on_epoch=True, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


@torch.no_grad()
def probabilities(module: LesionClassifier, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Lesion probability per image (eval mode, on the module's device), as a CPU float tensor."""
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    out = [torch.sigmoid(module(images[i:i + batch_size].to(device))).float().cpu()
           for i in range(0, len(images), batch_size)]
    module.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)
