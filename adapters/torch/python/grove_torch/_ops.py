"""Loads grove's torch operators (libgrove_torch_ops.so, built beside this file)."""

import pathlib

import torch

_LIBRARY = pathlib.Path(__file__).with_name("libgrove_torch_ops.so")
if not _LIBRARY.exists():
    raise ImportError(
        f"grove_torch: {_LIBRARY} is missing; build grove with the torch adapter "
        "(cmake -DGROVE_TORCH=ON, docs/torch.md) and import the package from <build>/python"
    )
torch.ops.load_library(str(_LIBRARY))

ops = torch.ops.grove
