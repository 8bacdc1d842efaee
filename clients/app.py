"""ClientApp: one edge site. Trains its own detector on its private data.

Each ``train`` message may carry the node's current weights (the server keeps
every node's personalised model); without them the node starts from a fresh
model built from YAML. After local training it evaluates on its own validation
and test splits, stores the weights in its model store (written atomically; the
edge runtime reads them from there) and replies with weights, metrics and its
site identity. The site id comes from the node-config; the server binds it to
this node (``strategies.personalized``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch  # noqa: F401  ArrayRecord.to_torch_state_dict works only once torch is imported
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.site import LocalSite
from common import protocol as P
from common.console import configure_logging

log = logging.getLogger(__name__)
app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who this node is: site id, position (km) and class set."""
    configure_logging()
    site = LocalSite.from_context(context.run_config, context.node_config)
    return Message(content=RecordDict({P.SITE: ConfigRecord(site.identity())}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training; with a :class:`common.protocol.KDRequest` in the config, distillation from its teachers."""
    configure_logging()
    config = msg.content.get(P.CONFIG, ConfigRecord())
    site = LocalSite.from_context(context.run_config, context.node_config, config)
    arrays = msg.content.get(P.ARRAYS)
    kd = P.KDRequest.parse(config)
    server_round = int(config.get(P.SERVER_ROUND, 0))
    result = site.train_round(
        server_round=server_round,
        epochs=int(config.get(P.EPOCHS, site.cfg.train.epochs_per_round)),
        weights=arrays.to_torch_state_dict() if arrays is not None else None,
        kd=kd, teachers=[rec.to_torch_state_dict() for rec in kd.teacher_records(msg.content)] if kd else [],
        gallery=P.GALLERY_FRAMES if config.get(P.GALLERY_ROUND) == server_round else 0,
    )
    content = RecordDict({
        P.ARRAYS: ArrayRecord(result.weights),
        P.METRICS: MetricRecord(result.metrics),
        P.SITE: ConfigRecord(site.identity()),
    })
    if result.gallery:  # the run report's pictures: the image files travel as they are on disk
        images = [Path(item.pop("image")).read_bytes() for item in result.gallery]
        content[P.GALLERY] = ConfigRecord(P.encode_gallery(result.gallery, images))
    return Message(content=content, reply_to=msg)
