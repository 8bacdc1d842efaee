"""PyraFAN: the Pyramid-Fusion Attention Network head (paper section 3, Figure 1).

Three pyramid levels ``X2, X3, X4`` (strides 4, 8, 16) come in; three detection
levels go out:

* **Fusion** (levels l = 3, 4; ASFF-like). Every level is aligned to level l,
  ``Z_k = T_{l,k}(X_k) = PW^{C/r}(DW3x3(Interp_{2^(l-k)}(X_k)))``; per-pixel level
  weights ``W = softmax(Conv1x1->3(Z2 || Z3 || Z4), dim=1)``; ``F_l = sum_k W_k * Z_k``.
* **Small-object bypass** (level 2). ``X2_attn = X2 * a``, ``a = sigmoid(GAP(X2))``
  (one gate value per channel, no parameters).
* **Heads.** One depthwise 3x3 shared by every level, then task-specific 1x1 convs:
  box ``4 * reg_max`` DFL logits, class logits (sigmoid at inference).

Choices where the paper is ambiguous or silent, and why:

* **C.** Levels have different widths (YOLO11n neck: 32/64/128 channels), the
  paper's C is one number. We take ``C = max(C2, C3, C4)`` (the deepest level), so
  every Z_k and F_l has ``C/r`` channels. With YOLO11s (C = 256) that gives
  ``3C/r = 192`` concatenated channels, the paper's own example; with our neck
  ``C/r == C2``, so X2_attn has the head width already. Otherwise a 1x1 Conv
  (BN, SiLU) brings X2_attn to ``C/r`` after the gate (the only way one shared
  depthwise conv can serve all three levels).
* **T_{l,k}.** The paper's ``DWConv^{C/r}`` cannot change the channel count by
  itself (a depthwise conv maps C_k -> C_k): it is DW 3x3 on C_k channels then a
  pointwise 1x1 to C/r, each with BatchNorm and SiLU (Ultralytics' ``DWConv`` and
  ``Conv``, like its own Detect class branch). Resampling comes first, as in the
  paper: nearest, so down-sampling by 2^m keeps every 2^m-th pixel. One T per
  (l, k) pair (six in all), as the paper's indices say.
* **Fusion logits.** ``Conv1x1 (3C/r -> 3)`` with bias, zero-initialised: fusion
  starts as the plain mean of the aligned levels and learns from there.
* **Gate.** Parameter-free, exactly ``sigmoid(GAP(X2))``; GAP is the spatial mean.
* **Shared depthwise conv.** "Both branches share a 3x3 depth-wise conv; only the
  final 1x1 convolutions are task-specific": one DW 3x3 (weights) serves every
  level and both the box and the class branch (it runs once per level). Each
  level keeps its own BatchNorm (+ SiLU) after it: a BatchNorm shared by inputs
  with different statistics normalises each level with its own batch statistics
  in training but with a blend of all levels in eval, a train/eval mismatch
  (EfficientDet shares conv weights with per-level BN for that reason). The
  final 1x1 convs are per task *and* per level: the paper gives small objects a
  *dedicated* head, and a class bias prior depends on the stride (below); they
  cost ``(C/r + 1) (4 reg_max + nc)`` parameters per level.
* **Init.** Like Ultralytics' ``Detect.bias_init`` so training starts where a stock
  YOLO head does: box bias 2.0, class bias ``log(5 / nc / (640 / stride)^2)``.
* **Inference speed.** :meth:`PyraFAN.fuse` (called by Ultralytics' ``model.fuse()``
  in validation, prediction and export) folds each level's BatchNorm into its own
  copy of the shared depthwise conv; every other Conv+BN is folded by Ultralytics.

**PyraFAN v2** (:class:`PyraFANv2`, YAML ``PyraFANv2``; ``yolo11n-pyrafan2``, ``yolo26n-pyrafan2``) keeps v1's
fusion in front of Ultralytics' own ``Detect`` branches, with a learned gate on X2 and the own level added to
each fusion (see the class); on a YOLO26 neck it has YOLO26's NMS-free one-to-one branch. v1 stays as the
paper describes it.

Registration. Ultralytics' ``parse_model`` resolves module names in
``ultralytics.nn.tasks`` and hands input channels only to classes it lists by
identity, so a multi-input class of ours cannot be named in a model YAML as is.
While ``common.yolo.build_model`` builds a model it holds :func:`registered`,
which swaps in :func:`parse_model`: a YAML row naming ``PyraFAN`` is built by
the stock parser as a stock ``Detect`` stand-in (which resolves ``nc``,
``reg_max`` and the input channels), then replaced by a :class:`PyraFAN` with the
same arguments. YAMLs without PyraFAN are parsed by Ultralytics untouched; outside
:func:`registered`, Ultralytics is as it ships. :class:`PyraFAN` subclasses
``Detect``, so stride computation, ``v8DetectionLoss``, validation, prediction,
``fuse`` and ONNX export treat it as a Detect head. Pickled checkpoints name
``common.pyrafan.PyraFAN``: unpickling imports this module (never a "missing
package" install). Ultralytics' ``BaseModel.load`` (partial transfer from
another Detect checkpoint, which reads ``Detect.cv2``) is not supported: cedar
moves weights as state dicts (``common.yolo.save_weights``,
``common.yolo.load_checkpoint``).

This module imports Ultralytics (PyraFAN subclasses its ``Detect``): import it
after :func:`common.ultralytics_env.setup`, as ``common.yolo`` does.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.nn import tasks as _tasks
from ultralytics.nn.modules import DFL, Conv, Detect, DWConv
from ultralytics.utils.torch_utils import fuse_conv_and_bn

NUM_LEVELS = 3  # X2, X3, X4


class LevelAlign(nn.Module):
    """``T_{l,k}(X_k)``: nearest resize to level l, depthwise 3x3, pointwise to ``c_out`` (BN + SiLU after each).

    ``resample`` is False for k == l (no resize). Parameters: ``9 c_in + 2 c_in`` (DW, BN) ``+ c_in c_out +
    2 c_out`` (PW, BN).
    """

    def __init__(self, c_in: int, c_out: int, resample: bool):
        super().__init__()
        self.resample = resample
        self.dw = DWConv(c_in, c_in, 3)
        self.pw = Conv(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if self.resample:  # fixed by construction, so a traced (ONNX) graph has no data-dependent branch
            x = F.interpolate(x, size=tuple(size), mode="nearest")  # (B, c_in, H_l, W_l)
        return self.pw(self.dw(x))  # (B, c_out, H_l, W_l)


class LevelFusion(nn.Module):
    """``F_l = sum_k W_k * Z_k`` with ``W = softmax(Conv1x1->3(Z_2 || Z_3 || Z_4), dim=1)`` (paper section 3).

    Parameters
    ----------
    ch : channels of X2, X3, X4.
    c_out : C / r, the width of every Z_k and of F_l.
    target : index of level l in ``ch`` (1 for level 3, 2 for level 4).

    Examples
    --------
    Zero-initialised logits give W = 1/3 everywhere: F_l is the mean of the three Z_k.
    """

    def __init__(self, ch: Sequence[int], c_out: int, target: int):
        super().__init__()
        self.target = target
        self.align = nn.ModuleList(LevelAlign(c, c_out, resample=k != target) for k, c in enumerate(ch))
        self.logits = nn.Conv2d(len(ch) * c_out, len(ch), 1)
        nn.init.zeros_(self.logits.weight)
        nn.init.zeros_(self.logits.bias)

    def aligned(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[Z_2, Z_3, Z_4]``, each ``(B, C/r, H_l, W_l)``."""
        size = xs[self.target].shape[-2:]
        return [align(x, size) for align, x in zip(self.align, xs, strict=True)]

    def level_weights(self, z: Sequence[torch.Tensor]) -> torch.Tensor:
        """``W``, ``(B, 3, H_l, W_l)``: per pixel, non-negative and summing to 1 over the levels."""
        return torch.softmax(self.logits(torch.cat(list(z), 1)), dim=1)

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        z = self.aligned(xs)
        w = self.level_weights(z)  # (B, 3, H_l, W_l)
        return sum(w[:, k : k + 1] * z_k for k, z_k in enumerate(z))  # (B, C/r, H_l, W_l)


