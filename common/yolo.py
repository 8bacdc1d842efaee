"""The YOLO adapter: with :mod:`common.pyrafan`, the only code that touches Ultralytics.

Importing it changes nothing and does not import Ultralytics: every function that
needs Ultralytics calls :func:`common.ultralytics_env.setup` (offline, isolated
settings, a local font) and imports it then.

Models are built from YAML (never a named ``.pt``, which Ultralytics would
download); PyraFAN heads are registered while a model is built. Weights are
stored as state dicts, not pickled objects (:func:`save_weights`); a pruned
model (``python -m common.prune``) loads wherever a model loads, its layer widths
rebuilt from the stored shapes (:func:`load_weights`). A checkpoint a user
brings (an Ultralytics ``.pt``, a cedar file or a plain state dict) loads into a
model of another class count with :func:`load_checkpoint`. Training is a lean
loop over Ultralytics' dataset, augmentation and loss (so a KD term can be
added, see ``extra_loss`` in :func:`train`); evaluation uses Ultralytics'
``DetectionValidator`` on a copy of the model.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import nn

from common.kd import split_head_outputs, total_loss
from common.ultralytics_env import CEDAR_HOME, setup  # noqa: F401  (CEDAR_HOME: callers find it here)

if TYPE_CHECKING:
    from ultralytics.nn.tasks import DetectionModel

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parent.parent / "conf" / "models"
BUILTIN_ARCHS = (*(f"yolo{v}{s}" for v in ("11", "26") for s in "nsmlx"), *(f"yolo26{s}-p2" for s in "nsmlx"))


class ModelError(ValueError):
    """A model name, file or weight set is unusable; the message names it."""


# --------------------------------------------------------------------------- building


def resolve_model_cfg(arch: str) -> str:
    """``yolo11n``, ``yolo26n-p2`` -> Ultralytics' built-in YAML; ``yolo11n-pyrafan`` -> ``conf/models/``; or a YAML path."""
    local = MODELS_DIR / f"{arch}.yaml"
    if local.is_file():
        return str(local)
    if arch in BUILTIN_ARCHS:
        return f"{arch}.yaml"
    if arch.endswith((".yaml", ".yml")) and Path(arch).is_file():
        return arch
    known = sorted({*BUILTIN_ARCHS, *(p.stem for p in MODELS_DIR.glob("*.yaml"))})
    raise ModelError(f"unknown model '{arch}' (known: {', '.join(known)}, or a path to a model YAML)")


def build_model(arch: str, nc: int, seed: int = 0, names: list[str] | None = None) -> DetectionModel:
    """A freshly initialised detector (deterministic for a given ``seed``); PyraFAN heads are registered here."""
    if nc <= 0:
        raise ModelError(f"nc={nc}: a detector needs at least one class")
    cfg = resolve_model_cfg(arch)
    setup()
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    from common.pyrafan import registered

    torch.manual_seed(seed)
    with registered():
        model = DetectionModel(cfg, nc=nc, verbose=False)
    model.names = {i: n for i, n in enumerate(names)} if names else {i: str(i) for i in range(nc)}
    model.args = get_cfg()
    model.task = "detect"
    model.cedar_arch = arch
    return model


def is_end2end(model: nn.Module) -> bool:
    """Whether the head has a one-to-one (NMS-free) branch, as YOLO26's has.

    cedar runs such a model through that branch everywhere it infers (evaluation,
    prediction, ONNX export, the edge runtime): each object gets one box, no NMS
    follows. Its one-to-many branch is what trains the backbone and what
    distillation works on (:func:`head_levels`).
    """
    head = model.model[-1] if hasattr(model, "model") else model
    return getattr(head, "one2one_cv2", None) is not None


def num_classes(model: nn.Module) -> int:
    return int(model.model[-1].nc)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gflops(model: nn.Module, imgsz: int) -> float:
    """GFLOPs of one ``imgsz`` x ``imgsz`` image, as Ultralytics' model summary counts them (THOP, unfused)."""
    setup()
    from ultralytics.utils.torch_utils import get_flops

    return float(get_flops(model, imgsz))


