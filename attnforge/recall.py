"""Recall benchmark: multi-query associative recall (MQAR) through the KV cache of every recipe.

MQAR (Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient Language Models"): a sequence of
``pairs`` key–value tokens ``k1 v1 k2 v2 …``, then ``queries`` of some keys, each followed by its value; keys come
from the vocab's lower half, values from the upper half, and the target is the value after each query key:

    prompt (prefilled into the cache)          decode steps (teacher forced)
    k1 v1 k2 v2 … kP vP                   |    q1 → v(q1)?   v(q1)   q2 → v(q2)?   v(q2)   …

The queries are answered at decode time: the prompt is the key–value section, each query key is one decode step
whose greedy next token is compared with its value, then the true value is fed. The KV-cache rewrites (snapkv,
think) keep the prompt's forward pass exact and compress only what decode reads, so recall is measured where the
cache is read. A small Llama is trained on fresh MQAR batches (loss at the query positions only), cached on disk
(``$ATTNFORGE_CACHE_DIR/recall/<hash>/``, safetensors), and every recipe's accuracy is set against the bytes its
cache holds (``opt.kv_cache_bytes``). BASED (Arora et al. 2024, "Simple linear attention language models balance
the recall-throughput tradeoff") draws that curve for linear attention and sliding windows.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .errors import AttnforgeError

FORMAT = 1  # bump when the data, the model or the training loop changes meaning: older caches are not read
STREAM = 10_000_000  # seeds: training batch i of seed s is s·STREAM + i; held-out data starts at s·STREAM + HELD_OUT
HELD_OUT = 9_000_000


class RecallError(AttnforgeError, ValueError):
    """A recall benchmark that cannot run as asked (a bad size or recipe name)."""


@dataclass(frozen=True)
class Task:
    """MQAR's shape: ``pairs`` key–value pairs, then ``queries`` distinct keys of them with their values; keys are
    tokens ``[0, vocab/2)``, values ``[vocab/2, vocab)``. Context: ``2·(pairs + queries)`` tokens."""

    pairs: int = 64
    queries: int = 64
    vocab: int = 128

    def __post_init__(self):
        if not (1 <= self.queries <= self.pairs <= self.vocab // 2):
            raise RecallError(f"MQAR needs 1 <= queries ({self.queries}) <= pairs ({self.pairs}) <= vocab/2 "
                              f"({self.vocab // 2})")

    @property
    def prompt(self) -> int:
        return 2 * self.pairs

    @property
    def context(self) -> int:
        return 2 * (self.pairs + self.queries)

    def query_positions(self) -> Tensor:
        """Positions of the query keys; the value to recall is the next token."""
        return self.prompt + 2 * torch.arange(self.queries)


def mqar(task: Task, batch: int, seed: int) -> Tensor:
    """``batch`` MQAR sequences [batch, context] from ``seed`` (the same seed, the same sequences)."""
    g = torch.Generator().manual_seed(seed)
    half = task.vocab // 2
    keys = torch.rand(batch, half, generator=g).argsort(-1)[:, :task.pairs]  # distinct keys
    values = torch.randint(half, task.vocab, (batch, task.pairs), generator=g)
    asked = torch.rand(batch, task.pairs, generator=g).argsort(-1)[:, :task.queries]  # which pairs, in which order
    kv = torch.stack([keys, values], -1).reshape(batch, -1)
    qa = torch.stack([keys.gather(1, asked), values.gather(1, asked)], -1).reshape(batch, -1)
    return torch.cat([kv, qa], 1)


def targets(task: Task, ids: Tensor) -> Tensor:
    """The values to recall [batch, queries]: the tokens after the query keys."""
    return ids[:, task.query_positions() + 1]


@dataclass(frozen=True)
class Config:
    """The model and how it is trained: a Llama of ``layers`` × ``hidden`` (heads of 32 channels, as many KV heads,
    so ``gqa`` has heads to pool), AdamW with a one-cycle schedule on fresh batches, and a curriculum that
    starts at ``start_pairs`` pairs and doubles up to the task's over the first ``ramp`` of the steps."""

    task: Task = field(default_factory=Task)
    layers: int = 2
    hidden: int = 128
    steps: int = 1000
    tokens: int = 4096  # per batch: sequences of the curriculum's current length fill it
    lr: float = 1e-3
    weight_decay: float = 0.0
    start_pairs: int = 4
    ramp: float = 0.6
    seed: int = 0

    def key(self) -> str:
        """Hash of the training config and the versions that decide what training makes."""
        import transformers

        data = {"config": dataclasses.asdict(self), "torch": torch.__version__,
                "transformers": transformers.__version__, "format": FORMAT}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def config_for(context: int = 256, layers: int = 2, hidden: int = 128, seed: int = 0) -> Config:
    """The benchmark's config at ``context`` tokens: context/4 pairs, each queried once (option names in errors)."""
    if not (isinstance(context, int) and 32 <= context <= 2048 and context % 4 == 0):
        raise RecallError(f"--context {context}: must be a multiple of 4 in [32, 2048]")
    if not (isinstance(layers, int) and 1 <= layers <= 8):
        raise RecallError(f"--layers {layers}: must be in [1, 8]")
    if not (isinstance(hidden, int) and 32 <= hidden <= 1024 and hidden % 32 == 0):
        raise RecallError(f"--hidden {hidden}: must be a multiple of 32 (heads of 32 channels) in [32, 1024]")
    pairs = context // 4
    return Config(task=Task(pairs, pairs, max(128, 2 * pairs)), layers=layers, hidden=hidden, seed=seed)


