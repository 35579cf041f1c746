"""The exported decode step (attnforge/generate.py, ``export_decode_onnx``) in a plain onnxruntime greedy loop —
numpy and onnxruntime only, the state passed from each call's ``present.*`` to the next call's
``past_key_values.*`` as docs/generation.md says — reproduces ``opt.generate``'s tokens, for a full cache
(optimum's layout), GQA, a sliding window's ring, a linear recurrent state, SnapKV's kept keys and ThinK's pruned
channels; batch 2, left-padded."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import attnforge
from attnforge.errors import ExportError
from attnforge.generate import export_decode_onnx

ort = pytest.importorskip("onnxruntime")

RECIPES = {
    "exact": "exact",
    "gqa": {"steps": [{"rewrite": "gqa", "params": {"kv_heads": 1}}, {"rewrite": "fuse_attention"}]},
    "sliding_window": {"steps": [{"rewrite": "sliding_window", "params": {"window": 4, "sinks": 2}}]},
    "linear": {"steps": [{"rewrite": "linear", "params": {"feature_map": "elu"}}]},
    "snapkv": {"steps": [{"rewrite": "snapkv", "params": {"budget": 0.7, "window": 4}}]},
    "think": {"steps": [{"rewrite": "think", "params": {"ratio": 0.5, "window": 4}}]},
}
DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "bool": np.bool_}


@pytest.fixture(scope="module")
def llama():
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=256)).eval()
    model.generation_config.eos_token_id = None  # the loop below runs every step
    return model


def _initial(spec: dict, batch: int) -> np.ndarray:
    shape = [batch if d == "batch" else 0 if d == "past" else d for d in spec["shape"]]
    fill = 0 if spec["initial"] == "empty" else spec["initial"]
    return np.full(shape, fill, dtype=DTYPES[spec["dtype"]])


def onnx_greedy(folder, ids: np.ndarray, mask: np.ndarray, new: int, states: list | None = None) -> np.ndarray:
    layout = json.loads((folder / "decode_layout.json").read_text())
    session = ort.InferenceSession(str(folder / layout["file"]))
    state = {s["name"]: _initial(s, ids.shape[0]) for layer in layout["layers"] for s in layer["state"]}
    pos = np.where(mask == 0, 1, mask.cumsum(-1) - 1)
    current, sequences = ids, ids
    for _ in range(new):
        out = session.run(None, {"input_ids": current, "attention_mask": mask, "position_ids": pos, **state})
        state = {name.replace("present", "past_key_values", 1): value
                 for name, value in zip(layout["outputs"][1:], out[1:])}
        if states is not None:
            states.append(state)
        current = out[0][:, -1].argmax(-1)[:, None].astype(np.int64)
        sequences = np.concatenate([sequences, current], 1)
        mask = np.concatenate([mask, np.ones_like(current)], 1)
        pos = pos[:, -1:] + 1
    return sequences


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_an_onnxruntime_greedy_loop_reproduces_generate(name, llama, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = attnforge.optimize(llama, RECIPES[name], (torch.randint(3, 100, (1, 8)),))
    layout = export_decode_onnx(opt, tmp_path)
    assert layout["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"] and layout["outputs"][0] == "logits"
    policies = {layer["policy"] for layer in layout["layers"]}
    assert policies == {"exact": {"full"}, "gqa": {"full"}, "sliding_window": {"ring"}, "linear": {"recurrent"},
                        "snapkv": {"snapkv"}, "think": {"channels"}}[name]
    if name in ("exact", "gqa"):  # optimum's names and layout
        kv = 2 if name == "exact" else 1
        assert layout["inputs"][3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
        assert layout["layers"][0]["state"][0]["shape"] == ["batch", kv, "past", 16]
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    want = opt.generate(ids, attention_mask=mask, max_new_tokens=10)
    states = []
    got = onnx_greedy(tmp_path, ids.numpy(), mask.numpy(), 10, states)
    np.testing.assert_array_equal(got, want.numpy())
    if name == "snapkv":  # the prompt of 9 kept ⌊9 · 0.7⌋ = 6 keys per KV head, then one per step
        assert [s["past_key_values.0.key"].shape[2] for s in states[:3]] == [6, 7, 8]
    if name == "think":  # half the channels of each key
        assert states[0]["past_key_values.0.key"].shape[-1] == 8


def test_a_cache_without_an_exported_step_is_named(llama, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = attnforge.optimize(llama, {"steps": [{"rewrite": "block_sparse", "params": {"block": 4}}]},
                                 (torch.randint(3, 100, (1, 8)),))
    with pytest.raises(ExportError, match="'blocks' cache has no exported decode step"):
        export_decode_onnx(opt, tmp_path)
