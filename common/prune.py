"""Entropy channel filtering: structured pruning of YOLO11 and YOLO26 detectors.

The platform's entropy channel filtering: "identify and remove redundant
or less informative filters within convolutional layers by analysing their
contribution to overall information flow", keeping "only the most essential
channels, those with higher entropy". Here:

1. **Score.** Every prunable channel gets the Shannon entropy of its post-activation
   values over a calibration set (:class:`EntropyMeter`: two streaming passes over
   the images).
2. **Select.** Each channel group (below) keeps its ``round(keep_fraction * size)``
   highest-entropy channels (at least ``min_channels``); one ``keep_fraction`` for the
   whole model, found by bisection so that a requested fraction of the model's
   parameters is removed (:func:`prune_to_ratio`). Entropy decides *which* channels go,
   the uniform fraction *how many* per layer: a global entropy ranking could empty a
   whole layer, and entropies of different layers are not on a common footing.
3. **Cut.** The channels are really removed (:func:`apply_pruning`): the producing
   conv loses output filters and its BatchNorm the matching entries, every consuming
   conv loses the matching input channels, depthwise convs on the way lose both; the
   pruned model has fewer parameters and FLOPs, not masks.
4. **Fine-tune** with :func:`common.yolo.train` (the CLI does it).

**Channel groups** (:func:`find_groups`). A group is a set of channels that must be
cut together: its producers (``Conv`` modules writing it, at an output offset), its
consumers (``nn.Conv2d`` reading it, at an input offset) and depthwise ``Conv``
pass-throughs. Found by walking the Ultralytics modules:

* inside a module: ``Bottleneck`` hidden (cv1 -> cv2); ``C3``/``C3k`` cv2 -> cv3, and
  cv1 -> bottlenecks -> cv3 (one group through residual adds); ``C2f``/``C3k2`` cv1's
  two halves (the ``chunk(2)`` halves keep equal counts; the second half runs through
  residual bottlenecks, a ``C3k`` output is its own group); ``SPPF`` cv1 (read 4 times
  by cv2, once per pooling); ``PSABlock`` feed-forward hidden; ``Detect`` box and class
  branch internals (the class branch's depthwise conv is a pass-through), of both branches
  of an end-to-end head (YOLO26's ``one2one_cv2``/``one2one_cv3`` read the same levels);
* between layers of ``DetectionModel.model``: a layer's output (``Conv``, ``C2f``,
  ``C3``, ``SPPF``, ``C2PSA`` end in one ``Conv``) followed through ``nn.Upsample``
  and ``Concat`` (input offsets) to every consumer, ``Detect`` included.

Anything else (``C2PSA``'s attention stream, whose width the attention's reshape
fixes; the final box/class convs; the image input; a layer read by a module this
file does not know, e.g. PyraFAN's fusion) is left alone: groups that touch it are
*frozen*. For ``yolo11n-pyrafan`` that leaves the neck's three outputs and the
PyraFAN head unpruned; the backbone and the rest of the neck are pruned. For ``yolo26n``
it leaves the attention ``C3k2`` of P5 and the output read by the residual ``SPPF``.

**Saved format.** :func:`save_pruned` writes :func:`common.yolo.save_weights`' file
with ``meta["pruned_channels"] = {group name: kept channels}`` (every cut so far: the CLI
merges the input file's record with its own).
Loading needs no pruning code: :func:`common.yolo.load_weights` builds the architecture
from its YAML and narrows every conv and BatchNorm to the stored shapes, so a pruned
model loads wherever a model loads. The model's ``yaml`` still describes the unpruned
architecture.

Ultralytics' layer classes and dataset helpers come through the adapter
(:func:`common.yolo.layer_types`, :func:`common.yolo.split_images`, :func:`common.yolo.letterbox`).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from common import yolo

log = logging.getLogger(__name__)

DEFAULT_BINS = 32


class PruneError(ValueError):
    """A pruning request that cannot be met (bad ratio, unreachable target, bad file); the message names it."""


# --------------------------------------------------------------------------- entropy


def histogram_counts(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    """Per-channel histogram counts ``(C, bins)`` of samples ``x`` ``(N, C)``, equal-width bins on ``[lo_c, hi_c]``.

    The bin of value v is ``floor((v - lo) / (hi - lo) * bins)`` clipped to ``[0, bins - 1]``
    (``hi`` falls in the last bin). A channel with ``hi - lo <= 1e-6 * max(1, |lo|, |hi|)``
    (constant up to float noise) puts every sample in bin 0.
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    lo = torch.as_tensor(lo, dtype=torch.float64)
    hi = torch.as_tensor(hi, dtype=torch.float64)
    n, c = x.shape
    span = hi - lo
    flat = span <= 1e-6 * torch.maximum(torch.ones_like(lo), torch.maximum(lo.abs(), hi.abs()))
    scale = torch.where(flat, torch.zeros_like(span), bins / torch.where(flat, torch.ones_like(span), span))
    idx = ((x - lo) * scale).floor().clamp_(0, bins - 1).long()  # (N, C)
    idx = idx + torch.arange(c) * bins  # channel c's bins are c*bins .. c*bins + bins - 1
    return torch.bincount(idx.reshape(-1), minlength=c * bins).view(c, bins)