def build_model(cfg: Config):
    import transformers as tf

    torch.manual_seed(cfg.seed)
    heads = cfg.hidden // 32
    config = tf.LlamaConfig(vocab_size=cfg.task.vocab, hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden,
                            num_hidden_layers=cfg.layers, num_attention_heads=heads, num_key_value_heads=heads,
                            max_position_embeddings=max(512, cfg.task.context), tie_word_embeddings=True,
                            attn_implementation="sdpa")
    model = tf.LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None
    return model


def _pairs_at(cfg: Config, step: int) -> int:
    """The curriculum: pairs doubling from ``start_pairs`` to the task's over the first ``ramp`` of the steps."""
    top, pairs = cfg.task.pairs, min(cfg.start_pairs, cfg.task.pairs)
    stages = max(0, (top - 1).bit_length() - (pairs - 1).bit_length())
    if stages == 0 or step >= cfg.ramp * cfg.steps:
        return top
    return min(top, pairs << int(stages * step / (cfg.ramp * cfg.steps)))


def loss_and_accuracy(model, task: Task, ids: Tensor) -> tuple[Tensor, float]:
    """Cross-entropy of the values at the query positions only, and the greedy accuracy there."""
    logits = model(ids).logits[:, task.query_positions()]
    want = targets(task, ids)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), want.reshape(-1))
    return loss, float((logits.argmax(-1) == want).float().mean())


@torch.no_grad()
def full_accuracy(model, task: Task, ids: Tensor, batch: int = 64) -> float:
    """Accuracy from the Hugging Face model's own forward over whole sequences (the reference of the decode)."""
    model.eval()
    hits = [loss_and_accuracy(model, task, part)[1] * len(part) for part in ids.split(batch)]
    return sum(hits) / len(ids)


