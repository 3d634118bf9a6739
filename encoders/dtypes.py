"""The dtype names config files use (`encode.t5_dtype: bfloat16`, ...) and the torch dtypes they mean."""

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`DTYPES[name]` for a name, the dtype itself for a torch dtype."""
    return DTYPES[dtype] if isinstance(dtype, str) else dtype