def entropy_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats per row of ``counts`` ``(C, bins)``: ``H = -sum_b p_b ln p_b``, ``0 ln 0 = 0``.

    Examples
    --------
    Counts ``[2, 1, 1]``: p = (1/2, 1/4, 1/4), H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2 = 1.0397 nats.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64)
    p = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)


class EntropyMeter:
    """Histogram entropy (nats) of each channel's values, over data seen in batches.

    ``update(x)`` takes ``(B, C, H, W)`` maps (or ``(N, C)`` samples); pass 1 finds the
    range(s), then call :meth:`start_counting` and feed the same data again: pass 2 bins,
    and :meth:`entropy` gives one value per channel.

    The estimator (the score of the platform's entropy channel filtering):
    every post-activation value of a channel, at every position of every calibration
    image, is put into one of ``bins`` equal-width bins spanning the range ``[min, max]``
    of *all* the channels of the layer (``shared_range=True``; False: each channel's
    own range), and ``H = -sum_b p_b ln p_b`` of the bin frequencies. ``H`` lies in
    ``[0, ln bins]``: 0 for a constant (dead) channel, high for one whose values spread
    over many of the layer's distinguishable levels.

    Why this one. A histogram counts how many distinguishable states a channel takes,
    which is what "information" means for a filter, with no assumption on the shape
    of the (skewed, often bimodal) post-SiLU distribution; the Gaussian alternative
    ``0.5 ln(2 pi e var)`` assumes one and is -inf for a constant channel. The bins are
    shared by the layer, i.e. every channel is read at the same resolution, so a
    channel whose values vary by a tiny fraction of what its neighbours do falls into
    one or two bins and scores low, as it carries little that the next layer can tell
    apart. The per-channel range is scale-free and scores such a channel as high as
    any other. In a one-off probe on a trained YOLO11n-P2 (standard preset, site 0, 32
    calibration images, dropped means compensated, no fine-tune), cutting 20 % of the
    parameters left mAP50 0.506 with shared bins, 0.158 with per-channel bins, 0.286
    with random channels and 0.420 cutting the smallest BatchNorm |gamma| (from 0.734);
    ``benchmarks/compression.py`` repeats the comparison on YOLO11n. 32 bins
    resolve the distribution with the ~10^5 to 10^7 samples per channel a few dozen
    320 px images give. Known bias: a channel that is near-constant except for rare
    strong responses (a detector of rare, small objects) scores low.

    Examples
    --------
    Three channels, shared range [-1, 7], 8 bins of width 1: a constant channel -> 0;
    one taking -1 and 7 equally often (bins 0 and 7) -> ln 2 = 0.6931; [0, 0, 1, 3] (bins
    1, 1, 2, 4: counts [2, 1, 1]) -> 1.5 ln 2 = 1.0397. A channel alternating 0 and 0.1
    in that layer falls in bin 1 only -> 0; with ``shared_range=False`` it scores ln 2.
    """

    def __init__(self, channels: int, bins: int = DEFAULT_BINS, shared_range: bool = True):
        self.bins, self.shared_range = bins, shared_range
        self.lo = torch.full((channels,), math.inf, dtype=torch.float64)
        self.hi = torch.full((channels,), -math.inf, dtype=torch.float64)
        self.counts: torch.Tensor | None = None

    @staticmethod
    def _samples(x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x).detach().to(torch.float64)
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) if x.ndim == 4 else x  # (N, C)

    def update(self, x: torch.Tensor) -> None:
        s = self._samples(x)
        if self.counts is None:
            self.lo = torch.minimum(self.lo, s.amin(0))
            self.hi = torch.maximum(self.hi, s.amax(0))
        else:
            self.counts += histogram_counts(s, self.lo, self.hi, self.bins)

    def start_counting(self) -> None:
        if not torch.isfinite(self.lo).all():
            raise RuntimeError("EntropyMeter: pass 1 saw no data")
        if self.shared_range:
            self.lo = torch.full_like(self.lo, float(self.lo.min()))
            self.hi = torch.full_like(self.hi, float(self.hi.max()))
        self.counts = torch.zeros((self.lo.numel(), self.bins), dtype=torch.long)

    def entropy(self) -> torch.Tensor:
        if self.counts is None or int(self.counts[0].sum()) == 0:
            raise RuntimeError("EntropyMeter: pass 2 saw no data")
        return entropy_from_counts(self.counts)


# --------------------------------------------------------------------------- channel groups


@dataclass
class ChannelGroup:
    """Channels ``0..size-1`` that are cut together (see the module docstring).

    ``producers``: ``(path of an Ultralytics Conv, output offset)``; ``consumers``:
    ``(path of an nn.Conv2d, input offset)``; ``passthrough``: paths of depthwise
    Convs that carry the channels on (both sides cut); ``signals``: ``(module path,
    output offset)`` whose outputs are the channels' values (entropy is averaged over
    them); ``tie``: groups with the same tie key keep the same count (C2f halves);
    ``frozen``: touches a module this file cannot rewire, never cut.
    """

    name: str
    size: int
    producers: list[tuple[str, int]] = field(default_factory=list)
    consumers: list[tuple[str, int]] = field(default_factory=list)
    passthrough: list[str] = field(default_factory=list)
    signals: list[tuple[str, int]] = field(default_factory=list)
    tie: str | None = None
    frozen: bool = False


