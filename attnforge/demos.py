"""Built-in demo models: small Hugging Face architectures with random weights (no download)."""
from __future__ import annotations

import torch

DEMOS = {
    "tiny-llama": "LlamaModel, 2 layers, hidden 64, 4 heads / 2 KV heads (GQA), RoPE, SwiGLU",
    "tiny-bert": "BertModel, 2 layers, hidden 64, 4 heads, GELU FFN, padding mask",
    "tiny-vit": "ViTModel, 2 layers, hidden 64, 4 heads, 32x32 images in 8x8 patches",
}


def build_demo(name: str, seed: int = 0):
    """(model, example_args, example_kwargs) for a demo name (``tiny-llama``, ``tiny-bert``, ``tiny-vit``)."""
    import transformers as tf

    torch.manual_seed(seed)
    if name == "tiny-llama":
        cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             use_cache=False, attn_implementation="sdpa")
        model = tf.LlamaModel(cfg).eval()
        return model, (torch.randint(0, 256, (2, 32)),), {}
    if name == "tiny-bert":
        cfg = tf.BertConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=512, attn_implementation="eager")
        model = tf.BertModel(cfg).eval()
        mask = torch.ones(2, 32, dtype=torch.long)
        mask[1, 20:] = 0
        return model, (torch.randint(0, 256, (2, 32)),), {"attention_mask": mask}
    if name == "tiny-vit":
        cfg = tf.ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, attn_implementation="sdpa")
        model = tf.ViTModel(cfg).eval()
        return model, (torch.randn(2, 3, 32, 32),), {}
    raise KeyError(f"unknown demo {name!r}; demos: {', '.join(DEMOS)}")
