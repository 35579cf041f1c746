"""Generation: ``opt.generate(...)`` with Hugging Face's argument names, over attnforge's own KV cache.

One program is captured for the call (input_ids, attention_mask, position_ids) and rewritten as any other
(attnforge/model.py); the cache pass (passes/decode.py) turns its attention sites into ``cached_attention`` calls
with their variants' cache policies (runtime/cache.py), so the same graph prefills the prompt (writing the cache)
and then decodes one token at a time (reading and appending). Positions are explicit (left-padded prompts take
``attention_mask.cumsum(-1) - 1``, as Hugging Face does), and the cache's validity flags replace the model's mask.

The decode contract (``check_decode``): logits of a decode step equal the rewritten model's own logits of the full
sequence at that position, so greedy tokens equal the argmax of ``opt(prompt + generated)`` at each step; with
the exact recipe they equal Hugging Face's ``generate``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import sympy
import torch
import torch.utils._pytree as pytree
from torch import Tensor

from attnforge.passes.check import error_stats
from attnforge.passes.base import REPLAY
from attnforge.passes.decode import DecodeGraph, DecodeUnsupported, decode_graph
from attnforge.runtime import of_op
from attnforge.runtime.cache import POLICIES

from .errors import AttnforgeError


class GenerationError(AttnforgeError, ValueError):
    """A generate call that cannot run: a bad argument (named), or a model that cannot decode (why)."""


N = sympy.Symbol("N", positive=True, integer=True)


@dataclass
class Decoder:
    """A prefill/decode graph and how to feed it."""

    graph: DecodeGraph
    program: Any

    def new_state(self, batch: int, capacity: int) -> list[list[Tensor]]:
        return [POLICIES[s.policy].allocate(s.site, batch, capacity) for s in self.graph.sites]

    def step(self, ids: Tensor, position_ids: Tensor, valid: Tensor, start: int, states: list,
             history: Optional[Tensor] = None) -> Tensor:
        """Logits [B, T, V] of the T current tokens (their cache entries written; a full cache grown first)."""
        for i, s in enumerate(self.graph.sites):
            grow = POLICIES[s.policy].grow
            if grow is not None:
                states[i] = grow(states[i], start + ids.shape[1])
        named = {"input_ids": ids, "position_ids": position_ids, "attention_mask": valid.long()}
        args = [named[n] for n in self.graph.inputs] + [valid, start] + states
        if self.graph.engram_context:
            window = history[:, max(0, start - self.graph.engram_context):start + ids.shape[1]]
            args += [window, window.shape[1] - ids.shape[1]]
        out = self.graph.gm(*args)
        if self.graph.out_spec is not None:
            out = pytree.tree_unflatten(list(out) if isinstance(out, (tuple, list)) else [out], self.graph.out_spec)
        return _logits(out)

    def cache_bytes(self, batch, context):
        """Bytes the decode state holds at ``context`` tokens: per layer and in all."""
        per = [POLICIES[s.policy].bytes(s.site, batch, context) for s in self.graph.sites]
        return per, sum(per)


def _logits(out) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise GenerationError(f"the model's output ({type(out).__name__}) has no logits: generate needs a causal LM head")


def positions(mask: Tensor) -> Tensor:
    """Position ids of a (left-)padded batch: cumsum of the mask − 1, padding at 1 (as Hugging Face)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def decoder_for(opt, like: Tensor) -> Decoder:
    """The model's decoder (built once per dtype and device): a program for (input_ids, attention_mask,
    position_ids), its masks checked on a left-padded example made from ``like`` (token ids)."""
    key = opt._placement()
    cached = opt._decoders.get(key)
    if cached is not None:
        return cached
    ids = like[:1].reshape(1, -1)
    while ids.shape[1] < 4:
        ids = torch.cat([ids, ids], 1)
    ids = ids[:, :8].repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row, so the masks are seen with padding
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)}
    params = opt._source_signature()
    missing = [n for n in ("input_ids", "position_ids") if n not in params]
    if missing:
        raise GenerationError(f"generate needs a model whose forward takes {' and '.join(missing)} "
                              f"({type(opt._source).__name__} does not)")
    if "attention_mask" not in params:
        kwargs.pop("attention_mask")
    if "logits_to_keep" in params:  # the last position's logits only: a prompt's lm_head costs one row, as in HF
        kwargs["logits_to_keep"] = 1
    was = opt.training
    opt.eval()
    try:
        program = opt._program_for((), kwargs)
        if program is not None and not any(getattr(of_op(n.target), "cache", None) for n in program.gm.graph.nodes
                                           if n.op == "call_function"):
            program = _with_fused_attention(opt, kwargs)  # the recipe left attention alone: fuse it (exact)
    finally:
        opt.train(was)
    if program is None:
        raise GenerationError(f"the model could not be captured for generation: "
                              f"{opt._failed_reason((), kwargs)}")
    try:
        graph = decode_graph(program.gm, program.form.inputs((), kwargs), mask.bool())
    except DecodeUnsupported as e:
        raise GenerationError(f"this model cannot decode with a cache: {e}") from None
    decoder = Decoder(graph, program)
    opt._decoders[key] = decoder
    return decoder