def _conv_out(module: nn.Module) -> int:
    return module.conv.out_channels


class _Builder:
    """Collects groups while walking a model; a group is opened by its first producer."""

    def __init__(self):
        self.groups: list[ChannelGroup] = []
        self.t = yolo.layer_types()  # Ultralytics' layer classes

    def new(self, producer: str, size: int, offset: int = 0, signal: tuple[str, int] | None = None,
            tie: str | None = None, name: str | None = None) -> ChannelGroup:
        g = ChannelGroup(name=name or producer, size=size, producers=[(producer, offset)],
                         signals=[signal or (producer, offset)], tie=tie)
        self.groups.append(g)
        return g

    # -- inside modules ---------------------------------------------------------------

    def bottleneck(self, path: str, m: nn.Module) -> None:
        self.new(f"{path}.cv1", _conv_out(m.cv1)).consumers.append((f"{path}.cv2.conv", 0))

    def bottleneck_chain(self, g: ChannelGroup, path: str, blocks: Sequence[nn.Module],
                         out_consumers: Iterable[tuple[str, int]] = ()) -> ChannelGroup | None:
        """Follow ``g`` (the input of ``blocks[0]``) through a sequence of blocks; returns the last open group.

        ``out_consumers[j]`` (if given) also reads block j's output.
        """
        out_consumers = list(out_consumers)
        for j, block in enumerate(blocks):
            p = f"{path}.{j}"
            if isinstance(block, self.t.Bottleneck):
                g.consumers.append((f"{p}.cv1.conv", 0))
                self.bottleneck(p, block)
                if block.add:  # out = in + cv2(...): the same channels
                    g.producers.append((f"{p}.cv2", 0))
                    g.signals.append((p, 0))
                else:
                    g = self.new(f"{p}.cv2", _conv_out(block.cv2))
            elif isinstance(block, self.t.C3):  # C3k
                g.consumers += [(f"{p}.cv1.conv", 0), (f"{p}.cv2.conv", 0)]
                self.c3(p, block)
                g = self.new(f"{p}.cv3", _conv_out(block.cv3))
            else:  # e.g. C3k2(attn=True)'s Bottleneck + PSABlock: not rewired
                g.frozen = True
                return None
            if j < len(out_consumers):
                g.consumers.append(out_consumers[j])
        return g

    def c3(self, path: str, m: nn.Module) -> None:
        c_ = _conv_out(m.cv2)
        self.new(f"{path}.cv2", c_).consumers.append((f"{path}.cv3.conv", c_))
        g = self.bottleneck_chain(self.new(f"{path}.cv1", _conv_out(m.cv1)), f"{path}.m", list(m.m))
        if g is not None:
            g.consumers.append((f"{path}.cv3.conv", 0))

    def c2f(self, path: str, m: nn.Module) -> None:
        c = _conv_out(m.cv1) // 2
        # names say which chunk, not the offset: they must not change when the model is cut
        first = self.new(f"{path}.cv1", c, 0, tie=path, name=f"{path}.cv1[0]")  # y[0]: read by cv2 only
        first.consumers.append((f"{path}.cv2.conv", 0))
        # y[1] -> m[0] -> m[1] ...; cv2 reads every y
        second = self.new(f"{path}.cv1", c, c, tie=path, name=f"{path}.cv1[1]")
        second.consumers.append((f"{path}.cv2.conv", c))
        outs = [(f"{path}.cv2.conv", (2 + j) * c) for j in range(len(m.m))]
        if self.bottleneck_chain(second, f"{path}.m", list(m.m), outs) is None:
            first.frozen = True  # the halves are tied

    def sppf(self, path: str, m: nn.Module) -> None:
        c_ = _conv_out(m.cv1)
        g = self.new(f"{path}.cv1", c_)
        g.consumers += [(f"{path}.cv2.conv", k * c_) for k in range(getattr(m, "n", 3) + 1)]

    def psablock(self, path: str, m: nn.Module) -> None:
        self.new(f"{path}.ffn.0", _conv_out(m.ffn[0])).consumers.append((f"{path}.ffn.1.conv", 0))

    def detect(self, path: str, m: nn.Module) -> None:
        for i in range(m.nl):
            for box_name, cls_name in _detect_branches(m):
                box, cls = f"{path}.{box_name}.{i}", f"{path}.{cls_name}.{i}"
                box_seq, cls_seq = getattr(m, box_name)[i], getattr(m, cls_name)[i]
                self.new(f"{box}.0", _conv_out(box_seq[0])).consumers.append((f"{box}.1.conv", 0))
                self.new(f"{box}.1", _conv_out(box_seq[1])).consumers.append((f"{box}.2", 0))
                if isinstance(cls_seq[0], self.t.Conv):  # legacy head: Conv, Conv, Conv2d
                    self.new(f"{cls}.0", _conv_out(cls_seq[0])).consumers.append((f"{cls}.1.conv", 0))
                    self.new(f"{cls}.1", _conv_out(cls_seq[1])).consumers.append((f"{cls}.2", 0))
                else:  # (DWConv, Conv), (DWConv, Conv), Conv2d
                    g = self.new(f"{cls}.0.1", _conv_out(cls_seq[0][1]))
                    g.passthrough.append(f"{cls}.1.0")
                    g.consumers.append((f"{cls}.1.1.conv", 0))
                    self.new(f"{cls}.1.1", _conv_out(cls_seq[1][1])).consumers.append((f"{cls}.2", 0))

    # -- between layers ---------------------------------------------------------------

    def input_port(self, path: str, m: nn.Module, k: int) -> tuple[list[str], list[tuple[str, int]]] | None:
        """(pass-throughs, consumers at offset 0) of input ``k`` of layer ``m``; None if not rewirable."""
        if isinstance(m, self.t.Detect):
            if type(m) is not self.t.Detect:
                return None  # PyraFAN, Segment/Pose...: not rewired
            passthrough, consumers = [], []
            for box, cls in _detect_branches(m):  # an end-to-end head reads each level twice
                consumers.append((f"{path}.{box}.{k}.0.conv", 0))
                if isinstance(getattr(m, cls)[k][0], self.t.Conv):
                    consumers.append((f"{path}.{cls}.{k}.0.conv", 0))
                else:
                    passthrough.append(f"{path}.{cls}.{k}.0.0")
                    consumers.append((f"{path}.{cls}.{k}.0.1.conv", 0))
            return passthrough, consumers
        if type(m) in (self.t.Conv, self.t.DWConv) and isinstance(m.conv, nn.Conv2d):
            if m.conv.groups != 1:
                return None
            return [], [(f"{path}.conv", 0)]
        if isinstance(m, (self.t.C2f, self.t.C2PSA)):
            return [], [(f"{path}.cv1.conv", 0)]
        if isinstance(m, self.t.C3):
            return [], [(f"{path}.cv1.conv", 0), (f"{path}.cv2.conv", 0)]
        if isinstance(m, self.t.SPPF) and not getattr(m, "add", False):
            return [], [(f"{path}.cv1.conv", 0)]
        return None

    def output_producer(self, path: str, m: nn.Module) -> str | None:
        if type(m) is self.t.Conv and m.conv.groups == 1:
            return path
        if isinstance(m, (self.t.C2f, self.t.C2PSA)) or (isinstance(m, self.t.SPPF) and not getattr(m, "add", False)):
            return f"{path}.cv2"
        if isinstance(m, self.t.C3):
            return f"{path}.cv3"
        return None

    def layers(self, layers: nn.Sequential, prefix: str = "model") -> None:
        """Groups of the layers' outputs, followed through Upsample and Concat to their consumers.

        Each layer's output is a list of segments ``(group or None, width)``; None is a
        block of channels no group describes (the image, an unknown module's output;
        width -1 if unknown, which freezes every group after it in a concatenation).
        """
        segments: dict[int, list[tuple[ChannelGroup | None, int]]] = {}
        for i, m in enumerate(layers):
            path = f"{prefix}.{i}"
            inputs = []
            for f in m.f if isinstance(m.f, list) else [m.f]:
                src = f if f >= 0 else i + f
                inputs.append(segments[src] if src >= 0 else [(None, 3)])  # layer 0 reads the image
            if isinstance(m, nn.Upsample):
                segments[i] = inputs[0]
                continue
            if isinstance(m, self.t.Concat) and m.d == 1:
                segments[i] = [s for segs in inputs for s in segs]
                continue
            for k, segs in enumerate(inputs):
                port = self.input_port(path, m, k)
                offset = 0
                for g, width in segs:
                    if g is not None:
                        if port is None or offset < 0:
                            g.frozen = True
                        else:
                            g.passthrough += port[0]
                            g.consumers += [(c, o + offset) for c, o in port[1]]
                    offset = -1 if offset < 0 or width < 0 else offset + width
            producer = self.output_producer(path, m)
            if producer is None:
                segments[i] = [(None, -1)]
            else:
                conv = m if producer == path else m.get_submodule(producer[len(path) + 1:])
                g = self.new(producer, _conv_out(conv), signal=(path, 0))
                segments[i] = [(g, g.size)]


