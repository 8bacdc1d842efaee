"""The models the server makes before round 1: the sites' base edge model and the cloud model.

As a real deployment pushes a cloud-trained model to each new edge box, every
site starts from ``model.edge-init``: ``base`` (``model.edge`` trained by the
server for ``model.base-epochs`` on the shared benchmark's public train split),
``scratch`` or a checkpoint file. The cloud model is ``model.cloud-init``:
``train`` (``model.cloud`` for ``model.cloud-epochs``, the same way) or a
checkpoint file: an Ultralytics ``.pt`` a user downloaded (another class count
re-initialises the class branch) or a cedar weights file
(:func:`common.yolo.load_checkpoint`).

Trained models are cached in ``<data.cache-dir>/models/<arch>-<key>/model.pt``,
``key`` a hash of everything that determines them (the benchmark, the
architecture, the training settings, the seed): a second run loads them
("... loaded from cache") instead of training.

The closed loop (paper section 4.2 (2)): the cloud service's hard-sample store
holds what the sites offloaded, labelled by the cloud. Before every
cloud-to-edge KD round, :class:`CloudModel` fine-tunes the cloud model for
``cloud.finetune-epochs`` on the public train split plus the hard samples
collected so far (if the store gained any since the last fine-tune), saves it
in ``<run>/cloud/``, has the service restart on the new weights, and then
teaches the sites with it. The hard samples' labels are the cloud's own
answers (confidence >= the service's ``--label-conf``): the fine-tune is
self-training on the regions the edge found hard, as in the paper.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.config import CedarConfig, model_init_path

if TYPE_CHECKING:
    from server.cloud_process import CloudProcess

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the training recipe changes in a way the key does not see


@dataclass(frozen=True)
class Recipe:
    """How the server trains a model on the public train split (everything the cache key depends on)."""

    arch: str
    epochs: int
    imgsz: int
    batch: int
    lr0: float
    weight_decay: float
    warmup_iters: int
    mosaic: float
    seed: int
    data_key: str  # the benchmark's generator key, or the public data.yaml's path

    @classmethod
    def from_config(cls, cfg: CedarConfig, arch: str, epochs: int) -> "Recipe":
        t = cfg.train
        return cls(arch=arch, epochs=epochs, imgsz=t.imgsz, batch=t.batch, lr0=t.lr0, weight_decay=t.weight_decay,
                   warmup_iters=t.warmup_iters, mosaic=t.mosaic, seed=cfg.seed, data_key=data_key(cfg))

    def key(self) -> str:
        blob = json.dumps({"version": CACHE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def data_key(cfg: CedarConfig) -> str:
    if cfg.data.source == "builtin":
        from common.benchmark import GeneratorSettings

        return f"builtin-{GeneratorSettings.from_data_config(cfg.data).key()}"
    return str(Path(cfg.data.public_data).expanduser().resolve())


def cache_root(cfg: CedarConfig) -> Path:
    return Path(cfg.data.cache_dir).expanduser() / "models"


def build(arch: str, names: list[str], seed: int):
    from common import yolo

    return yolo.build_model(arch, len(names), seed=seed, names=names)


def trained(role: str, recipe: Recipe, data_yaml: Path, names: list[str], root: Path, *, device: str = "cpu",
            workers: int = 0) -> Path:
    """The weights file of ``recipe`` trained on ``data_yaml``'s train split: from the cache, or trained now
    and cached (written atomically, so a killed run never leaves a half file). The file is the recipe's, whatever
    the ``role`` (logged): a cloud model of the base model's recipe is the base model, trained once."""
    from common import yolo

    path = root / f"{recipe.arch}-{recipe.key()}" / "model.pt"
    if path.is_file():
        log.info("%s model: loaded from cache %s", role, path)
        return path
    log.info("%s model: training %s for %s epochs on %s", role, recipe.arch, recipe.epochs, data_yaml)
    model = build(recipe.arch, names, recipe.seed)
    res = yolo.train(model, data_yaml, epochs=recipe.epochs, imgsz=recipe.imgsz, batch=recipe.batch, lr0=recipe.lr0,
                     weight_decay=recipe.weight_decay, warmup_iters=recipe.warmup_iters, mosaic=recipe.mosaic,
                     workers=workers, seed=recipe.seed, device=device, desc=f"{role} model")
    yolo.save_weights(model, path, epochs=res.epochs, seconds=round(res.seconds, 1), recipe=asdict(recipe))
    log.info("%s model: trained %s epochs (%s iterations) in %.0fs -> %s", role, res.epochs, res.iterations,
             res.seconds, path)
    return path


def initial_model(cfg: CedarConfig, role: str, data_yaml: Path, names: list[str]):
    """``(model, source)`` for ``role`` ``"base"`` (the edge model, ``model.edge-init``) or ``"cloud"``
    (``model.cloud-init``); ``(None, "scratch")`` when the sites start from random weights."""
    from common import yolo

    key, arch, epochs = (("edge_init", cfg.model.edge, cfg.model.base_epochs) if role == "base"
                         else ("cloud_init", cfg.model.cloud, cfg.model.cloud_epochs))
    given = model_init_path(cfg, key)
    if given is None and getattr(cfg.model, key) == "scratch":
        return None, "scratch"
    model = build(arch, names, cfg.seed)
    if given is not None:
        log.info("%s model: model.%s=%s", role, key.replace("_", "-"), given)
        yolo.load_checkpoint(model, given)  # logs how many tensors it kept
        return model, str(given)
    path = trained(role, Recipe.from_config(cfg, arch, epochs), data_yaml, names, cache_root(cfg),
                   device=cfg.train.device, workers=cfg.train.workers)
    yolo.load_weights(path, model=model)
    return model, str(path)


