"""torchvision.transforms.ToTensor, the one transform pytorch-fid's fid_score uses."""
import numpy as np
import torch


class ToTensor:
    """PIL image or uint8 [H, W, C] array -> float tensor [C, H, W] in [0, 1]."""

    def __call__(self, pic):
        array = np.array(pic, dtype=np.uint8, copy=True)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array).permute(2, 0, 1).float().div(255)