def find_groups(model: nn.Module) -> list[ChannelGroup]:
    """Every channel group of an Ultralytics ``DetectionModel`` (frozen ones included), in a fixed order."""
    b = _Builder()
    for path, m in model.named_modules():
        if isinstance(m, b.t.Bottleneck) and not _inside_chain(path):
            b.bottleneck(path, m)
        elif isinstance(m, b.t.C2f):
            b.c2f(path, m)
        elif isinstance(m, b.t.C3) and not _inside_chain(path):
            b.c3(path, m)
        elif isinstance(m, b.t.SPPF):
            b.sppf(path, m)
        elif isinstance(m, b.t.PSABlock):
            b.psablock(path, m)
        elif type(m) is b.t.Detect:
            b.detect(path, m)
    b.layers(model.model)
    for g in b.groups:  # the surgery cuts plain (groups=1) and depthwise convs only
        convs = [model.get_submodule(p).conv for p, _ in g.producers] + [model.get_submodule(p)
                                                                          for p, _ in g.consumers]
        dws = [model.get_submodule(p).conv for p in g.passthrough]
        if any(c.groups != 1 for c in convs) or any(not c.groups == c.in_channels == c.out_channels for c in dws):
            g.frozen = True
    tied: dict[str, list[ChannelGroup]] = {}
    for g in b.groups:
        if g.tie:
            tied.setdefault(g.tie, []).append(g)
    for members in tied.values():  # a tie is frozen as a whole
        if any(g.frozen for g in members):
            for g in members:
                g.frozen = True
    names = [g.name for g in b.groups]
    assert len(names) == len(set(names)), "group names must be unique"
    return b.groups