def base_arrays(cfg: CedarConfig, data_yaml: Path, names: list[str]):
    """Every site's first weights as a Flower ``ArrayRecord`` (None: sites build their model from scratch)."""
    from common import yolo

    model, _ = initial_model(cfg, "base", data_yaml, names)
    return None if model is None else yolo.to_arrayrecord(model)


def calibrate(cfg: CedarConfig, model, data_yaml: Path, names: list[str]) -> dict[str, float]:
    """The cloud model's answer threshold, as a site calibrates its edge model (:meth:`clients.site.LocalSite.
    calibrate`): the F1-optimal confidence (:func:`clients.collab.calibrate_conf`) on the shared benchmark's val
    split; the service answers from it (``det_conf`` in the weights file's metadata). ``{}`` when no detection
    matches an object (the service then answers from ``routing.cloud_conf``)."""
    from clients.collab import CONF_RANGE, calibrate_conf
    from clients.detector import TorchPredictor
    from common.sites import split_images

    t = cfg.train
    predictor = TorchPredictor(model, imgsz=t.imgsz, conf=CONF_RANGE[0], iou=cfg.eval.iou, device=t.device)
    dets, gts = [], []
    for _, image, gt in split_images(data_yaml, "val"):
        dets.append(predictor(image))
        gts.append(gt)
    found = calibrate_conf(dets, gts, len(names)) or {}
    if found:
        log.info("cloud model: answer threshold %.3f (public val F1 %.3f, precision %.3f, recall %.3f)",
                 found["det_conf"], found["f1"], found["precision"], found["recall"])
    else:
        log.info("cloud model: no detection matches a public val object; answer threshold routing.cloud_conf")
    return found


def hard_sample_count(store: Path) -> int:
    """Samples in a hard-sample store (``images/`` of :class:`server.cloud.HardSampleStore`)."""
    images = store / "images"
    return sum(1 for p in images.iterdir() if not p.name.endswith(".tmp")) if images.is_dir() else 0


class CloudModel:
    """The cloud detector: :func:`initial_model` ``"cloud"``, then fine-tuned on the hard samples before each
    cloud-to-edge KD round (the closed loop of the module docstring).

    ``service`` (set by the caller when the run serves the model) is restarted on every new version.
    Called as the strategy's ``cloud_fn``: ``cloud(server_round) -> (ArrayRecord, arch)``.
    """

    def __init__(self, cfg: CedarConfig, data_yaml: Path, names: list[str], run_dir: Path):
        self.cfg, self.data_yaml, self.names = cfg, data_yaml, names
        self.dir = run_dir / "cloud"
        self.store = Path(cfg.cloud.store).expanduser() if cfg.cloud.store else self.dir / "hard-samples"
        from common import yolo

        self.model, source = initial_model(cfg, "cloud", data_yaml, names)
        # what the service serves: a cedar weights file, also when the source is an Ultralytics checkpoint
        self.path = yolo.save_weights(self.model, self.dir / "model.pt", source=source,
                                      **calibrate(cfg, self.model, data_yaml, names))
        self.used = 0  # hard samples the current model was fine-tuned on
        self.service: CloudProcess | None = None

    def training_data(self) -> Path:
        """A data.yaml over the public train split and the hard-sample store's images."""
        import yaml

        base = yaml.safe_load(self.data_yaml.read_text())
        root = Path(base["path"])
        spec = {"path": str(root), "train": [str(root / base["train"]), str(self.store / "images")],
                "val": base["val"], "nc": len(self.names), "names": dict(enumerate(self.names))}
        path = self.dir / "data.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(spec))
        return path

    def refresh(self, server_round: int) -> bool:
        """Fine-tune on the public train split plus the hard samples if the store gained any; True if it did."""
        from common import yolo

        found = hard_sample_count(self.store)
        epochs = self.cfg.cloud.finetune_epochs
        if epochs == 0 or found <= self.used:
            log.info("cloud model: round %s: %s hard samples (%s new), no fine-tune", server_round, found,
                     found - self.used)
            return False
        t = self.cfg.train
        res = yolo.train(self.model, self.training_data(), epochs=epochs, imgsz=t.imgsz, batch=t.batch,
                         lr0=t.finetune_lr0, weight_decay=t.weight_decay, warmup_iters=t.warmup_iters,
                         mosaic=t.mosaic, workers=t.workers, seed=self.cfg.seed + server_round, device=t.device,
                         desc="cloud fine-tune")
        self.path = yolo.save_weights(self.model, self.dir / f"model-round-{server_round:03d}.pt",
                                      round=server_round, hard_samples=found,
                                      **calibrate(self.cfg, self.model, self.data_yaml, self.names))
        log.info("cloud model: round %s: fine-tuned %s epochs on the public train split + %s hard samples "
                 "(%s new) in %.0fs -> %s", server_round, epochs, found, found - self.used, res.seconds, self.path)
        self.used = found
        if self.service is not None:
            self.service.restart(self.path)
        return True

    def __call__(self, server_round: int) -> tuple[Any, str]:
        from common import yolo

        self.refresh(server_round)
        return yolo.to_arrayrecord(self.model), self.cfg.model.cloud
