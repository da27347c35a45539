"""The quickstart's embedded dataset: scikit-learn's handwritten digits (1,797 8x8 images,
10 classes), bilinearly upscaled to 16x16, in pixel space (identity tokenizer).

Items have the layout every srdit dataset has (see srdit.data.ShardDataset): "latent" is the
model's input (here the pixels in [-1, 1], one channel), "label", and "image", the uint8
RGB picture the REPA/REG teacher sees.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class DigitsDataset:
    num_classes = 10

    def __init__(self, resolution: int = 16, latent_scale: float = 1.0):
        try:
            from sklearn.datasets import load_digits
        except ImportError as error:  # scikit-learn ships the data; it is in the test extras
            raise ImportError("the quickstart dataset needs scikit-learn: pip install scikit-learn") from error
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
        self.images = (x * 255).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()  # [N,3,r,r]
        # [N, 1, r, r]: pixels in [-1, 1], times data.latent_scale (1 for the quickstart) as latents are
        self.latents = (self.images[:, :1].float() / 127.5 - 1.0) * latent_scale
        self.labels = torch.tensor(digits.target, dtype=torch.long)  # [N]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"latent": self.latents[i], "label": int(self.labels[i]), "image": self.images[i]}

    def batch(self, indices) -> dict:
        """Many items at once, already stacked (the in-memory fast path of the loader)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {"latent": self.latents[idx], "label": self.labels[idx], "image": self.images[idx]}