def _detect_branches(m: nn.Module) -> list[tuple[str, str]]:
    """A Detect head's (box, class) branch names: ``cv2``/``cv3``, and YOLO26's one-to-one ``one2one_cv2``/``_cv3``."""
    return [("cv2", "cv3")] + ([("one2one_cv2", "one2one_cv3")] if getattr(m, "one2one_cv2", None) is not None else [])


def _inside_chain(path: str) -> bool:
    """Bottlenecks and C3ks under a C2f's or C3's ``m`` are handled by that block's chain."""
    parts = path.split(".")
    return len(parts) >= 2 and parts[-2] == "m"


# --------------------------------------------------------------------------- surgery


def _cut_conv(conv: nn.Conv2d, out_keep: torch.Tensor | None, in_keep: torch.Tensor | None) -> None:
    w = conv.weight.data
    depthwise = conv.groups > 1
    if depthwise:
        assert conv.groups == conv.in_channels == conv.out_channels, "only depthwise grouped convs are cut"
        keep = out_keep if out_keep is not None else in_keep
        assert in_keep is None or out_keep is None or torch.equal(in_keep, out_keep), "depthwise: in == out"
        out_keep = in_keep = keep
    if out_keep is not None:
        w = w[out_keep]
        if conv.bias is not None:
            conv.bias = nn.Parameter(conv.bias.data[out_keep].clone())
        conv.out_channels = int(out_keep.sum())
    if in_keep is not None:
        if depthwise:
            conv.in_channels = conv.groups = int(in_keep.sum())
        else:
            w = w[:, in_keep]
            conv.in_channels = int(in_keep.sum())
    conv.weight = nn.Parameter(w.clone())


def _cut_bn(bn: nn.BatchNorm2d, keep: torch.Tensor) -> None:
    bn.weight = nn.Parameter(bn.weight.data[keep].clone())
    bn.bias = nn.Parameter(bn.bias.data[keep].clone())
    bn.running_mean = bn.running_mean[keep].clone()
    bn.running_var = bn.running_var[keep].clone()
    bn.num_features = int(keep.sum())