class ChannelGate(nn.Module):
    """``X_attn = X * a``, ``a = sigmoid(GAP(X))`` per channel (paper section 3; no parameters).

    Examples
    --------
    A channel whose mean is 1 gets a = sigmoid(1) = 0.7311; one whose mean is -2, 0.1192.
    """

    @staticmethod
    def attention(x: torch.Tensor) -> torch.Tensor:
        """``a``, ``(B, C, 1, 1)``, in (0, 1)."""
        return torch.sigmoid(x.mean(dim=(2, 3), keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)  # (B, C, H, W)


class PyraFAN(Detect):
    """PyraFAN fusion + detection head over ``[X2, X3, X4]`` (a ``Detect`` subclass; see the module docstring).

    YAML: ``[[p2, p3, p4], 1, PyraFAN, [nc]]`` or ``[nc, r]``.

    Outputs are Detect's: in training ``{"boxes": (B, 4 reg_max, A), "scores": (B, nc, A), "feats":
    [X2_attn, F3, F4]}`` with ``A = sum_l H_l W_l``; in eval ``(decoded (B, 4 + nc, A), that dict)``;
    in export mode the decoded tensor alone.

    Parameters
    ----------
    nc : number of classes.
    r : channel reduction; the fused width is ``C / r`` with ``C = max(ch)``.
    reg_max : DFL bins per box side.
    end2end : must be False (no one-to-one head).
    ch : channels of X2, X3, X4.
    """

    def __init__(self, nc: int = 80, r: int = 4, reg_max: int = 16, end2end: bool = False, ch: Sequence[int] = ()):
        nn.Module.__init__(self)  # not Detect.__init__: it would build (and draw random numbers for) cv2/cv3
        ch = [int(c) for c in ch]
        if len(ch) != NUM_LEVELS:
            raise ValueError(f"PyraFAN takes exactly 3 levels (X2, X3, X4), got channels {ch}")
        if end2end:
            raise ValueError("PyraFAN has no one-to-one (end2end) head; set end2end: False")
        c = max(ch)
        if r < 1 or c % r:
            raise ValueError(f"r={r} must be >= 1 and divide C = max(ch) = {c}")
        self.nc, self.nl, self.reg_max = nc, NUM_LEVELS, reg_max
        self.no = nc + 4 * reg_max
        self.stride = torch.zeros(self.nl)  # set by DetectionModel: [4, 8, 16]
        self.r, self.c_head = r, c // r
        # Detect's one-to-many branches; None tells Detect/BaseModel code that reads them there are none
        self.cv2 = self.cv3 = None

        self.gate = ChannelGate()
        self.proj2 = nn.Identity() if ch[0] == self.c_head else Conv(ch[0], self.c_head, 1)
        self.fusion = nn.ModuleList(LevelFusion(ch, self.c_head, target) for target in (1, 2))  # F3, F4
        self.dw = nn.Conv2d(self.c_head, self.c_head, 3, 1, 1, groups=self.c_head, bias=False)  # shared
        self.dw_bn = nn.ModuleList(nn.BatchNorm2d(self.c_head) for _ in range(self.nl))  # per level
        self.dw_fused = None  # per-level DW with BN folded in, made by fuse()
        self.act = nn.SiLU()
        self.box = nn.ModuleList(nn.Conv2d(self.c_head, 4 * reg_max, 1) for _ in range(self.nl))
        self.cls = nn.ModuleList(nn.Conv2d(self.c_head, nc, 1) for _ in range(self.nl))
        self.dfl = DFL(reg_max) if reg_max > 1 else nn.Identity()

    def head_inputs(self, x: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[X2_attn, F3, F4]``, each ``(B, C/r, H_l, W_l)``, from ``[X2, X3, X4]``."""
        if len(x) != self.nl:
            raise ValueError(f"PyraFAN expects [X2, X3, X4], got {len(x)} feature maps")
        return [self.proj2(self.gate(x[0])), *(fusion(x) for fusion in self.fusion)]

    def shared_features(self, feat: torch.Tensor, level: int) -> torch.Tensor:
        """SiLU(BN_level(DW3x3_shared(feat))): the input of both task-specific 1x1 convs at ``level``."""
        if self.dw_fused is not None:
            return self.act(self.dw_fused[level](feat))
        return self.act(self.dw_bn[level](self.dw(feat)))

    def forward_head(self, x: list[torch.Tensor], box_head=None, cls_head=None) -> dict[str, torch.Tensor]:
        """Detect's raw prediction dict from the head inputs ``x`` (``box_head``/``cls_head`` are unused)."""
        bs = x[0].shape[0]
        boxes, scores = [], []
        for level, feat in enumerate(x):
            h = self.shared_features(feat, level)  # (B, C/r, H_l, W_l)
            boxes.append(self.box[level](h).view(bs, 4 * self.reg_max, -1))
            scores.append(self.cls[level](h).view(bs, self.nc, -1))
        return {"boxes": torch.cat(boxes, -1), "scores": torch.cat(scores, -1), "feats": list(x)}

    def forward(self, x: list[torch.Tensor]):
        preds = self.forward_head(self.head_inputs(x))
        if self.training:
            return preds
        y = self._inference(preds)  # (B, 4 + nc, A): xywh in pixels, class probabilities
        return y if self.export else (y, preds)

    def bias_init(self) -> None:
        """Ultralytics' Detect prior (needs the strides): box 2.0, class ``log(5 / nc / (640 / s)^2)``."""
        for box, cls, s in zip(self.box, self.cls, self.stride.tolist(), strict=True):
            box.bias.data[:] = 2.0
            cls.bias.data[: self.nc] = math.log(5 / self.nc / (640 / s) ** 2)

    def fuse(self) -> None:
        """Fold each level's BatchNorm into its own copy of the shared depthwise conv (inference only)."""
        super().fuse()
        if self.dw_fused is None:
            self.dw_fused = nn.ModuleList(fuse_conv_and_bn(copy.deepcopy(self.dw), bn) for bn in self.dw_bn)
            self.dw = self.dw_bn = None


class LearnedGate(nn.Module):
    """``X_attn = X * 2 sigmoid(W GAP(X) + b)`` per channel, ``W`` (C x C) and ``b`` zero-initialised: the gate
    starts as the identity (2 sigmoid(0) = 1) and learns which channels to damp or boost (up to 2x).

    Examples
    --------
    At init every channel passes unchanged; with ``b = log 3`` and ``W = 0``, every channel is scaled by 1.5.
    """

    def __init__(self, c: int):
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """``2 a``, ``(B, C, 1, 1)``, in (0, 2)."""
        return 2 * torch.sigmoid(self.fc(x.mean(dim=(2, 3), keepdim=True)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class ResidualFusion(LevelFusion):
    """``F_l = Z_l + sum_k W_k Z_k``: :class:`LevelFusion` plus its own level's aligned map, so the level being
    detected always reaches the head whatever the softmax learns (v1's weights collapse onto the deepest level)."""

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        z = self.aligned(xs)
        w = self.level_weights(z)
        return z[self.target] + sum(w[:, k : k + 1] * z_k for k, z_k in enumerate(z))


class PyraFANv2(Detect):
    """PyraFAN v2: v1's pyramid fusion in front of Ultralytics' own ``Detect`` branches (what the v1
    diagnostics asked for; ``benchmarks/results/pyrafan_diagnostics.md``).

    * Level 2: ``X2`` through a :class:`LearnedGate` (v1's parameter-free gate sat near a constant halving).
    * Levels 3 and 4: :class:`ResidualFusion`, the own level plus v1's softmax-weighted sum.
    * Width ``C / r`` with ``C = max(ch)``, default ``r = 2`` (v1: 4); a 1x1 Conv brings ``X2`` to it if needed.
    * Heads: ``Detect``'s ``cv2``/``cv3`` (two 3x3 convs per branch, DFL or not) built on the three fused maps,
      so everything Ultralytics does with a Detect head applies, YOLO26's one-to-one (end-to-end) branch
      included: ``[[p2, p3, p4], 1, PyraFANv2, [nc, r]]`` in a YAML with ``end2end: True`` gives an NMS-free head.

    Outputs are ``Detect``'s on the fused maps ``[X2_attn, F3, F4]``.
    """

    def __init__(self, nc: int = 80, r: int = 2, reg_max: int = 16, end2end: bool = False, ch: Sequence[int] = ()):
        ch = [int(c) for c in ch]
        if len(ch) != NUM_LEVELS:
            raise ValueError(f"PyraFANv2 takes exactly 3 levels (X2, X3, X4), got channels {ch}")
        c = max(ch)
        if r < 1 or c % r:
            raise ValueError(f"r={r} must be >= 1 and divide C = max(ch) = {c}")
        super().__init__(nc, reg_max, end2end, ch=[c // r] * NUM_LEVELS)
        self.r, self.c_head = r, c // r
        self.gate = LearnedGate(ch[0])
        self.proj2 = nn.Identity() if ch[0] == self.c_head else Conv(ch[0], self.c_head, 1)
        self.fusion = nn.ModuleList(ResidualFusion(ch, self.c_head, target) for target in (1, 2))  # F3, F4

    def head_inputs(self, x: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[X2_attn, F3, F4]``, each ``(B, C/r, H_l, W_l)``, from ``[X2, X3, X4]``."""
        if len(x) != self.nl:
            raise ValueError(f"PyraFANv2 expects [X2, X3, X4], got {len(x)} feature maps")
        return [self.proj2(self.gate(x[0])), *(fusion(x) for fusion in self.fusion)]

    def forward(self, x: list[torch.Tensor]):
        return super().forward(self.head_inputs(x))


# --------------------------------------------------------------------------- Ultralytics registration

HEADS: dict[str, type[Detect]] = {"PyraFAN": PyraFAN, "PyraFANv2": PyraFANv2}


def parse_model(d: dict, ch: int, verbose: bool = True):
    """Ultralytics' ``parse_model`` that also builds the heads in :data:`HEADS` (in force inside :func:`registered`).

    A row ``[from, 1, PyraFAN, [nc, *extra]]`` is parsed by the stock function as
    ``[from, 1, Detect, [nc]]`` (which resolves ``nc``, ``reg_max``, ``end2end`` and the
    channels of ``from``), then that stand-in is replaced by ``PyraFAN(nc, *extra,
    reg_max=..., end2end=..., ch=...)`` with the same index, inputs and save list.
    A YAML without such rows goes to Ultralytics untouched.
    """
    nb = len(d["backbone"])
    ours = {i: row for i, row in enumerate(d["backbone"] + d["head"]) if row[2] in HEADS}
    if not ours:
        return _ULTRALYTICS_PARSE_MODEL(d, ch, verbose)
    d = copy.deepcopy(d)
    for i, (_, _, _, args) in ours.items():
        row = d["backbone"][i] if i < nb else d["head"][i - nb]
        row[2], row[3] = "Detect", list(args[:1])
    layers, save = _ULTRALYTICS_PARSE_MODEL(d, ch, verbose)
    for i, (_, _, name, args) in ours.items():
        stand_in = layers[i]
        ch_in = [branch[0].conv.in_channels for branch in stand_in.cv2]
        head = HEADS[name](stand_in.nc, *args[1:], reg_max=stand_in.reg_max, end2end=bool(d.get("end2end")),
                           ch=ch_in)
        head.i, head.f, head.type = stand_in.i, stand_in.f, f"{__name__}.{name}"
        head.np = sum(p.numel() for p in head.parameters())
        layers[i] = head
    return layers, save


_ULTRALYTICS_PARSE_MODEL = _tasks.parse_model
_LOCK = threading.RLock()


@contextmanager
def registered() -> Iterator[None]:
    """Within the block, Ultralytics' model builder knows the heads in :data:`HEADS` (one thread at a time)."""
    with _LOCK:
        _tasks.parse_model = parse_model
        try:
            yield
        finally:
            _tasks.parse_model = _ULTRALYTICS_PARSE_MODEL