def _with_fused_attention(opt, kwargs):
    """A generation program for a recipe that rewrites no attention (an FFN or lookup recipe): the same recipe
    followed by ``fuse_attention``, which is exact, so the cache has attention ops to own. Its own program, not
    one of the model's call forms."""
    from .optimize import build_program
    from .recipe import load_recipe

    data = opt.recipe.model_dump()
    recipe = load_recipe({**data, "steps": [*data["steps"], {"rewrite": "fuse_attention"}]})
    replay = REPLAY.set(True)
    try:
        program = build_program(opt._source, recipe, (), kwargs, backend=opt.backend, training=False,
                                **opt._options)
    except Exception as e:  # noqa: BLE001 - said by generate's error
        raise GenerationError(f"the model could not be captured for generation: {e}") from None
    finally:
        REPLAY.reset(replay)
    if not any(getattr(of_op(n.target), "cache", None) for n in program.gm.graph.nodes if n.op == "call_function"):
        misses = sorted({f"{m.fqn}: {m.reason}" for m in program.report.misses if m.kind == "attention"})
        raise GenerationError("its attention could not be fused, so no attention op owns a cache"
                              + (f" ({misses[0]})" if misses else ""))
    opt._tie(program.gm)
    return program


def generate(opt, input_ids: Tensor, attention_mask: Optional[Tensor] = None, max_new_tokens: Optional[int] = None,
             do_sample: Optional[bool] = None, temperature: Optional[float] = None, top_k: Optional[int] = None,
             top_p: Optional[float] = None, eos_token_id=None, pad_token_id: Optional[int] = None, streamer=None,
             generation_config=None, return_dict_in_generate: bool = False, output_logits: bool = False,
             output_scores: bool = False, **unknown):
    """Prompt + generated tokens [B, T + new] (a LongTensor, as Hugging Face's ``generate``), or with
    ``return_dict_in_generate`` its output object with ``.sequences`` and the per-step ``.logits``/``.scores``.
    Arguments left None come from ``generation_config`` (default: the model's)."""
    if unknown:
        raise GenerationError(f"generate does not take {sorted(unknown)}; it takes Hugging Face's max_new_tokens, "
                              "do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id, streamer, "
                              "generation_config, return_dict_in_generate, output_logits, output_scores")
    cfg = generation_config if generation_config is not None else getattr(opt, "generation_config", None)
    pick = lambda value, name, default: value if value is not None else getattr(cfg, name, None) \
        if getattr(cfg, name, None) is not None else default  # noqa: E731
    max_new_tokens = pick(max_new_tokens, "max_new_tokens", 20)
    do_sample = bool(pick(do_sample, "do_sample", False))
    temperature, top_k, top_p = pick(temperature, "temperature", 1.0), pick(top_k, "top_k", None), \
        pick(top_p, "top_p", None)
    eos = pick(eos_token_id, "eos_token_id", None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = pick(pad_token_id, "pad_token_id", None)
    pad = eos[0] if pad is None and eos else pad
    check_arguments(input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p)
    for bad in ("num_beams", "repetition_penalty", "no_repeat_ngram_size"):
        value = getattr(cfg, bad, None)
        if value not in (None, 1, 1.0, 0):
            raise GenerationError(f"generation_config.{bad}={value!r} is not supported (greedy and sampling only)")

    _check_positions(opt, input_ids.shape[1], max_new_tokens)
    device = next((p.device for p in opt.parameters()), input_ids.device)
    ids = input_ids.to(device)
    mask = (attention_mask if attention_mask is not None else torch.ones_like(ids)).to(device)
    batch, prompt = ids.shape
    if streamer is not None:
        streamer.put(ids.cpu())
    if max_new_tokens == 0:
        if streamer is not None:
            streamer.end()
        return _result(ids, [], [], return_dict_in_generate, output_logits, output_scores)
    decoder = decoder_for(opt, ids)
    states = decoder.new_state(batch, prompt + max_new_tokens)
    pos = positions(mask)
    all_logits, all_scores = [], []
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    sequences = ids
    with torch.no_grad():
        logits = decoder.step(ids, pos, mask.bool(), 0, states, sequences)
        for i in range(max_new_tokens):
            raw = logits[:, -1, :].float()
            scores = _process(raw, do_sample, temperature, top_k, top_p)
            if output_logits:
                all_logits.append(raw)
            if output_scores:
                all_scores.append(scores)
            if do_sample:
                tokens = torch.multinomial(torch.softmax(scores, -1), 1)[:, 0]
            else:
                tokens = scores.argmax(-1)
            if eos:
                tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad))
            sequences = torch.cat([sequences, tokens[:, None]], 1)
            if streamer is not None:
                streamer.put(tokens.cpu())
            if eos:
                unfinished &= ~torch.isin(tokens, torch.tensor(eos, device=device))
            if not bool(unfinished.any()) or i == max_new_tokens - 1:
                break
            pos = pos[:, -1:] + 1
            one = torch.ones(batch, 1, dtype=torch.bool, device=device)
            logits = decoder.step(tokens[:, None], pos, one, prompt + i, states, sequences)
    if streamer is not None:
        streamer.end()
    return _result(sequences, all_logits, all_scores, return_dict_in_generate, output_logits, output_scores)