def _masks(model: nn.Module, groups: Sequence[ChannelGroup], keep: dict[str, Sequence[int]]
           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Boolean keep masks over the output and input channels of every ``nn.Conv2d`` the cut touches."""
    by_name = {g.name: g for g in groups}
    out_mask: dict[str, torch.Tensor] = {}  # Conv2d path -> bool over its output channels
    in_mask: dict[str, torch.Tensor] = {}

    def mask(table, path, size):
        if path not in table:
            table[path] = torch.ones(size, dtype=torch.bool)
        return table[path]

    for name, channels in keep.items():
        g = by_name.get(name)
        if g is None:
            raise PruneError(f"unknown channel group '{name}'")
        if g.frozen:
            raise PruneError(f"channel group '{name}' is frozen (it touches a module that cannot be rewired)")
        idx = torch.as_tensor(list(channels), dtype=torch.long)
        if idx.numel() == 0 or idx.min() < 0 or idx.max() >= g.size or idx.unique().numel() != idx.numel():
            raise PruneError(f"group '{name}': keep {idx.tolist()[:8]} must be distinct channels in [0, {g.size})")
        kept = torch.zeros(g.size, dtype=torch.bool)
        kept[idx] = True
        for path, off in g.producers:
            conv = model.get_submodule(path).conv
            mask(out_mask, f"{path}.conv", conv.out_channels)[off: off + g.size] &= kept
        for path in g.passthrough:
            conv = model.get_submodule(path).conv
            mask(out_mask, f"{path}.conv", conv.out_channels)[:] &= kept
        for path, off in g.consumers:
            mask(in_mask, path, model.get_submodule(path).in_channels)[off: off + g.size] &= kept
    return out_mask, in_mask


def _bn_of(model: nn.Module, conv_path: str) -> nn.BatchNorm2d | None:
    """The BatchNorm after an Ultralytics ``Conv``'s ``.conv`` (None for a bare ``nn.Conv2d``)."""
    if not conv_path.endswith(".conv"):
        return None
    bn = getattr(model.get_submodule(conv_path[: -len(".conv")]), "bn", None)
    return bn if isinstance(bn, nn.BatchNorm2d) else None


def _parameters_after(model: nn.Module, out_mask: dict[str, torch.Tensor], in_mask: dict[str, torch.Tensor]) -> int:
    """The parameter count the cut would leave, without cutting."""
    total = yolo.count_parameters(model)
    for path in set(out_mask) | set(in_mask):
        conv = model.get_submodule(path)
        out = int(out_mask[path].sum()) if path in out_mask else conv.out_channels
        depthwise = conv.groups > 1
        cin = 1 if depthwise else int(in_mask[path].sum()) if path in in_mask else conv.in_channels
        kh, kw = conv.kernel_size
        total += out * cin * kh * kw - conv.weight.numel()
        if conv.bias is not None:
            total += out - conv.bias.numel()
        bn = _bn_of(model, path)
        if bn is not None and path in out_mask:
            total += 2 * out - bn.weight.numel() - bn.bias.numel()
    return total


def _compensate(model: nn.Module, path: str, in_keep: torch.Tensor, mean: torch.Tensor) -> None:
    """Fold the expected contribution of ``path``'s dropped inputs into what follows the conv.

    A dropped input channel c whose mean is mu_c added ``mu_c * sum_k W[:, c, k]`` to the
    conv's output (away from the zero-padded border); that sum ``delta`` ``(out,)`` is
    subtracted from the following BatchNorm's running mean, or added to the conv's bias.
    """
    conv = model.get_submodule(path)
    dropped = ~in_keep
    if conv.groups != 1 or not dropped.any():
        return
    delta = (conv.weight.data[:, dropped].sum((2, 3)).double() * mean[dropped].double()).sum(1)  # (out,)
    bn = _bn_of(model, path)
    if bn is not None:
        bn.running_mean -= delta.to(bn.running_mean.dtype)
    elif conv.bias is not None:
        conv.bias.data += delta.to(conv.bias.dtype)
    else:
        log.debug("%s: no BatchNorm or bias to fold the dropped channels' means into", path)


def apply_pruning(model: nn.Module, groups: Sequence[ChannelGroup], keep: dict[str, Sequence[int]],
                  input_mean: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Cut ``model`` in place so that group ``name`` keeps exactly the channels ``keep[name]`` (in their order).

    Groups not in ``keep`` stay whole. All groups refer to the model's current
    channel numbering, so every cut is made at once (masks in that numbering).
    With ``input_mean`` (:class:`Calibration`), each consuming conv's dropped inputs
    are replaced by their mean (:func:`_compensate`): a low-entropy channel is close
    to a constant, and a constant is what a bias can carry.
    """
    out_mask, in_mask = _masks(model, groups, keep)
    for path, m in in_mask.items() if input_mean else ():
        if path in input_mean:
            _compensate(model, path, m, input_mean[path])
    for path in sorted(set(out_mask) | set(in_mask)):
        _cut_conv(model.get_submodule(path), out_mask.get(path), in_mask.get(path))
        bn = _bn_of(model, path)
        if bn is not None and path in out_mask:
            _cut_bn(bn, out_mask[path])
    return yolo.sync_widths(model)


def select_channels(entropy: dict[str, torch.Tensor], groups: Sequence[ChannelGroup], keep_fraction: float,
                    min_channels: int = 1) -> dict[str, list[int]]:
    """The ``max(min_channels, round(keep_fraction * size))`` highest-entropy channels of each prunable group.

    Ties go to the lower index; kept channels are returned in ascending order. A
    group without an entropy (``entropy`` lacks it) keeps its first channels.

    Examples
    --------
    Entropies [0.1, 0.9, 0.5, 0.7], keep_fraction 0.5 -> round(2.0) = 2 channels: [1, 3].
    """
    out = {}
    for g in groups:
        if g.frozen:
            continue
        k = min(g.size, max(min_channels, int(round(keep_fraction * g.size))))
        if k == g.size:
            continue
        h = entropy.get(g.name)
        if h is None:
            out[g.name] = list(range(k))
            continue
        order = sorted(range(g.size), key=lambda c: (-float(h[c]), c))
        out[g.name] = sorted(order[:k])
    return out


@dataclass
class Calibration:
    """What one calibration run measured: ``entropy[group]`` ``(size,)`` in nats and
    ``input_mean[conv path]`` ``(in_channels,)``, the mean input of every consuming conv."""

    entropy: dict[str, torch.Tensor]
    input_mean: dict[str, torch.Tensor]


@torch.no_grad()
def calibrate(model: nn.Module, groups: Sequence[ChannelGroup], batches: Iterable[torch.Tensor],
              bins: int = DEFAULT_BINS, shared_range: bool = True) -> Calibration:
    """Per-channel entropy of every prunable group, and consumer input means, over ``batches`` ``(B, 3, H, W)``.

    Entropy as in :class:`EntropyMeter`, the shared range being that of the
    group's channels in one signal tensor. Runs the model (in eval mode) twice over
    the batches (pass 1: ranges and means, pass 2: histograms; the batches must be
    the same both times, so ``batches`` is materialised). A group with several
    signals (a residual chain) gets the mean of their entropies.
    """
    batches = list(batches)
    if not batches:
        raise PruneError("no calibration images")
    meters: dict[tuple[str, int, str], EntropyMeter] = {}
    by_module: dict[str, list[tuple[int, int, EntropyMeter]]] = {}
    sums: dict[str, list] = {}  # consumer conv -> [sum over (B, H, W) per input channel, count]
    for g in groups:
        if g.frozen:
            continue
        for path, off in g.signals:
            meter = meters[(g.name, off, path)] = EntropyMeter(g.size, bins, shared_range)
            by_module.setdefault(path, []).append((off, g.size, meter))
        for path, _ in g.consumers:
            sums[path] = [0.0, 0]
    counting = False

    def hook(path):
        def fn(_module, _inputs, output):
            for off, size, meter in by_module[path]:
                meter.update(output[:, off: off + size])
        return fn

    def pre_hook(path):
        def fn(_module, inputs):
            if not counting:
                x = inputs[0].detach().to(torch.float64)  # (B, C_in, H, W)
                sums[path][0] = sums[path][0] + x.sum((0, 2, 3))
                sums[path][1] += x.shape[0] * x.shape[2] * x.shape[3]
        return fn

    was_training = model.training
    model.eval()
    handles = [model.get_submodule(p).register_forward_hook(hook(p)) for p in by_module]
    handles += [model.get_submodule(p).register_forward_pre_hook(pre_hook(p)) for p in sums]
    try:
        for pass_ in range(2):
            if pass_ == 1:
                counting = True
                for meter in meters.values():
                    meter.start_counting()
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    entropy: dict[str, list[torch.Tensor]] = {}
    for (name, _off, _path), meter in meters.items():
        entropy.setdefault(name, []).append(meter.entropy())
    return Calibration({name: torch.stack(hs).mean(0) for name, hs in entropy.items()},
                       {path: (total / n).float() for path, (total, n) in sums.items()})


# --------------------------------------------------------------------------- to a target ratio


@dataclass
class PruneReport:
    keep_fraction: float
    params_before: int
    params_after: int
    groups_pruned: int
    groups_frozen: int
    kept_channels: dict[str, int]

    @property
    def ratio_achieved(self) -> float:
        return 1.0 - self.params_after / self.params_before


def _params_after(model: nn.Module, groups: Sequence[ChannelGroup], keep_fraction: float, min_channels: int) -> int:
    """Parameters left by a cut to ``keep_fraction`` (which channels does not matter for the count)."""
    return _parameters_after(model, *_masks(model, groups, select_channels({}, groups, keep_fraction, min_channels)))


def prune_to_ratio(model: nn.Module, ratio: float, entropy: dict[str, torch.Tensor],
                   groups: Sequence[ChannelGroup] | None = None, min_channels: int = 1,
                   input_mean: dict[str, torch.Tensor] | None = None) -> PruneReport:
    """Cut ``model`` in place so that about ``ratio`` of its parameters go, lowest-entropy channels first.

    The keep fraction is the largest one (bisection, 1e-4) whose cut removes at
    least ``ratio`` of the parameters; the achieved ratio is in the report (it
    overshoots by at most one channel per group).
    """
    if not 0.0 < ratio < 1.0:
        raise PruneError(f"ratio={ratio}: the fraction of parameters to remove must be in (0, 1)")
    groups = list(groups) if groups is not None else find_groups(model)
    before = yolo.count_parameters(model)
    floor = 1.0 - _params_after(model, groups, 0.0, min_channels) / before
    if ratio > floor:
        raise PruneError(f"ratio={ratio}: at most {floor:.3f} of the parameters can be removed from this model "
                         f"(every prunable group down to {min_channels} channel(s); the rest is frozen)")
    lo, hi = 0.0, 1.0  # removed(lo) >= ratio > removed(hi) (or hi = 1: nothing cut)
    while hi - lo > 1e-4:
        mid = (lo + hi) / 2
        if 1.0 - _params_after(model, groups, mid, min_channels) / before >= ratio:
            lo = mid
        else:
            hi = mid
    keep = select_channels(entropy, groups, lo, min_channels)
    apply_pruning(model, groups, keep, input_mean)
    after = yolo.count_parameters(model)
    report = PruneReport(lo, before, after, len(keep), sum(g.frozen for g in groups),
                         {name: len(ch) for name, ch in keep.items()})
    log.info("pruned %d groups (%d frozen) to keep fraction %.3f: %d -> %d parameters (%.1f %% removed)",
             report.groups_pruned, report.groups_frozen, lo, before, after, 100 * report.ratio_achieved)
    return report


# --------------------------------------------------------------------------- files


def save_pruned(model: nn.Module, path: str | Path, kept_channels: dict[str, int], **meta) -> Path:
    """:func:`common.yolo.save_weights` with ``meta["pruned_channels"] = {group: kept channels}``."""
    return yolo.save_weights(model, path, pruned_channels=dict(kept_channels), **meta)


# --------------------------------------------------------------------------- calibration data


def calibration_batches(data_yaml: str | Path, *, split: str = "train", imgsz: int = 320, max_images: int = 64,
                        batch: int = 8) -> Iterator[torch.Tensor]:
    """Letterboxed RGB images in [0, 1], ``(B, 3, imgsz, imgsz)``, evenly spaced over a split, no augmentation."""
    import cv2

    try:
        files = yolo.split_images(data_yaml, split)
    except yolo.ModelError as err:
        raise PruneError(f"calibration: {err}") from None
    if len(files) > max_images:
        files = [files[i] for i in np.linspace(0, len(files) - 1, max_images).round().astype(int)]
    for start in range(0, len(files), batch):
        imgs = []
        for f in files[start: start + batch]:
            img = cv2.imread(str(f))
            if img is None:
                raise PruneError(f"cannot read calibration image {f}")
            img = yolo.letterbox(img, imgsz)[:, :, ::-1].transpose(2, 0, 1)  # BGR HWC -> RGB CHW
            imgs.append(torch.from_numpy(np.ascontiguousarray(img)).float() / 255.0)
        yield torch.stack(imgs)


def compress(model: nn.Module, data_yaml: str | Path, ratio: float, *, imgsz: int = 320,
             calib_images: int = 64, bins: int = DEFAULT_BINS, min_channels: int = 1,
             compensate: bool = True) -> PruneReport:
    """Score channels on ``data_yaml``'s train split and cut ``model`` in place to ``ratio`` (no fine-tune).

    ``compensate``: fold the dropped channels' calibration means into the next layer.
    """
    groups = find_groups(model)
    batches = list(calibration_batches(data_yaml, imgsz=imgsz, max_images=calib_images))
    calib = calibrate(model, groups, batches, bins)
    return prune_to_ratio(model, ratio, calib.entropy, groups, min_channels,
                          calib.input_mean if compensate else None)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m common.prune",
        description="Compress a site's YOLO model by entropy channel filtering, then fine-tune it.")
    ap.add_argument("--weights", required=True, help="input weights (a common.yolo.save_weights file, pruned or not)")
    ap.add_argument("--data", required=True, help="data.yaml: train split for calibration and fine-tuning")
    ap.add_argument("--ratio", type=float, required=True, help="fraction of parameters to remove, in (0, 1)")
    ap.add_argument("--epochs", type=int, default=3, help="fine-tune epochs after pruning (0: none)")
    ap.add_argument("--out", required=True, help="output weights (.pt, save_pruned format)")
    ap.add_argument("--onnx", help="also export the pruned model to this ONNX file")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr0", type=float, default=0.01, help="fine-tune learning rate (AdamW; the presets' train.lr0)")
    ap.add_argument("--calib-images", type=int, default=64, help="train images used to score channels")
    ap.add_argument("--bins", type=int, default=DEFAULT_BINS, help="histogram bins of the entropy estimator")
    ap.add_argument("--min-channels", type=int, default=1, help="never cut a group below this many channels")
    ap.add_argument("--no-compensate", action="store_true",
                    help="do not fold the dropped channels' calibration means into the next layer")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if not 0.0 < args.ratio < 1.0:
        ap.error(f"--ratio {args.ratio}: the fraction of parameters to remove must be in (0, 1)")
    for flag, value in (("--weights", args.weights), ("--data", args.data)):
        if not Path(value).is_file():
            ap.error(f"{flag} {value}: file not found")
    for flag, value, least in (("--epochs", args.epochs, 0), ("--imgsz", args.imgsz, 32), ("--batch", args.batch, 1),
                               ("--calib-images", args.calib_images, 1), ("--bins", args.bins, 2),
                               ("--min-channels", args.min_channels, 1)):
        if value < least:
            ap.error(f"{flag} {value}: must be >= {least}")
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        model = yolo.load_weights(args.weights)
        report = compress(model, args.data, args.ratio, imgsz=args.imgsz, calib_images=args.calib_images,
                          bins=args.bins, min_channels=args.min_channels, compensate=not args.no_compensate)
        kept = {**model.cedar_meta.get("pruned_channels", {}), **report.kept_channels}  # every cut so far
        if args.epochs:
            res = yolo.train(model, args.data, epochs=args.epochs, imgsz=args.imgsz, batch=args.batch,
                             lr0=args.lr0, seed=args.seed, desc="fine-tune")
            log.info("fine-tuned %d epochs (%d iterations, %.0f s), last loss %.3f", res.epochs, res.iterations,
                     res.seconds, res.loss)
        save_pruned(model, args.out, kept, prune_ratio=args.ratio, ratio_achieved=report.ratio_achieved,
                    keep_fraction=report.keep_fraction, params_before=report.params_before,
                    params_after=report.params_after, finetune_epochs=args.epochs)
        if args.onnx:
            yolo.export_onnx(model, args.onnx, imgsz=args.imgsz)
    except (PruneError, yolo.ModelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.weights}: {report.params_before} -> {report.params_after} parameters "
          f"({100 * report.ratio_achieved:.1f} % removed, requested {100 * args.ratio:.0f} %), saved {args.out}"
          + (f" and {args.onnx}" if args.onnx else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
