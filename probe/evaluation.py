"""Heads applied to batches: what a head reads, which linear heads share one matmul, evaluation, prediction.

A head reads one feature (`InputSpec` = its name; the head gets a tensor) or several ({input key: feature
name}; the head gets a dict, e.g. DifFormerHead's {(t, block): tensor}).

Fusion: plain `LinearHead`s that read the same feature (one feature at several lrs, as in a sweep) compute
their logits with one matmul over their concatenated weights. Autograd hands each head's own parameters their
own gradient slice, so training them this way only changes the float rounding of the shared matmul (about
1e-7 relative), never which gradient a head gets.

Noise draws: a stream that carries several draws of each feature (`draw_inputs`, FeatureStream's "mean") is
evaluated on the heads' logits averaged over the draws; any other stream on the features it yields.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from probe.heads import LinearGroup, LinearHead
from probe.logits import ScoreFile
from probe.stream import BatchStream

__all__ = [
    "InputSpec",
    "input_label",
    "feature_names",
    "gather",
    "fusable_groups",
    "evaluate",
    "predict_logits",
    "predict_many",
    "predict_logits_to_file",
    "predict_many_to_files",
    "draw_views",
]

K = TypeVar("K", bound=Hashable)
InputSpec = str | Mapping[Any, str]


def input_label(spec: InputSpec) -> str:
    return spec if isinstance(spec, str) else "+".join(sorted(set(spec.values())))


def feature_names(spec: InputSpec) -> list[str]:
    return [spec] if isinstance(spec, str) else list(spec.values())


def gather(spec: InputSpec, feats: Mapping[str, torch.Tensor]) -> torch.Tensor | dict[Hashable, torch.Tensor]:
    if isinstance(spec, str):
        return feats[spec]
    return {k: feats[name] for k, name in spec.items()}


def draw_views(
    xs: Mapping[str, torch.Tensor], names: Sequence[str], stream: Any, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """The batch as {feature: tensor} once per noise draw the stream carries (once unless it averages draws)."""
    variants = getattr(stream, "draw_inputs", None) or [{n: n for n in names}]
    return [{n: xs[v[n]].to(device) for n in names} for v in variants]


def _mean_logits(logits: list[torch.Tensor]) -> torch.Tensor:
    """Logits averaged over noise draws; one draw's logits are returned as they are (bit for bit)."""
    out = logits[0]
    for more in logits[1:]:
        out = out + more
    return out if len(logits) == 1 else out / len(logits)


def _fusion_key(head: nn.Module, spec: InputSpec) -> tuple[Any, ...] | None:
    """Heads with equal keys can share one matmul; None: this head cannot.

    Only plain `LinearHead`s without BatchNorm that read one feature qualify; subclasses, other heads and dict
    inputs take the ordinary per-head path.
    """
    if type(head) is not LinearHead or not isinstance(head.norm, nn.Identity) or not isinstance(spec, str):
        return None
    w, b = head.linear.weight, head.linear.bias
    if b is None or b.dtype != w.dtype or b.device != w.device:
        return None
    return (spec, w.shape[0], w.shape[1], w.dtype, w.device)


def fusable_groups(items: Sequence[tuple[Any, nn.Module, InputSpec]]) -> tuple[list[list[Any]], list[Any]]:
    """Split (tag, head, spec) triples into groups of >= 2 fusable heads (tags, in order) and the rest."""
    groups: dict[tuple[Any, ...], list[Any]] = {}
    rest: list[Any] = []
    for tag, head, spec in items:
        key = _fusion_key(head, spec)
        if key is None:
            rest.append(tag)
        else:
            groups.setdefault(key, []).append(tag)
    fused = [g for g in groups.values() if len(g) >= 2]
    rest += [g[0] for g in groups.values() if len(g) == 1]
    return fused, rest


@contextmanager
def _evaluating(heads: Iterable[nn.Module]) -> Iterator[None]:
    """Heads in eval mode without autograd for the block, then back in their own mode (also on error)."""
    heads = list(heads)
    was_training = [head.training for head in heads]
    for head in heads:
        head.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for head, mode in zip(heads, was_training):
            head.train(mode)