def check_arguments(ids, mask, max_new_tokens, do_sample, temperature, top_k, top_p) -> None:
    """``GenerationError`` naming the first argument of a generate call that is out of range."""
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise GenerationError(f"input_ids must be a [batch, length] tensor of token ids, not "
                              f"{type(ids).__name__}{list(ids.shape) if isinstance(ids, Tensor) else ''}")
    if ids.shape[1] == 0:
        raise GenerationError("input_ids is empty: generate needs a prompt of at least one token")
    if mask is not None and (not isinstance(mask, Tensor) or mask.shape != ids.shape):
        raise GenerationError(f"attention_mask must have input_ids' shape {list(ids.shape)}, not "
                              f"{list(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be an integer >= 0, not {max_new_tokens!r}")
    if do_sample:
        if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
            raise GenerationError(f"temperature must be a number > 0 when sampling, not {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
            raise GenerationError(f"top_k must be an integer >= 0, not {top_k!r}")
        if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise GenerationError(f"top_p must be in (0, 1], not {top_p!r}")


POSITION_TABLES = ("wpe", "position_embeddings", "embed_positions")


def _check_positions(opt, prompt: int, new: int) -> None:
    """A model with a learned table of absolute positions (GPT-2's ``wpe``...) cannot go past its last row; a model
    whose own attention keeps a sliding window in some layers (Mistral, Gemma 2, GPT-Neo's local layers) cannot go
    past that window: the cache keeps every key, and the capture's short example cannot tell the window from
    causal masking."""
    window = _model_window(getattr(opt._source, "config", None))
    if window and prompt + new > window[0]:
        raise GenerationError(f"the prompt ({prompt} tokens) + max_new_tokens ({new}) is longer than the "
                              f"{window[0]}-token sliding window of the model's own attention ({window[1]}); the "
                              "cache keeps every key, so past the window it would no longer be this model")
    for name, module in opt._source.named_modules():
        if isinstance(module, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES:
            limit = module.num_embeddings - int(getattr(module, "offset", 0))
            if prompt + new > limit:
                raise GenerationError(f"the prompt ({prompt} tokens) + max_new_tokens ({new}) is longer than the "
                                      f"{limit} positions of the model's learned position table ({name})")


def _model_window(config) -> Optional[tuple[int, str]]:
    """(the sliding window of the model's own attention, the config field saying so): ``sliding_window`` unless
    ``use_sliding_window`` is off, GPT-Neo's ``window_size`` when a layer is local; None without one."""
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and window > 0 and getattr(config, "use_sliding_window", True) is not False:
        return window, "config.sliding_window"
    if "local" in (getattr(config, "attention_layers", None) or []) and getattr(config, "window_size", None):
        return int(config.window_size), "config.window_size of its local layers"
    return None


def _process(logits: Tensor, do_sample: bool, temperature: float, top_k, top_p) -> Tensor:
    """Hugging Face's sampling warpers, in its order: temperature, top-k, top-p (greedy: the logits as they are)."""
    if not do_sample:
        return logits
    scores = logits / temperature if temperature != 1.0 else logits
    if top_k:
        kth = scores.topk(min(top_k, scores.shape[-1]), -1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, index = scores.sort(-1, descending=False)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p
        drop[..., -1:] = False  # keep at least one token
        scores = scores.masked_fill(drop.scatter(-1, index, drop), float("-inf"))
    return scores


def _result(sequences, logits, scores, as_dict, output_logits, output_scores):
    if not as_dict:
        return sequences
    try:
        from transformers.generation import GenerateDecoderOnlyOutput
    except ImportError:  # pragma: no cover
        from types import SimpleNamespace as GenerateDecoderOnlyOutput
    return GenerateDecoderOnlyOutput(sequences=sequences, logits=tuple(logits) if output_logits else None,
                                     scores=tuple(scores) if output_scores else None)


def check_decode(opt, ids: Tensor, mask: Optional[Tensor] = None, steps: int = 4) -> dict:
    """The decode contract on ``ids``: prefill all but the last ``steps`` tokens, decode those one by one, and
    compare each step's logits with the rewritten model's own logits of the sequence up to there — a prefill of
    that prefix (the variants' own kernels over it: for a causal model, its full-sequence logits at that
    position) — as the max abs difference."""
    mask = torch.ones_like(ids) if mask is None else mask
    decoder = decoder_for(opt, ids)
    steps = max(1, min(steps, ids.shape[1] - 1))
    cut = ids.shape[1] - steps
    pos = positions(mask)
    b = ids.shape[0]
    with torch.no_grad():
        want = [decoder.step(ids[:, :t], pos[:, :t], mask[:, :t].bool(), 0, decoder.new_state(b, t), ids)[:, -1:]
                for t in range(cut, ids.shape[1])]
        states = decoder.new_state(b, ids.shape[1])
        got = [decoder.step(ids[:, :cut], pos[:, :cut], mask[:, :cut].bool(), 0, states, ids)[:, -1:]]
        for t in range(cut, ids.shape[1] - 1):
            got.append(decoder.step(ids[:, t:t + 1], pos[:, t:t + 1], mask[:, t:t + 1].bool(), t, states, ids))
    err = error_stats(torch.cat(got, 1), torch.cat(want, 1))["max_abs"]  # NaN/inf where both have them: equal
    exact = all(POLICIES[s.policy].exact_decode(s.site.params) for s in decoder.graph.sites)
    return {"positions": steps, "max_abs": err, "passed": err <= 1e-4 or not exact, "policies":
            sorted({s.policy for s in decoder.graph.sites}), "exact_policies": exact}


def export_decode_onnx(opt, directory, opset: int = 23, like: Optional[Tensor] = None) -> dict:
    """Write the model's decode step to ``directory/model.onnx`` and its layout to ``directory/decode_layout.json``
    (documented in docs/generation.md); return the layout.

    Inputs ``input_ids`` [B, T], ``attention_mask`` [B, P + T] (the past's and the current tokens', 1 real, 0
    padding), ``position_ids`` [B, T] and per layer i the past state ``past_key_values.{i}.<name>``; outputs
    ``logits`` (the last position's, [B, 1, V], for a model that takes ``logits_to_keep``; else [B, T, V]) and
    ``present.{i}.<name>``. A full cache is optimum's ``key``/``value`` [B, KV heads, P,
    head dim] (the first call passes P = 0); a window's and a linear state's are fixed-size (their initial
    values are in the layout). One file prefills (T = the prompt) and decodes (T = 1)."""
    import json
    from pathlib import Path

    from attnforge.errors import ExportError
    from attnforge.passes.decode import export_graph
    from attnforge.runtime.onnx import dynamo_export, export_failure, save

    decoder = decoder_for(opt, like if like is not None else torch.zeros(1, 8, dtype=torch.long))
    program = decoder.program
    ids = torch.randint(3, 50, (2, 3))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    example = program.form.inputs((), {"input_ids": ids[:, :2].repeat(1, 4), "attention_mask": mask,
                                        "position_ids": positions(mask)})
    try:
        step = export_graph(program.gm, example, mask.bool(), decoder.graph.out_spec)
    except DecodeUnsupported as e:
        raise ExportError(f"the decode step cannot be exported: {e}") from None
    batch, past_len = 2, 5
    auto = torch.export.Dim.AUTO
    past, shapes = [], [{0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto, 1: auto}]
    for s in step.sites:
        for t in POLICIES[s.policy].initial(s.site, batch):  # a dim of size 0 grows with the past ("past")
            grows = [i for i in range(1, t.dim()) if t.shape[i] == 0]
            past.append(_example_past(t, past_len) if grows else t)
            shapes.append({0: auto, **{i: auto for i in grows}})
    args = (ids, mask, positions(mask)[:, -3:], *past)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    try:
        onnx_program = dynamo_export(step.gm, args, opset, input_names=step.inputs, output_names=step.outputs,
                                     dynamic_shapes=tuple(shapes))
    except Exception as e:  # noqa: BLE001 - the cause names the op
        raise ExportError("ONNX export of the decode step failed: " + export_failure(e)) from e
    save(onnx_program, path)
    layout = {"file": path.name, "inputs": step.inputs, "outputs": step.outputs, "layers": []}
    for i, s in enumerate(step.sites):
        policy = POLICIES[s.policy]
        init = policy.initial(s.site, 1)
        layout["layers"].append({"site": s.fqn, "policy": s.policy, "summary": policy.summary,
                                 "params": {k: v for k, v in s.site.params.items() if not isinstance(v, Tensor)},
                                 "state": [{"name": f"past_key_values.{i}.{n}",
                                            "shape": ["batch", *("past" if d == 0 else d for d in t.shape[1:])],
                                            "dtype": str(t.dtype).replace("torch.", ""),
                                            "initial": _initial_value(t)}
                                           for n, t in zip(policy.state_names, init)]})
    (directory / "decode_layout.json").write_text(json.dumps(layout, indent=2), encoding="utf-8")
    return layout


def _example_past(t: Tensor, length: int) -> Tensor:
    """A past state of ``length`` positions shaped like the empty ``t`` (export traces it at a nonzero past)."""
    shape = [length if (i and n == 0) else n for i, n in enumerate(t.shape)]
    if t.dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    if not t.is_floating_point():
        return torch.zeros(shape, dtype=t.dtype)
    return torch.randn(shape, dtype=t.dtype)


def onnx_greedy(directory, input_ids: Tensor, attention_mask: Optional[Tensor], max_new_tokens: int):
    """Greedy generation with an exported decode step in onnxruntime (the loop docs/generation.md describes):
    the sequences [B, T + new] and each step's last-position logits."""
    import json
    from pathlib import Path

    import numpy as np
    import onnxruntime as ort

    directory = Path(directory)
    layout = json.loads((directory / "decode_layout.json").read_text(encoding="utf-8"))
    session = ort.InferenceSession(str(directory / layout["file"]), providers=["CPUExecutionProvider"])
    ids = input_ids.numpy()
    mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).numpy()
    batch = ids.shape[0]
    state = {}
    for layer in layout["layers"]:
        for s in layer["state"]:
            shape = [batch if d == "batch" else 0 if d == "past" else d for d in s["shape"]]
            state[s["name"]] = np.full(shape, 0 if s["initial"] == "empty" else s["initial"], dtype=s["dtype"])
    pos, current, sequences, steps = positions(torch.from_numpy(mask)).numpy(), ids, ids, []
    for _ in range(max_new_tokens):
        out = session.run(None, {"input_ids": current, "attention_mask": mask, "position_ids": pos, **state})
        state = {n.replace("present", "past_key_values", 1): v for n, v in zip(layout["outputs"][1:], out[1:])}
        steps.append(torch.from_numpy(out[0][:, -1].copy()))
        current = out[0][:, -1].argmax(-1)[:, None].astype(np.int64)
        sequences = np.concatenate([sequences, current], 1)
        mask = np.concatenate([mask, np.ones_like(current)], 1)
        pos = pos[:, -1:] + 1
    return torch.from_numpy(sequences), steps


def _initial_value(t: Tensor):
    """How a state tensor starts: its one fill value, or "empty" for a length-0 past."""
    if t.numel() == 0:
        return "empty"
    values = t.unique()
    return values.item() if values.numel() == 1 else "see the policy"


def cache_formula(opt, batch=1) -> dict:
    """KV-cache bytes per layer as formulas in the context length N, and in all."""
    decoder = opt._decoders.get(opt._placement())
    if decoder is None:
        return {}
    per, total = decoder.cache_bytes(batch, N)
    return {"per_layer": [str(sympy.simplify(p)) for p in per], "total": str(sympy.simplify(total))}