def layer_types() -> SimpleNamespace:
    """The Ultralytics layer classes :mod:`common.prune` walks (``Bottleneck``, ``C2f``, ``Detect``, ...)."""
    setup()
    from ultralytics.nn.modules import C2PSA, C3, SPPF, Bottleneck, C2f, Concat, Conv, Detect, DWConv
    from ultralytics.nn.modules.block import PSABlock

    return SimpleNamespace(Bottleneck=Bottleneck, C2f=C2f, C2PSA=C2PSA, C3=C3, SPPF=SPPF, PSABlock=PSABlock,
                           Concat=Concat, Conv=Conv, DWConv=DWConv, Detect=Detect)


def sync_widths(model: nn.Module) -> nn.Module:
    """Refresh the attributes Ultralytics derives from layer widths after convs were resized (pruning)."""
    setup()
    from ultralytics.nn.modules import C2f

    for m in model.modules():
        if isinstance(m, C2f):
            m.c = m.cv1.conv.out_channels // 2  # forward_split cuts cv1's output at c
    for layer in getattr(model, "model", []):
        layer.np = sum(p.numel() for p in layer.parameters())
    return model


def head_levels(model: nn.Module, preds) -> dict[int, dict[str, torch.Tensor]]:
    """Per-level raw head outputs ``{stride: {"cls": (B, nc, H, W), "dfl": (B, 4 reg_max, H, W)}}`` for ``common.kd``.

    Works for any Detect-style head: a stock YOLO11 (strides 8, 16, 32), PyraFAN (4, 8, 16) and
    YOLO26 (8, 16, 32; P2: 4 to 32), whose head has no DFL: ``"ltrb": (B, 4, H, W)`` side distances
    in grid cells instead of ``"dfl"``. An end-to-end head gives its one-to-many branch: the
    branch that trains the backbone (the one-to-one branch sees detached features).

    Parameters
    ----------
    model : a ``DetectionModel`` (or its Detect head).
    preds : what the model returned: the training dict ``{"boxes", "scores", "feats"}``, the eval
        tuple ``(decoded, dict)`` or an end-to-end ``{"one2many": dict, ...}``.

    Examples
    --------
    YOLO11n, nc = 8, a 320 px image: ``{8: cls (1, 8, 40, 40), dfl (1, 64, 40, 40), 16: ..., 32: ...}``.
    """
    head = model.model[-1] if hasattr(model, "model") else model
    if isinstance(preds, (tuple, list)):
        preds = preds[1]
    if not isinstance(preds, Mapping):
        raise ValueError(f"expected the head's raw prediction dict, got {type(preds).__name__} (export mode?)")
    if "one2many" in preds:
        preds = preds["one2many"]
    boxes, scores, feats = preds["boxes"], preds["scores"], preds["feats"]  # (B, 4R, A), (B, nc, A), maps
    sizes = [tuple(f.shape[-2:]) for f in feats]
    counts = [h * w for h, w in sizes]
    if sum(counts) != boxes.shape[-1]:
        raise ValueError(f"{boxes.shape[-1]} anchors do not match the level sizes {sizes}")
    outputs = [
        torch.cat([b, s], 1).view(boxes.shape[0], -1, h, w)  # (B, 4R + nc, H, W): box channels first
        for b, s, (h, w) in zip(boxes.split(counts, -1), scores.split(counts, -1), sizes, strict=True)
    ]
    return split_head_outputs(outputs, [int(s) for s in head.stride.tolist()], int(head.reg_max))


# --------------------------------------------------------------------------- weights


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters *and* buffers (BatchNorm running stats), detached CPU copies."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def load_state_dict(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """Load ``weights`` strictly; a missing, extra or mis-shaped tensor raises :class:`ModelError`."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    extra = sorted(set(weights) - set(own))
    bad = sorted(k for k in set(own) & set(weights) if tuple(own[k].shape) != tuple(weights[k].shape))
    if missing or extra or bad:
        raise ModelError(
            f"weights do not fit the model: missing {missing[:3]}, unexpected {extra[:3]}, "
            f"wrong shape {[(k, tuple(weights[k].shape), tuple(own[k].shape)) for k in bad[:3]]}"
        )
    model.load_state_dict(weights, strict=True)
    return model


