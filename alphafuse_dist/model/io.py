"""The trained model file ``model.safetensors``: the fused item table and the encoder's weights.

Keys: ``item_table`` float32 [N, d]; ``encoder.<name>`` for each entry of the encoder's state dict.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"


def save_model_file(path: Path, item_table: torch.Tensor, encoder_state: dict) -> None:
    """Write the item table [N, d] and the encoder's state dict to ``path``."""
    tensors = {"item_table": item_table.contiguous()}
    tensors |= {f"encoder.{k}": v.contiguous() for k, v in encoder_state.items()}
    save_file(tensors, str(path))


def load_model_file(path: Path) -> tuple[torch.Tensor, dict]:
    """(item table [N, d], encoder state dict) of a model file."""
    tensors = load_file(str(path))
    encoder = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
    return tensors["item_table"], encoder
