"""grove_torch: grove's fused, exact Grove MoE layer for PyTorch (docs/torch.md).

    import grove_torch
    block = grove_torch.GroveMoE(**config)          # the released config.json's fields
    block.load_state_dict(released_block_state)      # the released block's tensor names
    y, router_logits = block(hidden_states)          # [batch, seq, H] -> [batch, seq, H], [batch*seq, E]

Forward and backward run grove's CPU pass (each adjugate once per token) on torch's thread
count (torch.set_num_threads).
"""

from .functional import grove_layer, load_balancing_loss
from .module import GroveMoE, SwiGLU

__all__ = ["GroveMoE", "SwiGLU", "grove_layer", "load_balancing_loss"]
