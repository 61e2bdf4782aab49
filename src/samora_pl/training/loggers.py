"""The experiment tracker every stage logs to (config key `logger`), from plain values.

`logger=tensorboard` (the default), `csv`, `mlflow` or `wandb`: Lightning's own loggers, each writing under
the run folder and none needing a server:

- tensorboard: `runs/<run>/tb/<stage>/<sub>/` (event files; `make tensorboard`);
- csv: `runs/<run>/csv/<stage>/<sub>/metrics.csv`, images as PNG files in its `images/` folder;
- mlflow: a local file store `runs/<run>/mlruns/` (`mlflow ui --backend-store-uri runs/<run>/mlruns`), one
  MLflow experiment per stage and one MLflow run per sub-stage, images as the run's logged images;
- wandb: offline runs in `runs/<run>/wandb/` (`wandb sync` uploads them later, if wanted), one W&B project per
  samora run, grouped by stage.

Images go through `training/images.py`, which knows how each of these stores one. This module imports
nothing heavy at load time: the config validation (`config/compose.py`) asks it whether a package is there.
"""

import importlib.util
import os
from pathlib import Path

from samora_pl.config.choices import LOGGERS
from samora_pl.errors import SamoraError

# the folder of the run each tracker writes into
FOLDERS = {"tensorboard": "tb", "csv": "csv", "mlflow": "mlruns", "wandb": "wandb"}
# where W&B keeps its cache, settings and data outside a run (default: the home folder); under the run instead,
# unless the user chose a place before samora_pl was imported
WANDB_HOME_DIRS = {"WANDB_CACHE_DIR": "cache", "WANDB_CONFIG_DIR": "config", "WANDB_DATA_DIR": "data"}
_USER_WANDB_DIRS = {key for key in WANDB_HOME_DIRS if key in os.environ}
# the module each tracker imports, and the pip package that provides it
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


def check_logger(kind: str) -> None:
    """A known tracker whose package is installed; else one message saying what to install."""
    if kind not in LOGGERS:
        raise SamoraError(f"Config key 'logger' is {kind!r}; allowed values: {', '.join(LOGGERS)}.")
    if kind not in PACKAGES:
        return
    module, package = PACKAGES[kind]
    if importlib.util.find_spec(module) is None:
        raise SamoraError(
            f"Config key 'logger' is {kind}, but the Python package '{package}' is not installed: "
            f"`pip install {package}` into this environment (e.g. .venv/bin/pip install {package}), or choose "
            f"another tracker ({', '.join(k for k in LOGGERS if k != kind)})."
        )


def logger_dir(run_folder: Path, kind: str) -> Path:
    """Where tracker `kind` writes inside a run's folder (`runs/<run>`)."""
    return Path(run_folder) / FOLDERS[kind]


def build_logger(kind: str, save_dir: Path, name: str, version: str):
    """A Lightning logger of tracker `kind` writing under `save_dir`, for stage `name` and its sub-stage
    `version` (e.g. `finetune`, `samora-hl_attn-f0.1`)."""
    check_logger(kind)
    save_dir = Path(save_dir)
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(save_dir), name=name, version=version, default_hp_metric=False)
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(save_dir), name=name, version=version)
    if kind == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        # MLflow 3 keeps its file store in maintenance mode and refuses it unless this is set; a local folder
        # under the run is what this tracker is for (no server, no database); the user's own setting wins
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # nothing leaves the machine
        save_dir.mkdir(parents=True, exist_ok=True)
        return MLFlowLogger(experiment_name=name, run_name=version, tracking_uri=save_dir.resolve().as_uri())
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    if wandb.run is not None:  # the previous stage's run (demo, ablations, sweeps): Lightning would reuse it
        wandb.finish()
    save_dir.mkdir(parents=True, exist_ok=True)
    for key, sub in WANDB_HOME_DIRS.items():
        if key not in _USER_WANDB_DIRS:
            os.environ[key] = str(save_dir.resolve() / f".{sub}")
    # offline: nothing leaves the machine; the project is the samora run (the folder above save_dir)
    return WandbLogger(
        name=f"{name}/{version}",
        save_dir=str(save_dir),
        offline=True,
        project=save_dir.resolve().parent.name or "samora",
        group=name,
        job_type=name,
    )
