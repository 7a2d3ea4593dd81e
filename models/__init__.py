"""vitpipe.models: the ViT family in pure PyTorch (single device, no I/O besides checkpoint conversion).

```python
from vitpipe.models import create, ViTConfig
model = create("S/4", img_size=32, num_classes=10)      # or create(ViTConfig.from_name(...))
feats = model.pre_logits(images)                        # few-shot features
```
"""

from .config import CANONICAL_NAMES, HYBRID_BACKBONES, VARIANTS, HybridConfig, ViTConfig, decode_variant
from .flops import flops, variant_table
from .normalisation import fold_input_normalisation, is_default_normalisation
from .pos_embed import adapt_state_dict, load_pretrained, resize_pos_embed
from .vit import VisionTransformer, create

__all__ = [
    "CANONICAL_NAMES",
    "HYBRID_BACKBONES",
    "VARIANTS",
    "HybridConfig",
    "ViTConfig",
    "VisionTransformer",
    "adapt_state_dict",
    "create",
    "decode_variant",
    "flops",
    "fold_input_normalisation",
    "is_default_normalisation",
    "load_pretrained",
    "resize_pos_embed",
    "variant_table",
]
