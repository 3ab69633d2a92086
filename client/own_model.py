"""A site's own model: what it would have alone, to check it is not worse off for joining.

A site that trains alone releases nothing, so it needs no privacy: its own model
trains on its training split without noise, with the non-private recipe
(:data:`common.federation_config.NONPRIVATE_RECIPE`, two epochs a learning-rate
step), from the same pretrained backbone and in the run's transfer mode. It is
trained once per run, the first time the site decides with the federated model,
and kept in a file on the site's disk beside its ledger, named after the run key.

The site then compares the two on its validation split, logs what it found, and
decides with the best mix (:mod:`common.model_blend`) where its policy says
``decide_with_mix``; else with the federated model. Nothing about the own model leaves the site: the
DP evaluation counts use the global model alone, and the exact metrics made at
the site's operating point go out only where its policy releases them by name.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from client.local_training import LocalTrainingConfig, train_locally
from client.site_runtime import SiteRuntime
from common.atomic_files import load_arrays, save_arrays
from common.federation_config import NONPRIVATE_RECIPE
from common.model_blend import BlendChoice, BlendedModel, choose_blend
from common.model_surgery import FedShiftModel, build_model
from common.prediction import predict_logits
from common.trainable_arrays import load_trainable_arrays, trainable_arrays

logger = logging.getLogger(__name__)

OWN_MODEL_DIR = "own-model"
EPOCHS_PER_STEP = 2
"""Epochs between learning-rate decays (the non-private recipe decays once a round of
two epochs)."""


def own_model_path(site_dir: Path, site: str, run_key: str) -> Path:
    """Where ``site`` keeps its own model for run ``run_key``."""
    return site_dir / OWN_MODEL_DIR / f"{site}-{run_key}.npz"


def train_own_model(site: SiteRuntime, epochs: int) -> FedShiftModel:
    """A model trained from the pretrained backbone on the site's training split alone,
    without DP, for ``epochs`` epochs of the non-private recipe."""
    cfg = site.cfg
    model = build_model(cfg.model_spec())
    images, labels = site.data.images["train"], site.data.labels["train"]
    for start in range(0, epochs, EPOCHS_PER_STEP):
        step = start // EPOCHS_PER_STEP
        train_locally(model, images, labels, LocalTrainingConfig(
            epochs=min(EPOCHS_PER_STEP, epochs - start), batch_size=cfg.batch_size,
            lr=NONPRIVATE_RECIPE["lr"] * NONPRIVATE_RECIPE["lr_decay"] ** step,
            optimizer=NONPRIVATE_RECIPE["optimizer"]), None, site.device)
    return model


def own_model(site: SiteRuntime) -> FedShiftModel:
    """The site's own model for this run: the kept one, or trained now and kept."""
    path = own_model_path(site.files_dir, site.name, site.run_key)
    if path.exists():
        model = build_model(site.cfg.model_spec())
        load_trainable_arrays(model, load_arrays(path))
        return model
    epochs = site.policy.own_model_epochs
    logger.info("%s: training its own model (%d epochs on %d images, no DP: it never "
                "leaves the site) to compare with the federated one", site.name, epochs,
                len(site.data.labels["train"]))
    model = train_own_model(site, epochs)
    save_arrays(path, trainable_arrays(model), mode=0o600)
    return model


def decision_model(site: SiteRuntime, federated: FedShiftModel
                   ) -> tuple[nn.Module, BlendChoice | None]:
    """The model the site decides with, and the comparison that chose it.

    With ``own_model_epochs`` 0 in the site's policy, or no validation images, the
    federated model alone (and None). Otherwise the comparison with the site's own
    model goes to the site's log (a warning where alone it would do clearly better),
    and the model is the best mix where the policy says ``decide_with_mix``, else the
    federated model.
    """
    validation = site.data.images["val"]
    if not site.policy.own_model_epochs or not len(validation):
        return federated, None
    own = own_model(site)
    choice = choose_blend(predict_logits(federated, validation, site.device),
                          predict_logits(own, validation, site.device),
                          site.data.labels["val"].numpy())
    (logger.warning if choice.alone_is_better else logger.info)(
        choice.summary(site.name, site.policy.decide_with_mix))
    if choice.weight == 1.0 or not site.policy.decide_with_mix:
        return federated, choice
    return BlendedModel(federated, own, choice.weight), choice