def save_weights(model: nn.Module, path: str | Path, **meta) -> Path:
    """Save ``{"arch", "nc", "names", "meta", "state_dict"}`` (tensors and plain data only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"arch": getattr(model, "cedar_arch", None), "nc": num_classes(model),
            "names": dict(model.names), "meta": meta, "state_dict": state_dict(model)}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)  # never a half-written file under the real name
    return path


def _read_cedar_file(path: Path) -> dict:
    """The dict :func:`save_weights` wrote (``weights_only``: no pickled code runs)."""
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or foreign file
        raise ModelError(f"cannot read weights file {path}: {err}") from None
    if not isinstance(blob, dict) or "state_dict" not in blob:
        raise ModelError(f"{path} is not a cedar weights file (no 'state_dict')")
    return blob


def load_weights(path: str | Path, model: nn.Module | None = None, arch: str | None = None) -> nn.Module:
    """Load a file written by :func:`save_weights` (or ``python -m common.prune``) into a model.

    Without ``model``, the architecture the file names (or ``arch``) is built, and
    since a pruned file stores narrower convs than the architecture's YAML, every
    ``Conv2d`` and ``BatchNorm2d`` is resized to the stored shape
    (:func:`_fit_widths`). Then the state dict is loaded strictly: into a given
    ``model``, a tensor of another shape raises :class:`ModelError` naming it. The
    file's ``meta`` is set as ``model.cedar_meta``.
    """
    path = Path(path)
    blob = _read_cedar_file(path)
    if model is None:
        arch = arch or blob.get("arch")
        if not arch:
            raise ModelError(f"{path} does not name its architecture; pass arch=")
        names = [blob["names"][k] for k in sorted(blob["names"])] if blob.get("names") else None
        model = build_model(arch, int(blob["nc"]), names=names)
        _fit_widths(model, blob["state_dict"], path)
    model.cedar_meta = dict(blob.get("meta") or {})  # what the file was saved with (e.g. pruned_channels)
    return load_state_dict(model, blob["state_dict"])


def _fit_widths(model: nn.Module, weights: Mapping[str, torch.Tensor], source: Path) -> int:
    """Resize the convs and BatchNorms of ``model`` to the channel counts in ``weights``; returns how many.

    Only channel counts change: a kernel size, a depthwise conv that would stop being
    depthwise, or a stored set of layers that does not run as a network (checked by a
    forward pass) raise :class:`ModelError`. The values are overwritten by the load
    that follows, so the resized tensors start at zero.
    """
    resized = 0
    for name, m in model.named_modules():
        w = weights.get(f"{name}.weight")
        if not isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) or w is None or w.shape == m.weight.shape:
            continue
        if isinstance(m, nn.BatchNorm2d):
            n = int(w.shape[0])
            m.num_features = n
            m.weight, m.bias = nn.Parameter(torch.zeros(n)), nn.Parameter(torch.zeros(n))
            m.running_mean, m.running_var = torch.zeros(n), torch.ones(n)
        else:
            if w.ndim != 4 or tuple(w.shape[2:]) != tuple(m.kernel_size):
                raise ModelError(f"{source}: {name}.weight has shape {tuple(w.shape)}, the model's conv "
                                 f"{tuple(m.weight.shape)}; only channel counts can differ (pruning)")
            out, in_per_group = int(w.shape[0]), int(w.shape[1])
            if m.groups > 1:  # depthwise: one input channel per group, groups == channels
                if in_per_group != 1:
                    raise ModelError(f"{source}: {name} is depthwise in the model, not in the file "
                                     f"({tuple(w.shape)})")
                m.in_channels = m.out_channels = m.groups = out
            else:
                m.in_channels, m.out_channels = in_per_group, out
            m.weight = nn.Parameter(torch.zeros(tuple(w.shape)))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.zeros(out))
        resized += 1
    if resized:
        sync_widths(model)
        training = model.training
        try:
            with torch.no_grad():
                model.eval()(torch.zeros(1, 3, 64, 64))
        except RuntimeError as err:
            raise ModelError(f"{source}: the stored layer widths do not form a working "
                             f"'{getattr(model, 'cedar_arch', '?')}' network ({str(err).splitlines()[0]})") from None
        finally:
            model.train(training)
        log.info("%s: %d layers narrower than the architecture's YAML (a pruned model)", source, resized)
    return resized


def _class_branch(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the head's class-score branch (Detect's ``cv3``/``one2one_cv3``, PyraFAN's ``cls``)."""
    head = model.model[-1]
    path = f"model.{len(model.model) - 1}"
    return tuple(f"{path}.{name}." for name in ("cv3", "one2one_cv3", "cls")
                 if isinstance(getattr(head, name, None), nn.Module))