def train(cfg: Config, progress: bool = True):
    """A model trained on MQAR as ``cfg`` says: (model in eval mode, {"seconds", "accuracy", "final_loss"})."""
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.05)
    start = time.perf_counter()
    with _bar(progress, cfg.steps, f"train MQAR ({cfg.task.pairs} pairs, {cfg.task.context} tokens)") as advance:
        for step in range(cfg.steps):
            pairs = _pairs_at(cfg, step)
            task = Task(pairs, min(pairs, cfg.task.queries), cfg.task.vocab)
            batch = max(1, cfg.tokens // task.context)
            loss, acc = loss_and_accuracy(model, task, mqar(task, batch, cfg.seed * STREAM + step))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            schedule.step()
            advance(f"pairs {pairs:3d} loss {loss.item():.3f} acc {acc:.2f}")
    seconds = time.perf_counter() - start
    accuracy = full_accuracy(model, cfg.task, held_out(cfg, 256))
    return model.eval(), {"seconds": round(seconds, 1), "accuracy": accuracy, "final_loss": loss.item()}


def held_out(cfg: Config, sequences: int) -> Tensor:
    """Evaluation sequences: a seed no training batch uses."""
    return mqar(cfg.task, sequences, held_out_seed(cfg))


def held_out_seed(cfg: Config) -> int:
    return cfg.seed * STREAM + HELD_OUT


def cache_folder(cfg: Config) -> Path:
    from attnforge.codegen.autotune import cache_dir

    return cache_dir() / "recall" / cfg.key()


TRAINED = {"count": 0}  # how many models this process trained (the tests check that a cached one is loaded)


def load_or_train(cfg: Config, retrain: bool = False, progress: bool = True):
    """The trained model of ``cfg`` from the disk cache, else trained and saved there (safetensors, written to a
    temporary folder and renamed into place; folders 0700, checked as codegen/safefs.py checks the autotune
    cache's). (model, info) with info["cached"] saying which. A cache that cannot be used or read warns."""
    import transformers as tf

    from attnforge.codegen import safefs

    folder = cache_folder(cfg)
    try:
        root = safefs.use_dir(safefs.use_dir(folder.parent.parent, private=False) / "recall", private=False)
    except OSError as e:  # CacheError: a file, a foreign folder, no permission
        root = None
        warnings.warn(f"recall: the model cache is not used: {e}", RuntimeWarning)
    if root is not None and not retrain and (folder / "recall.json").is_file():
        try:
            meta = json.loads(safefs.read_regular(folder / "recall.json", 1 << 20) or b"{}")
            model = tf.LlamaForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
            model.generation_config.eos_token_id = None
            return model, {**meta, "cached": True, "folder": str(folder)}
        except Exception as e:  # noqa: BLE001 - a damaged cache entry is trained again and replaced
            warnings.warn(f"recall: the cached model in {folder} could not be read ({e}); training it again",
                          RuntimeWarning)
    model, meta = train(cfg, progress)
    TRAINED["count"] += 1
    meta = {**meta, "config": dataclasses.asdict(cfg), "torch": torch.__version__, "transformers": tf.__version__}
    if root is not None:
        try:
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{folder.name}."))
            try:
                model.save_pretrained(tmp, safe_serialization=True)
                (tmp / "recall.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
                if folder.is_dir() and not folder.is_symlink():
                    shutil.rmtree(folder)  # retrained: the new model replaces the old
                os.replace(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as e:
            warnings.warn(f"recall: the trained model was not cached ({folder}: {e})", RuntimeWarning)
    return model, {**meta, "cached": False, "folder": str(folder)}


# ---------------------------------------------------------------------------------------------------- evaluation

def _steps(name: str, params: dict) -> dict:
    """A recipe: one approximate step, then exact fusion of what it left (as the generate benchmark's recipes)."""
    return {"name": name, "steps": [{"rewrite": name, "params": params}, {"rewrite": "fuse_attention"},
                                    {"rewrite": "fuse_ffn"}]}


def recipes(task: Task) -> list[dict]:
    """The benchmark's rows (name, family, ``attnforge.optimize`` recipe, whether to calibrate), sized by the task:
    at 256 tokens, windows 16–192 around the typical query–pair distance (pairs + queries ≈ 128 tokens), snapkv
    keeping 32/64/96 of the 128 prompt keys (observation window 16), streaming heads with windows of 32, think
    pruning a quarter or half of the key channels (observation window 32)."""
    n, prompt = task.context, task.prompt
    rows = [{"name": "original", "family": "original", "recipe": "exact"}]
    for window in (n // 16, n // 8, n // 4, n // 2, 3 * n // 4):
        rows.append({"name": f"window {window} + 4 sinks", "family": "sliding_window",
                     "recipe": _steps("sliding_window", {"window": window, "sinks": 4})})
    rows += [{"name": "linear elu", "family": "linear", "recipe": _steps("linear", {"feature_map": "elu"})},
             {"name": "linear hedgehog", "family": "linear", "recipe": _steps("linear", {"feature_map": "hedgehog"})},
             {"name": "linear hedgehog, calibrated", "family": "linear", "calibrate": True,
              "recipe": _steps("linear", {"feature_map": "hedgehog"})}]
    for window in (n // 8, n // 4):
        rows.append({"name": f"BASED: taylor + window {window}", "family": "based",
                     "recipe": _steps("linear", {"feature_map": "taylor", "window": window})})
    for kv in (2, 1):
        rows.append({"name": f"gqa {kv} kv heads", "family": "gqa", "recipe": _steps("gqa", {"kv_heads": kv})})
    for budget in (prompt // 4, prompt // 2, 3 * prompt // 4):  # the window (always kept) is half the least budget
        rows.append({"name": f"snapkv {budget} of {prompt} keys", "family": "snapkv",
                     "recipe": _steps("snapkv", {"budget": budget, "window": prompt // 8, "kernel": 5})})
    for ratio in (0.25, 0.5):
        rows.append({"name": f"streaming_heads ratio {ratio}", "family": "streaming_heads",
                     "recipe": _steps("streaming_heads", {"ratio": ratio, "sinks": 4, "window": n // 8,
                                                          "method": "score"})})
    for ratio in (0.25, 0.5):
        rows.append({"name": f"think ratio {ratio}", "family": "think",
                     "recipe": _steps("think", {"ratio": ratio, "window": prompt // 4})})
    return rows


def select(task: Task, names: Optional[list[str]] = None) -> list[dict]:
    """The rows of ``recipes(task)`` named (a row's name or family; all when None); ``RecallError`` for a name
    that is neither."""
    rows = recipes(task)
    if not names:
        return rows
    known = {r["name"] for r in rows} | {r["family"] for r in rows}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise RecallError(f"--recipes: unknown {', '.join(map(repr, unknown))}; give families "
                          f"({', '.join(dict.fromkeys(r['family'] for r in rows))}) or row names")
    return [r for r in rows if r["name"] in names or r["family"] in names]


@torch.no_grad()
def decode_logits(opt, task: Task, ids: Tensor, batch: int = 64) -> Tensor:
    """Logits [sequences, queries, vocab] of the answers at decode time: the key–value section prefilled into the
    model's cache, then per query its key as one decode step (its next-token logits kept) and its true value as
    the next step (teacher forcing)."""
    from .generate import decoder_for, positions

    decoder = decoder_for(opt, ids[:1, :task.prompt])
    out = []
    for part in ids.split(batch):
        b = len(part)
        states = decoder.new_state(b, task.context)
        prompt = part[:, :task.prompt]
        valid = torch.ones_like(prompt, dtype=torch.bool)
        decoder.step(prompt, positions(valid), valid, 0, states, prompt)
        one, answers = torch.ones(b, 1, dtype=torch.bool), []
        for t in task.query_positions().tolist():
            for at in (t, t + 1) if t + 2 < task.context else (t,):  # the last value is never read
                logits = decoder.step(part[:, at:at + 1], torch.full((b, 1), at), one, at, states, part[:, :at + 1])
                if at == t:
                    answers.append(logits[:, -1].float())
        out.append(torch.stack(answers, 1))
    return torch.cat(out)


def decode_accuracy(opt, task: Task, ids: Tensor) -> float:
    """Fraction of the queries whose value the model recalls (greedy) at decode time."""
    return float((decode_logits(opt, task, ids).argmax(-1) == targets(task, ids)).float().mean())


def _available(recipe) -> Optional[str]:
    """Why a recipe cannot run in this build (a rewrite that is not registered), else None."""
    from attnforge.passes import REGISTRY

    if isinstance(recipe, str):
        return None
    missing = [s["rewrite"] for s in recipe["steps"] if s["rewrite"] not in REGISTRY]
    return f"not available: no {', '.join(missing)} rewrite in this build" if missing else None


def _note(report) -> str:
    """What the report says went wrong, if anything: sites not applied, a capture error, the decode check."""
    if report.capture_error:
        return "not captured: " + report.capture_error.splitlines()[0][:160]
    notes = sorted({f"{s.status}: {s.reason}"[:160] for s in report.sites if s.status != "applied"})
    if report.decode and not report.decode.get("passed", True):
        notes.append("decode differs from the full sequence")
    return "; ".join(notes)


def _snapkv_bytes(opt, recipe: dict, task: Task) -> tuple[int, str]:
    """What a snapkv cache holds after this benchmark's decode: the kept prompt keys, plus one slot per decoded
    token (``kv_cache_bytes`` counts the kept keys of a prompt of N tokens only)."""
    from attnforge.runtime.snapkv import keep_count

    p = recipe["steps"][0]["params"]
    kept = int(keep_count(task.prompt, p["budget"], 0.0, p["window"]))
    slot = opt.kv_cache_bytes(1, task.prompt) / kept
    held = round(slot * (kept + task.context - task.prompt))
    return held, (f"{kept} kept prompt keys + {task.context - task.prompt} decoded per KV head "
                  f"(kv_cache_bytes(1, {task.context}) counts a {task.context}-token prompt: "
                  f"{opt.kv_cache_bytes(1, task.context):,})")


@torch.no_grad()
def _cosine(opt, example: Tensor, want: Tensor) -> float:
    """Cosine of the rewritten model's full-forward logits on the example to the original's (after calibration)."""
    out = opt(example)
    got = out.logits if hasattr(out, "logits") else out[0]
    return float(torch.nn.functional.cosine_similarity(got.double().flatten(), want.double().flatten(), dim=0))


def evaluate(model, task: Task, rows: Optional[list[dict]] = None, sequences: int = 256, seed: int = HELD_OUT,
             progress: bool = True) -> list[dict]:
    """Per recipe: recall accuracy through decode on ``sequences`` held-out sequences (``seed``), the KV-cache
    bytes of one sequence at the task's context, the cosine of its full-forward logits to the original's on an
    example (1 for the rewrites that keep the forward pass exact and compress only the cache), seconds and a note.
    A recipe that cannot be applied or decode is a row with the reason (accuracy None)."""
    import attnforge

    ids = mqar(task, sequences, seed)
    example = mqar(task, 4, seed + 1)  # what optimize checks on (streaming_heads chooses its heads on it)
    calibration = [mqar(task, 8, seed + 2 + i) for i in range(4)]
    reference = full_accuracy(model, task, ids)
    with torch.no_grad():
        want = model(example).logits
    out = []
    for row in rows if rows is not None else recipes(task):
        start = time.perf_counter()
        result = {"name": row["name"], "family": row["family"], "recipe": row["recipe"], "accuracy": None,
                  "kv_cache_bytes": None, "cosine": None, "note": _available(row["recipe"]) or ""}
        notes: list[str] = []
        if not result["note"]:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    opt = attnforge.optimize(model, row["recipe"], (example,))
                if row.get("calibrate"):
                    attnforge.calibrate(opt, calibration, progress=False)
                result["accuracy"] = decode_accuracy(opt, task, ids)
                result["kv_cache_bytes"] = opt.kv_cache_bytes(1, task.context)
                if row["family"] == "snapkv":
                    result["kv_cache_bytes"], extra = _snapkv_bytes(opt, row["recipe"], task)
                    notes.append(extra)
                result["cosine"] = _cosine(opt, example, want)
                if row["recipe"] == "exact":
                    notes.append(f"full-sequence HF forward: {reference:.4f}")
                result["note"] = "; ".join(filter(None, [_note(opt.report), *notes]))
            except Exception as e:  # noqa: BLE001 - a recipe that fails is a row with the reason
                result["note"] = f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e) else ''}"
        result["seconds"] = round(time.perf_counter() - start, 1)
        out.append(result)
        if progress:
            acc = "—" if result["accuracy"] is None else f"{result['accuracy']:.3f}"
            print(f"recall: {row['name']}: accuracy {acc} ({result['seconds']}s) {result['note']}", file=sys.stderr)
    return out


def benchmark(cfg: Config, names: Optional[list[str]] = None, sequences: int = 256, retrain: bool = False,
              progress: bool = True) -> tuple[dict, list[dict]]:
    """The whole benchmark: (training info, rows): the model of ``cfg`` (cached), then ``evaluate`` on held-out
    sequences of the recipes ``names`` selects (all by default)."""
    rows = select(cfg.task, names)  # a bad name fails before any training
    model, info = load_or_train(cfg, retrain, progress)
    return info, evaluate(model, cfg.task, rows, sequences, held_out_seed(cfg), progress)


class _bar:
    """A rich progress bar on stderr with a status text (or nothing when ``show`` is false)."""

    def __init__(self, show: bool, total: int, title: str):
        self.show, self.total, self.title = show, total, title

    def __enter__(self):
        if not self.show:
            return lambda text: None
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                                 "{task.total}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[status]}"), console=Console(stderr=True))
        self.progress.start()
        task = self.progress.add_task(self.title, total=self.total, status="")
        return lambda text: self.progress.update(task, advance=1, status=text)

    def __exit__(self, *_):
        if self.show:
            self.progress.stop()