@torch.no_grad()
def evaluate(
    heads: Mapping[K, nn.Module],
    inputs_of: Mapping[K, InputSpec],
    stream: BatchStream,
    device: str | torch.device = "cpu",
    *,
    fuse: bool = True,
) -> dict[K, tuple[float, float]]:
    """Mean cross-entropy and accuracy of every head on one pass over `stream`: {key: (loss, accuracy)}.

    With `fuse`, linear heads on the same feature are evaluated together, with one matmul per batch.
    """
    device = torch.device(device)
    names = sorted({n for k in heads for n in feature_names(inputs_of[k])})
    groups, single = fusable_groups([(k, h, inputs_of[k]) for k, h in heads.items()]) if fuse else ([], list(heads))
    # fusable_groups groups plain LinearHeads that read one feature, named by a string (_fusion_key)
    banks = [
        (g, LinearGroup([cast(LinearHead, heads[k]) for k in g], cast(str, inputs_of[g[0]])).frozen()) for g in groups
    ]
    bank_loss = [torch.zeros(len(g), dtype=torch.float64, device=device) for g, _ in banks]
    bank_correct = [torch.zeros(len(g), dtype=torch.int64, device=device) for g, _ in banks]
    loss_sum = {k: torch.zeros((), dtype=torch.float64, device=device) for k in single}
    correct = {k: torch.zeros((), dtype=torch.int64, device=device) for k in single}
    count = 0
    stream.set_epoch(0)
    with _evaluating(heads.values()):
        for xs, y in stream:
            y = y.to(device)
            views = draw_views(xs, names, stream, device)
            for i, (_, bank) in enumerate(banks):
                logits = _mean_logits([bank.logits(feats[bank.spec]) for feats in views])
                bank_loss[i] += bank.per_head_ce(logits.float(), y).sum(0).double()
                bank_correct[i] += bank.correct(logits, y)
            for k in single:
                logits = _mean_logits([heads[k](gather(inputs_of[k], feats)) for feats in views])
                loss_sum[k] += F.cross_entropy(logits.float(), y, reduction="sum").double()
                correct[k] += (logits.argmax(1) == y).sum()
            count += int(y.shape[0])
    if count == 0:
        raise ValueError("evaluation stream yielded no samples")
    for (g, _), ls, cs in zip(banks, bank_loss, bank_correct):
        for j, k in enumerate(g):
            loss_sum[k], correct[k] = ls[j], cs[j]
    return {k: (float(loss_sum[k]) / count, int(correct[k]) / count) for k in heads}


def _logit_batches(
    heads: Mapping[K, tuple[nn.Module, InputSpec]], stream: BatchStream, device: torch.device
) -> Iterator[dict[K, torch.Tensor]]:
    """Every head's logits {key: (batch, classes)} batch by batch over ONE pass of `stream` (in stream order), as
    CPU float32 tensors; a head's are those it gets alone (same batches, same arithmetic). Run under
    `_evaluating`."""
    stream.set_epoch(0)
    for xs, _ in stream:
        batch = {}
        for key, (head, input) in heads.items():
            views = draw_views(xs, feature_names(input), stream, device)
            batch[key] = _mean_logits([head(gather(input, feats)) for feats in views]).float().cpu()
        yield batch


def predict_logits(
    head: nn.Module, stream: BatchStream, input: InputSpec, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Logits of `head` over one pass of `stream` (in stream order), as a CPU float32 tensor."""
    return predict_many({"": (head, input)}, stream, device)[""]


def predict_many(
    heads: Mapping[K, tuple[nn.Module, InputSpec]], stream: BatchStream, device: str | torch.device = "cpu"
) -> dict[K, torch.Tensor]:
    """Logits of every head {key: (head, input)} over ONE pass of `stream` (in stream order), as CPU float32
    tensors: each head's are those `predict_logits` gives it alone (same batches, same arithmetic)."""
    # Filled in place: a list of batches joined at the end held the logits twice (2 GB for 243,000 rows x
    # 1,000 classes).
    out: dict[K, torch.Tensor] = {}
    filled = 0
    with _evaluating(head for head, _ in heads.values()):
        for batch in _logit_batches(heads, stream, torch.device(device)):
            size = 0
            for key, logits in batch.items():
                if key not in out:
                    out[key] = torch.empty((stream.num_samples, *logits.shape[1:]), dtype=torch.float32)
                if filled + len(logits) > len(out[key]):
                    raise ValueError(f"stream yielded more than its {stream.num_samples} samples")
                out[key][filled : filled + len(logits)] = logits
                size = len(logits)
            filled += size
    if not out or not filled:
        raise ValueError("stream yielded no samples")
    return {k: v[:filled] for k, v in out.items()}


def predict_logits_to_file(
    head: nn.Module, stream: BatchStream, input: InputSpec, path: Path, device: str | torch.device = "cpu"
) -> ScoreFile:
    """`predict_logits` written batch by batch to a `ScoreFile` at `path`: memory does not grow with the split."""
    return predict_many_to_files({"": (head, input)}, stream, {"": path}, device)[""]


def predict_many_to_files(
    heads: Mapping[K, tuple[nn.Module, InputSpec]],
    stream: BatchStream,
    paths: Mapping[K, Path],
    device: str | torch.device = "cpu",
) -> dict[K, ScoreFile]:
    """`predict_many` written batch by batch, one `ScoreFile` per head at `paths[key]`: one pass of `stream`
    for all heads, and memory that does not grow with the split. On error no file is left behind."""
    missing = [k for k in heads if k not in paths]
    if missing:
        raise ValueError(f"no score file path for heads {missing!r}")
    scores: dict[K, ScoreFile] = {}
    try:
        with _evaluating(head for head, _ in heads.values()):
            for batch in _logit_batches(heads, stream, torch.device(device)):
                for key, logits in batch.items():
                    if key not in scores:
                        scores[key] = ScoreFile(paths[key], stream.num_samples, logits.shape[1])
                    scores[key].append(logits.numpy())
        if not scores:
            raise ValueError("stream yielded no samples")
        for file in scores.values():
            file.close()
    except BaseException:
        for file in scores.values():
            file.remove()
        raise
    return scores
