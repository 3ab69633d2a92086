"""FedBN-style personalisation: a site's own BatchNorm scale/shift between rounds.

With ``personal-bn`` every site keeps the scale/shift parameters it trained
(:class:`common.frozen_batchnorm.ChannelAffine`) in a file on its own disk, beside
its ledger, and puts them into the global model before it trains or evaluates;
the head and input adapter come from the server. A run starts from the global
scale/shift; the file is named after the run key, so a resumed run (same key)
keeps the site's parameters and a new run does not inherit them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from common.atomic_files import load_arrays, save_arrays
from common.frozen_batchnorm import ChannelAffine
from common.model_surgery import FedShiftModel

PERSONAL_DIR = "personal"


def personal_names(model: FedShiftModel) -> list[str]:
    """Names of the parameters a FedBN site keeps to itself: every scale and shift."""
    return [f"{module_name}.{param}" for module_name, module in model.named_modules()
            if isinstance(module, ChannelAffine) for param in ("weight", "bias")]


def personal_path(site_dir: Path, site: str, run_key: str) -> Path:
    """Where ``site`` keeps its personal parameters for run ``run_key``."""
    return site_dir / PERSONAL_DIR / f"{site}-{run_key}.npz"


def apply_personal(model: FedShiftModel, path: Path) -> bool:
    """Overwrite the model's scale/shift with the site's saved ones; False if none yet."""
    if not path.exists():
        return False
    saved = load_arrays(path)
    params = dict(model.named_parameters())
    names = personal_names(model)
    if sorted(saved) != sorted(names):
        raise ValueError(
            f"{path} holds parameters of another model ({len(saved)} arrays, this model has "
            f"{len(names)} scale/shift arrays); was the backbone changed within the run?"
        )
    with torch.no_grad():
        for name in names:
            params[name].copy_(torch.from_numpy(np.asarray(saved[name].numpy())))
    return True


def save_personal(model: FedShiftModel, path: Path) -> None:
    """Save the model's scale/shift as the site's personal parameters (atomically; only the
    site's account may read them, as its other files)."""
    params = dict(model.named_parameters())
    save_arrays(path, ArrayRecord({
        name: Array(params[name].detach().cpu().float().numpy().copy())
        for name in personal_names(model)
    }), mode=0o600)
