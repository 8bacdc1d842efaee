"""The YOLO adapter: the only module that touches Ultralytics.

Importing it first makes Ultralytics offline (before Ultralytics itself is
imported, because it reads its environment at import time):

- ``YOLO_OFFLINE=1`` (no connectivity checks), ``YOLO_AUTOINSTALL=false`` (no
  pip installs of "missing" packages), ``YOLO_VERBOSE=false``;
- an isolated config dir (``$CEDAR_HOME/ultralytics``, default
  ``~/.cache/cedar/ultralytics``) whose settings have ``sync`` and every
  integration (W&B, hub, ...) off;
- a local TTF (matplotlib's DejaVu Sans, shipped with matplotlib) copied there
  as ``Arial.ttf`` so plotting never downloads a font.

Models are built from YAML (never a named ``.pt``, which Ultralytics would
download) and stored as state dicts, not pickled objects. Training is a lean
loop over Ultralytics' dataset, augmentation and loss (so a KD term can be
added, see ``extra_loss`` in :func:`train`); evaluation uses Ultralytics'
``DetectionValidator`` on a copy of the model.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

CEDAR_HOME = Path(os.environ.get("CEDAR_HOME", "~/.cache/cedar")).expanduser()
ULTRALYTICS_DIR = CEDAR_HOME / "ultralytics"


def _offline_environment() -> None:
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "false"
    os.environ.setdefault("YOLO_VERBOSE", "false")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(ULTRALYTICS_DIR))
    user_dir = Path(os.environ["YOLO_CONFIG_DIR"]).expanduser() / "Ultralytics"
    user_dir.mkdir(parents=True, exist_ok=True)
    font = user_dir / "Arial.ttf"
    if not font.exists():
        import matplotlib

        src = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        shutil.copyfile(src, font)


_offline_environment()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from ultralytics.utils import LOGGER, SETTINGS  # noqa: E402

_OFF = ("sync", "wandb", "mlflow", "comet", "clearml", "dvc", "neptune", "raytune", "tensorboard",
        "vscode_msg", "openvino_msg")
SETTINGS.update({k: False for k in _OFF if k in SETTINGS})
SETTINGS.update({"runs_dir": str(ULTRALYTICS_DIR / "runs"), "weights_dir": str(ULTRALYTICS_DIR / "weights"),
                 "datasets_dir": str(ULTRALYTICS_DIR / "datasets")})
LOGGER.setLevel(logging.WARNING)

from common.kd import total_loss  # noqa: E402
from ultralytics.cfg import get_cfg  # noqa: E402
from ultralytics.data import build_dataloader, build_yolo_dataset  # noqa: E402
from ultralytics.data.utils import check_det_dataset  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402
from ultralytics.utils.torch_utils import init_seeds  # noqa: E402

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parent.parent / "conf" / "models"
BUILTIN_ARCHS = tuple(f"yolo11{s}" for s in "nsmlx")


class ModelError(ValueError):
    """A model name, file or weight set is unusable; the message names it."""


# --------------------------------------------------------------------------- building


def resolve_model_cfg(arch: str) -> str:
    """``yolo11n`` -> Ultralytics' built-in YAML; ``yolo11n-pyrafan`` -> ``conf/models/``; or a YAML path."""
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
    """A freshly initialised detector (deterministic for a given ``seed``)."""
    if nc <= 0:
        raise ModelError(f"nc={nc}: a detector needs at least one class")
    cfg = resolve_model_cfg(arch)
    import common.pyrafan  # noqa: F401  (registers PyraFAN with Ultralytics; here to avoid an import cycle)

    torch.manual_seed(seed)
    model = DetectionModel(cfg, nc=nc, verbose=False)
    model.names = {i: n for i, n in enumerate(names)} if names else {i: str(i) for i in range(nc)}
    model.args = get_cfg()
    model.task = "detect"
    model.cedar_arch = arch
    return model


def num_classes(model: nn.Module) -> int:
    return int(model.model[-1].nc)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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


