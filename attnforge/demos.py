"""Built-in demo models: small Hugging Face architectures with random weights (no download)."""
from __future__ import annotations

import torch

DEMOS = {
    "tiny-llama": "LlamaModel, 2 layers, hidden 64, 4 heads / 2 KV heads (GQA), RoPE, SwiGLU, padding mask",
    "tiny-llama-lm": "LlamaForCausalLM, the same with its LM head and default config (use_cache): generates",
    "tiny-bert": "BertModel, 2 layers, hidden 64, 4 heads, GELU FFN, padding mask",
    "tiny-vit": "ViTModel, 2 layers, hidden 64, 4 heads, 32x32 images in 8x8 patches",
}


def build_demo(name: str, seed: int = 0, input_shape: tuple[int, ...] | None = None):
    """(model, example_args, example_kwargs) for a demo name (``tiny-llama``, ``tiny-llama-lm``, ``tiny-bert``,
    ``tiny-vit``).

    ``input_shape`` (batch, length) sizes the token demos' inputs (default 2×32, at most 512 positions)."""
    import transformers as tf

    torch.manual_seed(seed)
    batch, length = _tokens_shape(name, input_shape)
    if name == "tiny-llama":
        cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             use_cache=False, attn_implementation="sdpa")
        model = tf.LlamaModel(cfg).eval()
        return model, (torch.randint(0, 256, (batch, length)),), {"attention_mask": _padded(batch, length)}
    if name == "tiny-llama-lm":
        cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        model = tf.LlamaForCausalLM(cfg).eval()
        mask = _padded(batch, length).flip(-1)  # left padding, as prompts for generation are batched
        return model, (torch.randint(0, 256, (batch, length)),), {"attention_mask": mask}
    if name == "tiny-bert":
        cfg = tf.BertConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=512, attn_implementation="eager")
        model = tf.BertModel(cfg).eval()
        return model, (torch.randint(0, 256, (batch, length)),), {"attention_mask": _padded(batch, length)}
    if name == "tiny-vit":
        cfg = tf.ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, attn_implementation="sdpa")
        model = tf.ViTModel(cfg).eval()
        return model, (torch.randn(2, 3, 32, 32),), {}
    raise KeyError(f"unknown demo {name!r}; demos: {', '.join(DEMOS)}")


def _padded(batch: int, length: int) -> torch.Tensor:
    """An attention mask whose last sequence is padded (when there are several)."""
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[-1, max(1, length * 5 // 8):] = 0
    return mask


def _tokens_shape(name: str, input_shape) -> tuple[int, int]:
    if input_shape is None or name == "tiny-vit":
        return 2, 32
    if len(input_shape) != 2 or input_shape[1] > 512:
        raise KeyError(f"demo:{name} takes --input-shape BATCH,LENGTH with LENGTH <= 512, not {input_shape}")
    return input_shape