def _checkpoint_tensors(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a cedar file, a plain state dict or an Ultralytics ``.pt``, and what the file was."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a pickled model (Ultralytics): not readable without running its pickled classes
        blob = None
    if isinstance(blob, dict) and isinstance(blob.get("state_dict"), Mapping):
        return dict(blob["state_dict"]), "cedar weights"
    if isinstance(blob, dict) and blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
        return blob, "state dict"
    if path.suffix != ".pt":
        raise ModelError(f"{path}: not a cedar weights file or state dict, and an Ultralytics checkpoint "
                         "ends in .pt")
    from ultralytics.nn.tasks import torch_safe_load

    try:
        ckpt, _ = torch_safe_load(str(path))  # unpickles the model: load only checkpoints you trust
    except Exception as err:
        raise ModelError(f"cannot read checkpoint {path}: {err}") from None
    source = ckpt.get("ema") or ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(source, nn.Module):
        raise ModelError(f"{path}: no model under 'ema' or 'model' (not an Ultralytics checkpoint)")
    return {k: v.detach() for k, v in source.state_dict().items()}, "Ultralytics checkpoint"


def load_checkpoint(model: nn.Module, path: str | Path) -> int:
    """Load what fits of a user's checkpoint into ``model`` (in place); returns the number of tensors loaded.

    ``path``: an Ultralytics checkpoint (a ``.pt`` as Ultralytics saves it: a dict
    with the pickled model under ``ema`` or ``model``, e.g. a downloaded COCO
    ``yolo11n.pt``; unpickling runs code, so load only files you trust), a cedar
    weights file (:func:`save_weights`) or a plain state dict saved with ``torch.save``.

    A tensor is loaded when the file has it under the same name and shape. The
    class branch (the head's class-score convs) is loaded only if all of it fits,
    i.e. the class counts agree; otherwise none of it is, and it keeps ``model``'s
    own values (for a model from :func:`build_model`, its initialisation). The
    backbone must load completely: a file of another architecture (or a pruned one,
    which :func:`load_weights` reads) raises :class:`ModelError` naming a tensor that
    does not fit. One log line says how many tensors were kept of how many.

    Examples
    --------
    A COCO YOLO11n (80 classes) into ``build_model("yolo11n", nc=8)``: everything but
    the class branch loads (``model.23.cv3.*``, whose widths depend on the class count).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    setup()
    theirs, kind = _checkpoint_tensors(path)
    own = model.state_dict()
    fits = {k for k, v in own.items() if k in theirs and tuple(theirs[k].shape) == tuple(v.shape)}
    branch = _class_branch(model)
    class_keys = {k for k in own if k.startswith(branch)}
    class_fits = class_keys <= fits
    if not class_fits:
        fits -= class_keys
    backbone = tuple(f"model.{i}." for i in range(len(model.yaml["backbone"])))
    misfit = sorted(k for k in own if k.startswith(backbone) and k not in fits)
    if misfit:
        k = misfit[0]
        found = tuple(theirs[k].shape) if k in theirs else "nothing"
        raise ModelError(f"{path} ({kind}) does not fit model '{getattr(model, 'cedar_arch', '?')}': "
                         f"{len(misfit)} backbone tensors differ, e.g. {k}: {found} in the file, "
                         f"{tuple(own[k].shape)} in the model")
    model.load_state_dict({k: theirs[k] for k in fits}, strict=False)
    log.info("%s (%s): kept %d of the model's %d tensors (the file has %d)%s", path, kind, len(fits), len(own),
             len(theirs), "" if class_fits else f"; class branch re-initialised for {num_classes(model)} classes")
    return len(fits)


def to_arrayrecord(model: nn.Module):
    """Flower ``ArrayRecord`` of the full state dict (parameters and buffers)."""
    from flwr.app import ArrayRecord

    return ArrayRecord(state_dict(model))


def from_arrayrecord(model: nn.Module, record) -> nn.Module:
    """Load an ``ArrayRecord`` made by :func:`to_arrayrecord` into ``model``."""
    return load_state_dict(model, record.to_torch_state_dict())


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    epochs: int
    iterations: int
    seconds: float
    loss: float  # mean total loss of the last epoch
    loss_items: dict[str, float] = field(default_factory=dict)  # box/cls/dfl of the last epoch
    images: int = 0  # training images (dataset size)
    extra_loss: float = 0.0  # mean of ``extra_loss`` over the last epoch (e.g. KD)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    norm_types = tuple(v for k, v in nn.__dict__.items() if "Norm" in k and isinstance(v, type))
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:  # Ultralytics' fixed DFL projection, a frozen teacher
                continue
            (no_decay if name == "bias" or isinstance(module, norm_types) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ``augment(image, boxes_xyxy) -> (image, keep)``: BGR uint8 image and its boxes in pixels; ``keep`` is
# None or a bool per box (False drops that label); it must not modify ``image`` in place (a cached copy)
Augment = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, "np.ndarray | None"]]


def _augment_dataset(dataset, augment: Augment) -> None:
    """Run ``augment`` on every image ``dataset`` loads (mosaic tiles included), before Ultralytics' transforms.

    Wrapping ``get_image_and_label`` (which Mosaic also calls for its extra
    tiles) corrupts the whole source image with its labels in pixels, so
    fog, blur or occluders act on the scene, not on letterbox padding, and a
    hidden object's label can be dropped before geometry and HSV augmentation.
    """
    load = dataset.get_image_and_label

    def get_image_and_label(index: int) -> dict:
        label = load(index)
        boxes = deepcopy(label["instances"])
        boxes.convert_bbox("xyxy")
        if boxes.normalized:
            boxes.denormalize(label["img"].shape[1], label["img"].shape[0])
        label["img"], keep = augment(label["img"], boxes.bboxes)
        if keep is not None and not np.all(keep):
            keep = np.asarray(keep, bool)
            label["instances"], label["cls"] = label["instances"][keep], label["cls"][keep]
        return label

    dataset.get_image_and_label = get_image_and_label


def split_images(data_yaml: str | Path, split: str) -> list[Path]:
    """The image files of a split of a YOLO ``data.yaml`` (a folder, searched recursively, or a list file), sorted."""
    setup()
    from ultralytics.data.utils import IMG_FORMATS, check_det_dataset

    source = check_det_dataset(str(data_yaml)).get(split)
    if not source:
        raise ModelError(f"{data_yaml}: no '{split}' split")
    files: list[Path] = []
    for s in source if isinstance(source, list) else [source]:
        s = Path(s)
        if s.is_dir():
            files += sorted(p for p in s.rglob("*") if p.suffix[1:].lower() in IMG_FORMATS)
        elif s.is_file():
            files += [Path(line.strip()) for line in s.read_text().splitlines() if line.strip()]
    if not files:
        raise ModelError(f"{data_yaml}: the '{split}' split has no images")
    return files


def letterbox(image: np.ndarray, imgsz: int) -> np.ndarray:
    """``image`` resized to fit ``imgsz`` x ``imgsz`` (aspect kept) and padded, as Ultralytics' validation does."""
    setup()
    from ultralytics.data.augment import LetterBox

    return LetterBox((imgsz, imgsz), auto=False)(image=image)


def make_train_loader(data_yaml: str | Path, *, imgsz: int, batch: int, stride: int = 32,
                      mosaic: float = 1.0, workers: int = 0, seed: int = 0, split: str = "train",
                      augment: Augment | None = None):
    """Ultralytics' augmenting dataloader over a dataset split (``augment``: see :func:`_augment_dataset`)."""
    setup()
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_dataloader, build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    hyp = get_cfg(overrides=dict(imgsz=imgsz, batch=batch, mosaic=mosaic, workers=workers, seed=seed,
                                 scale=0.3, translate=0.1, fliplr=0.5, plots=False))
    data = check_det_dataset(str(data_yaml))
    if not data.get(split):
        raise ModelError(f"{data_yaml}: no '{split}' split")
    dataset = build_yolo_dataset(hyp, data[split], batch, data, mode="train", rect=False, stride=stride)
    if augment is not None:
        _augment_dataset(dataset, augment)
    loader = build_dataloader(dataset, batch, workers, shuffle=True, rank=-1, pin_memory=False, device="cpu")
    return loader, hyp


def train(
    model: DetectionModel,
    data_yaml: str | Path,
    *,
    epochs: int,
    imgsz: int,
    batch: int,
    lr0: float = 0.01,
    weight_decay: float = 5e-4,
    warmup_iters: int = 20,
    mosaic: float = 1.0,
    workers: int = 0,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    desc: str = "train",
    extra_loss: Callable[[torch.Tensor, dict, dict], torch.Tensor] | None = None,
    alpha: float = 0.5,
    augment: Augment | None = None,
    feature_teacher: DetectionModel | None = None,
) -> TrainResult:
    """Train ``model`` in place on the ``train`` split of ``data_yaml``.

    AdamW (no decay on biases and norms), linear warm-up over ``warmup_iters``
    then cosine decay to ``0.1 * lr0``, gradient norm clipped at 10, mosaic
    switched off in the last epoch. ``extra_loss(images, preds, batch)``, if
    given (e.g. :class:`common.distill.TeacherEnsemble`), is mixed in as
    ``alpha * detection + (1 - alpha) * extra`` (:func:`common.kd.total_loss`;
    the detection loss is Ultralytics' per-batch sum, so ``extra`` is scaled
    by the batch size to match). ``augment`` (e.g. :class:`common.adverse.AdverseAugment`) sees every
    loaded training image before Ultralytics' own augmentation (:func:`_augment_dataset`).
    ``feature_teacher``: Ultralytics' own knowledge distillation (the trainer's ``distill_model``,
    :class:`ultralytics.nn.distill_model.DistillationModel`) from this frozen model: the library's loss, the
    detection loss plus ``dis`` (6.0) times a teacher-score-weighted L2 between the student's projected neck
    features and the teacher's; its projectors train with the student and are dropped afterwards.

    ``progress``: a tqdm bar per epoch when stderr is a terminal; otherwise (a log
    file, Ray's log stream in a ClientApp) one DEBUG line per epoch instead, with
    ``desc``, the loss and the time: at INFO the console keeps one line per site
    per round, the caller's.
    """
    if epochs <= 0:
        return TrainResult(0, 0, 0.0, 0.0)
    setup()
    from tqdm.auto import tqdm
    from ultralytics.utils.torch_utils import init_seeds

    bar_on = progress and getattr(sys.stderr, "isatty", lambda: False)()
    init_seeds(seed)
    t0 = time.perf_counter()
    dev = torch.device("cpu" if device == "cpu" else f"cuda:{device}" if str(device).isdigit() else device)
    model.to(dev).train()
    stride = max(int(model.stride.max()), 32)
    loader, hyp = make_train_loader(data_yaml, imgsz=imgsz, batch=batch, stride=stride,
                                    mosaic=mosaic, workers=workers, seed=seed, augment=augment)
    hyp.epochs = epochs  # YOLO26's E2ELoss moves weight from its one-to-many to its one-to-one branch over these
    model.args = hyp
    criterion = model.init_criterion()
    trained = model
    if feature_teacher is not None:
        from ultralytics.nn.distill_model import DistillationModel

        model.criterion = criterion  # the one the library's loss uses (E2ELoss updates below)
        trained = DistillationModel(teacher_model=feature_teacher.to(dev), student_model=model)
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(_param_groups(trained, weight_decay), lr=lr0, betas=(0.937, 0.999))
    total = epochs * len(loader)
    warm = min(warmup_iters, max(1, total // 4))

    def lr_at(it: int) -> float:
        if it < warm:
            return lr0 * (it + 1) / warm
        t = (it - warm) / max(1, total - warm)
        return lr0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    it, last = 0, {}
    for epoch in range(epochs):
        if epoch == epochs - 1 and epochs > 1 and mosaic > 0:
            loader.dataset.close_mosaic(hyp)
            loader.reset()
        sums, n_batches, extra_sum, t_epoch = None, 0, 0.0, time.perf_counter()
        bar = tqdm(loader, desc=f"{desc} epoch {epoch + 1}/{epochs}", disable=not bar_on, leave=False)
        for batch_data in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(it)
            imgs = batch_data["img"].to(dev, non_blocking=True).float() / 255.0
            if trained is model:
                preds = model(imgs)
                loss_vec, items = criterion(preds, batch_data)
            else:  # the library's distillation: its own forward passes, detection + feature loss
                loss_vec, items = trained.loss({**batch_data, "img": imgs})
            loss = loss_vec.sum()
            if extra_loss is not None:
                extra = extra_loss(imgs, preds, batch_data)
                loss = total_loss(loss, extra * imgs.shape[0], alpha)
                extra_sum += float(extra.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_norm=10.0)
            optimizer.step()
            vec = torch.as_tensor([float(v) for v in (items.values() if isinstance(items, dict) else items)])
            sums = vec if sums is None else sums + vec
            n_batches += 1
            it += 1
            bar.set_postfix(loss=f"{float(loss.detach()) / imgs.shape[0]:.3f}")
        if hasattr(criterion, "update"):  # E2ELoss, once per epoch as in Ultralytics' trainer
            criterion.update()
        names = list(items.keys()) if isinstance(items, dict) else ["box", "cls", "dfl"]
        last = {str(k): float(v) / n_batches for k, v in zip(names, sums)}
        last_extra = extra_sum / n_batches
        if progress and not bar_on:
            log.debug("%s epoch %d/%d: loss %.3f (%s)%s, %d batches, %.1f s", desc, epoch + 1, epochs,
                     sum(last.values()), ", ".join(f"{k.removesuffix('_loss')} {v:.3f}" for k, v in last.items()),
                     f", extra {last_extra:.3f}" if extra_loss is not None else "", n_batches,
                     time.perf_counter() - t_epoch)
    if mosaic > 0 and epochs > 1:  # leave the (shared) loader state alone for the next call
        loader.dataset.mosaic = False
    if trained is not model:
        trained._remove_feature_hooks()
        del model.criterion
    model.eval()
    return TrainResult(epochs, it, time.perf_counter() - t0, float(sum(last.values())), last,
                       len(loader.dataset), last_extra)


# --------------------------------------------------------------------------- evaluation


@dataclass
class EvalResult:
    """Detection metrics of one model on one dataset split.

    ``ap50`` has one entry per model class; a class with no labelled instance
    in the split is NaN (absent), not 0.
    """

    map50: float
    map50_95: float
    precision: float
    recall: float
    ap50: list[float]
    images: int
    instances: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(
    model: DetectionModel,
    data_yaml: str | Path,
    *,
    split: str = "test",
    imgsz: int = 320,
    batch: int = 16,
    conf: float = 0.001,
    iou: float = 0.7,
    device: str = "cpu",
) -> EvalResult:
    """mAP50, mAP50-95, precision, recall and per-class AP50 on a split."""
    setup()
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.models.yolo.detect import DetectionValidator

    t0 = time.perf_counter()
    data = check_det_dataset(str(data_yaml))
    if not data.get(split):
        raise ModelError(f"{data_yaml}: no '{split}' split")
    with tempfile.TemporaryDirectory(prefix="cedar-val-") as tmp:
        args = dict(data=str(data_yaml), split=split, imgsz=imgsz, batch=batch, conf=conf, iou=iou,
                    plots=False, save_json=False, verbose=False, device=device, half=False, workers=0,
                    task="detect", mode="val", nms=False if is_end2end(model) else None)
        validator = DetectionValidator(save_dir=Path(tmp), args=args)
        copy = deepcopy(model).float().eval()  # AutoBackend fuses Conv+BN in place
        validator(model=copy)
    m = validator.metrics
    nc = num_classes(model)
    ap50 = [float("nan")] * nc
    for i, c in enumerate(m.ap_class_index):
        ap50[int(c)] = float(m.box.ap50[i])
    nt = getattr(m, "nt_per_class", None)
    return EvalResult(
        map50=float(m.box.map50), map50_95=float(m.box.map), precision=float(m.box.mp),
        recall=float(m.box.mr), ap50=ap50, images=int(validator.seen),
        instances=int(nt.sum()) if nt is not None else -1, seconds=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------- inference and export


def _as_yolo(model: DetectionModel):
    """Wrap a model in Ultralytics' ``YOLO`` front end (predict/export) without loading any file."""
    setup()
    from ultralytics import YOLO

    yolo = YOLO("yolo11n.yaml", task="detect")  # a stock stand-in, replaced by ``model`` at once
    yolo.model = model
    return yolo


class Predictor:
    """Ultralytics' predict front end, built once for a snapshot of ``model``.

    The weights are copied when the predictor is made (inference fuses Conv+BN
    in place), so later training of ``model`` does not change it: make a new
    predictor for new weights. Building one costs ~150 ms on 2 CPU cores;
    reusing it is what a service should do.
    """

    def __init__(self, model: DetectionModel, *, imgsz: int = 320, conf: float = 0.25, iou: float = 0.7,
                 device: str = "cpu"):
        self.yolo = _as_yolo(deepcopy(model).eval())
        self.kwargs = dict(imgsz=imgsz, conf=conf, iou=iou, device=device, verbose=False, save=False,
                           nms=False if is_end2end(model) else None)

    def __call__(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Detections per BGR image: ``{"xyxy": (N,4), "conf": (N,), "cls": (N,)}`` in image pixels."""
        return [
            {"xyxy": r.boxes.xyxy.cpu().numpy().astype(np.float32),
             "conf": r.boxes.conf.cpu().numpy().astype(np.float32),
             "cls": r.boxes.cls.cpu().numpy().astype(np.int64)}
            for r in self.yolo.predict(images, **self.kwargs)
        ]


def predict(model: DetectionModel, images: list[np.ndarray], *, imgsz: int = 320, conf: float = 0.25,
            iou: float = 0.7, device: str = "cpu") -> list[dict[str, np.ndarray]]:
    """One-off :class:`Predictor` call (builds the front end each time)."""
    return Predictor(model, imgsz=imgsz, conf=conf, iou=iou, device=device)(images)


def export_onnx(model: DetectionModel, path: str | Path, *, imgsz: int = 320, dynamic: bool = False) -> Path:
    """Export to ONNX at ``path``.

    The output is the raw head, ``(1, 4 + nc, A)`` (NMS done by the caller), or for an
    end-to-end model (:func:`is_end2end`) its one-to-one branch's decided boxes ``(1, 300, 6)``
    (``x1, y1, x2, y2, score, class``), with ``end2end: True`` in the file's metadata.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    copy = deepcopy(model).cpu().eval()
    copy.args = dict(copy.args if isinstance(copy.args, dict) else vars(copy.args))  # exporter indexes it
    copy.task = "detect"
    with tempfile.TemporaryDirectory(prefix="cedar-export-") as tmp:
        copy.pt_path = str(Path(tmp) / "model.pt")
        out = _as_yolo(copy).export(format="onnx", imgsz=imgsz, dynamic=dynamic, simplify=False,
                                    device="cpu", verbose=False, nms=False if is_end2end(model) else None)
        shutil.move(out, path)
    return path