def load_weights(path: str | Path, model: nn.Module | None = None, arch: str | None = None) -> nn.Module:
    """Load a file written by :func:`save_weights` (``weights_only``: no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or foreign file
        raise ModelError(f"cannot read weights file {path}: {err}") from None
    if not isinstance(blob, dict) or "state_dict" not in blob:
        raise ModelError(f"{path} is not a cedar weights file (no 'state_dict')")
    if model is None:
        arch = arch or blob.get("arch")
        if not arch:
            raise ModelError(f"{path} does not name its architecture; pass arch=")
        names = [blob["names"][k] for k in sorted(blob["names"])] if blob.get("names") else None
        model = build_model(arch, int(blob["nc"]), names=names)
    return load_state_dict(model, blob["state_dict"])


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


def make_train_loader(data_yaml: str | Path, *, imgsz: int, batch: int, stride: int = 32,
                      mosaic: float = 1.0, workers: int = 0, seed: int = 0, split: str = "train",
                      augment: Augment | None = None):
    """Ultralytics' augmenting dataloader over a dataset split (``augment``: see :func:`_augment_dataset`)."""
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
    """
    if epochs <= 0:
        return TrainResult(0, 0, 0.0, 0.0)
    from tqdm.auto import tqdm

    init_seeds(seed)
    t0 = time.perf_counter()
    dev = torch.device("cpu" if device == "cpu" else f"cuda:{device}" if str(device).isdigit() else device)
    model.to(dev).train()
    stride = max(int(model.stride.max()), 32)
    loader, hyp = make_train_loader(data_yaml, imgsz=imgsz, batch=batch, stride=stride,
                                    mosaic=mosaic, workers=workers, seed=seed, augment=augment)
    model.args = hyp
    criterion = model.init_criterion()
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr0, betas=(0.937, 0.999))
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
        sums, n_batches, extra_sum = None, 0, 0.0
        bar = tqdm(loader, desc=f"{desc} epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for batch_data in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(it)
            imgs = batch_data["img"].to(dev, non_blocking=True).float() / 255.0
            preds = model(imgs)
            loss_vec, items = criterion(preds, batch_data)
            loss = loss_vec.sum()
            if extra_loss is not None:
                extra = extra_loss(imgs, preds, batch_data)
                loss = total_loss(loss, extra * imgs.shape[0], alpha)
                extra_sum += float(extra.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
            optimizer.step()
            vec = torch.as_tensor([float(v) for v in (items.values() if isinstance(items, dict) else items)])
            sums = vec if sums is None else sums + vec
            n_batches += 1
            it += 1
            bar.set_postfix(loss=f"{float(loss.detach()) / imgs.shape[0]:.3f}")
        names = list(items.keys()) if isinstance(items, dict) else ["box", "cls", "dfl"]
        last = {str(k): float(v) / n_batches for k, v in zip(names, sums)}
        last_extra = extra_sum / n_batches
    if mosaic > 0 and epochs > 1:  # leave the (shared) loader state alone for the next call
        loader.dataset.mosaic = False
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

    @property
    def present_classes(self) -> list[int]:
        return [i for i, v in enumerate(self.ap50) if not math.isnan(v)]


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
    from ultralytics.models.yolo.detect import DetectionValidator

    t0 = time.perf_counter()
    data = check_det_dataset(str(data_yaml))
    if not data.get(split):
        raise ModelError(f"{data_yaml}: no '{split}' split")
    with tempfile.TemporaryDirectory(prefix="cedar-val-") as tmp:
        args = dict(data=str(data_yaml), split=split, imgsz=imgsz, batch=batch, conf=conf, iou=iou,
                    plots=False, save_json=False, verbose=False, device=device, half=False, workers=0,
                    task="detect", mode="val")
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
    from ultralytics import YOLO

    yolo = YOLO(resolve_model_cfg(getattr(model, "cedar_arch", None) or "yolo11n"), task="detect")
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
        self.kwargs = dict(imgsz=imgsz, conf=conf, iou=iou, device=device, verbose=False, save=False)

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
    """Export to ONNX at ``path`` (raw head output, NMS done by the caller)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    copy = deepcopy(model).cpu().eval()
    copy.args = dict(copy.args if isinstance(copy.args, dict) else vars(copy.args))  # exporter indexes it
    copy.task = "detect"
    with tempfile.TemporaryDirectory(prefix="cedar-export-") as tmp:
        copy.pt_path = str(Path(tmp) / "model.pt")
        out = _as_yolo(copy).export(format="onnx", imgsz=imgsz, dynamic=dynamic, simplify=False,
                                    device="cpu", verbose=False)
        shutil.move(out, path)
    return path
