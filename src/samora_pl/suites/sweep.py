"""`samora sweep NAME [trials=N] ...`: an Optuna search over fine-tune settings, scored on held-out training slices.

A sweep file `experiments/sweeps/<name>.yaml` names the search space (dotted config keys, each a float or
int range, optionally on a log scale, or a list of choices), how many trials to run and, optionally, fixed
overrides for every trial (before the command line's, which win):

    description: learning rate, warm-up and batch size of the fine-tune
    trials: 12
    space:
      optim.lr: {low: 1.0e-4, high: 2.0e-2, log: true}
      optim.warmup_steps: {low: 0, high: 250}
      data.batch_size: {choices: [2, 4, 8]}
    overrides: []

Every trial is a stage-2 fine-tune run through `samora_pl.cli.run_command("finetune", ...)` with
`finetune.evaluate=false`: the objective is the fine-tune's last `val/mean_dice`, the Dice on its monitoring
slices (`data.val_slices` labelled TRAINING slices the fraction did not select, data_modules/labelled/base.py),
so no test volume is ever read and the test set stays untouched for the final `make finetune`.

Resumable and reused like ablation variants: the trials live in an Optuna storage
`runs/<run>/sweeps/<name>/optuna.db` (sqlite), and each trial's fine-tune in `runs/<run>/finetune/sweep-<name>-<hash>`,
the hash of its sampled settings. Re-running the command continues to `trials` finished trials (raising it
runs only the new ones); a trial cut off mid-way is asked again with the same settings, and its fine-tune
continues from its `last.ckpt`; a fine-tune that finished is read back, not re-run. Another base setting
(the command line, the sweep file's overrides) is refused with the keys that differ; `overwrite=true`
starts the sweep afresh.

Outputs in `runs/<run>/sweeps/<name>/`: `best.yaml` (the best trial's settings as an override file:
`make finetune ARGS=overrides_file=runs/<run>/sweeps/<name>/best.yaml`, or `OVERRIDES=...`), `trials.csv`,
`summary.md` and `trials.png` (the objective per trial with the best so far, and against each setting).
"""

import csv
import hashlib
import io
import json
import logging
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from samora_pl.config.compose import compose, experiments_dir, flat_config
from samora_pl.config.plans import FINETUNE_KEYS, FinetunePlan, build_plan, folders_of
from samora_pl.errors import SamoraError
from samora_pl.records.atomic import atomic_path, atomic_write_text
from samora_pl.records.manifest import read_manifest

log = logging.getLogger(__name__)
OBJECTIVE = "val_mean_dice"  # the fine-tune's last val/mean_dice: held-out labelled training slices
# keys a sweep never searches: where the trials live, and evaluation (the objective must not see the test set)
FIXED_KEYS = ("run", "runs_dir", "stage", "overwrite", "finetune.tag", "finetune.evaluate", "logger")
# base settings that must match for a stored sweep's trials to be comparable (besides FINETUNE_KEYS)
BASE_KEYS = FINETUNE_KEYS + (
    "trainer.max_epochs",
    "trainer.stop_epoch",
    "trainer.limit_train_batches",
    "trainer.check_val_every_n_epoch",
    "trainer.precision",
)
IGNORED_BASE_KEYS = ("finetune.tag", "finetune.evaluate", "data.cache")


class InvalidTrial(Exception):
    """Sampled settings the config refuses (e.g. a batch size that does not divide data.effective_batch_size)."""


def load_sweep(name: str) -> dict:
    """The sweep file `experiments/sweeps/<name>.yaml`, checked: a space of known keys, a positive trial count."""
    folder = experiments_dir() / "sweeps"
    path = folder / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml"))) or "none"
        raise SamoraError(f"Unknown sweep '{name}' (NAME); known: {known} (files in {folder}).")
    try:
        spec = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as err:  # malformed YAML of any kind
        raise SamoraError(f"Cannot read sweep file {path}: {err}") from err
    if not isinstance(spec, dict) or not isinstance(spec.get("space"), dict) or not spec["space"]:
        raise SamoraError(f"{path} must have a non-empty 'space' mapping of config key -> range or choices.")
    trials = spec.get("trials", 10)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise SamoraError(f"{path}: 'trials' is {trials!r}; give a whole number of trials >= 1.")
    overrides = spec.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(item, str) and "=" in item for item in overrides):
        raise SamoraError(f"{path}: 'overrides' must be a list of key=value strings (e.g. [trainer.max_epochs=50]).")
    base = compose("finetune", overrides)
    space = {key: _distribution(path, key, entry, base) for key, entry in spec["space"].items()}
    text = str(spec.get("description") or "")
    return {
        "name": name,
        "path": path,
        "trials": trials,
        "space": space,
        "overrides": overrides,
        "description": text,
    }


def _distribution(path: Path, key: str, entry, base: DictConfig) -> dict:
    """One search dimension: {kind: float|int|categorical, ...}, refusing unknown or fixed keys by name."""
    if key in FIXED_KEYS or key.startswith(FIXED_KEYS):
        raise SamoraError(f"{path}: the sweep cannot search '{key}' (it sets {', '.join(FIXED_KEYS)} itself).")
    if OmegaConf.select(base, key, default=KeyError) is KeyError:
        raise SamoraError(f"{path}: '{key}' is not a config key of the fine-tune (e.g. optim.lr, data.batch_size).")
    if not isinstance(entry, dict):
        raise SamoraError(f"{path}: '{key}' needs {{low: .., high: ..}} (and log: true) or {{choices: [..]}}.")
    if "choices" in entry:
        choices = entry["choices"]
        if not isinstance(choices, list) or not choices:
            raise SamoraError(f"{path}: '{key}'.choices must be a non-empty list of values.")
        if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            raise SamoraError(f"{path}: '{key}'.choices must be plain values (numbers, strings, true/false, null).")
        return {"kind": "categorical", "choices": choices}
    low, high = entry.get("low"), entry.get("high")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
    if not numbers or not low < high:
        raise SamoraError(f"{path}: '{key}' needs numbers low < high (got low={low!r}, high={high!r}).")
    log_scale = bool(entry.get("log", False))
    if log_scale and low <= 0:
        raise SamoraError(f"{path}: '{key}' has log: true, which needs low > 0 (got {low}).")
    kind = entry.get("type") or ("int" if isinstance(low, int) and isinstance(high, int) else "float")
    if kind not in ("int", "float"):
        raise SamoraError(f"{path}: '{key}'.type is {kind!r}; use int or float (or choices: [...]).")
    step = entry.get("step")
    if step is not None and log_scale:
        raise SamoraError(f"{path}: '{key}' cannot have both log: true and a step.")
    return {"kind": kind, "low": low, "high": high, "log": log_scale, "step": step}


def _suggest(trial, key: str, dist: dict):
    if dist["kind"] == "categorical":
        return trial.suggest_categorical(key, dist["choices"])
    if dist["kind"] == "int":
        return trial.suggest_int(key, int(dist["low"]), int(dist["high"]), step=int(dist["step"] or 1), log=dist["log"])
    return trial.suggest_float(key, float(dist["low"]), float(dist["high"]), step=dist["step"], log=dist["log"])


def trial_tag(name: str, params: dict) -> str:
    """The fine-tune tag of a trial: the same settings, the same folder (so it is found again on resume)."""
    digest = hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"sweep-{name}-{digest}"


def _value_text(value) -> str:
    """A sampled value as a key=value override that reads back as the same value (YAML scalar)."""
    if isinstance(value, float):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _base_settings(cfg: DictConfig, space: dict) -> dict:
    """The settings that make a sweep's trials comparable: what shapes a fine-tune, less the searched keys."""
    flat = flat_config(cfg)
    return {
        key: value
        for key, value in flat.items()
        if key.startswith(BASE_KEYS) and not key.startswith(IGNORED_BASE_KEYS) and key not in space
    }


def run_sweep(name: str, overrides, trials: int | None = None) -> dict:
    """Run (or continue) the sweep NAME to `trials` finished trials; write best.yaml, trials.csv, summary.md and
    trials.png under the run; returns {"best": {...}, "trials": [...], "folder": Path}."""
    import optuna
    from optuna.trial import TrialState

    from samora_pl.cli import run_command

    spec = load_sweep(name)
    wanted = int(trials if trials is not None else spec["trials"])
    if wanted < 1:
        raise SamoraError(f"trials={wanted}: a sweep needs at least one trial.")
    base = [*spec["overrides"], *overrides, "finetune.evaluate=false"]  # never the test volumes
    cfg = compose("finetune", base)
    _check_base(cfg)
    folder = folders_of(cfg).root / "sweeps" / name
    folder.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(folder / 'optuna.db').resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings = _base_settings(cfg, spec["space"])
    if cfg.overwrite and name in optuna.study.get_all_study_names(storage):
        optuna.delete_study(study_name=name, storage=storage)
        log.info("sweep %s: overwrite=true, starting afresh", name)
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=int(cfg.seed)),
    )
    _check_study_settings(study, settings, folder)
    _requeue_interrupted(study, name)
    # a fresh sampler seed per invocation: a resumed sweep does not redraw the first run's random start points
    study.sampler = optuna.samplers.TPESampler(seed=int(cfg.seed) + len(study.trials))

    def objective(trial) -> float:
        params = {key: _suggest(trial, key, dist) for key, dist in spec["space"].items()}
        tag = trial_tag(name, params)
        trial.set_user_attr("tag", tag)
        args = [*base, *(f"{key}={_value_text(value)}" for key, value in params.items()), f"finetune.tag={tag}"]
        try:
            trial_plan = build_plan(compose("finetune", args))
        except SamoraError as err:
            trial.set_user_attr("invalid", str(err))
            raise InvalidTrial(str(err)) from err
        assert isinstance(trial_plan, FinetunePlan)
        value = _reused_value(trial_plan)
        if value is None:
            log.info("sweep %s: trial %d runs %s (%s)", name, trial.number, tag, _params_text(params))
            value = run_command("finetune", args).get(OBJECTIVE)
        else:
            log.info("sweep %s: trial %d reuses finished %s", name, trial.number, tag)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise SamoraError(
                f"sweep {name}: fine-tune {tag} logged no val/mean_dice, the sweep's objective: keep data.val_slices "
                "> 0 and let it validate after its last epoch (trainer.check_val_every_n_epoch dividing the epochs "
                "it trains)."
            )
        return float(value)

    finished = _complete(study)
    if len(finished) < wanted:
        log.info("sweep %s: %d of %d trials finished, running %d", name, len(finished), wanted, wanted - len(finished))
        study.optimize(objective, n_trials=wanted - len(finished), catch=(InvalidTrial,), gc_after_trial=True)
    finished = _complete(study)
    if not finished:
        raise SamoraError(f"sweep {name}: no trial finished (see the messages above; trials in {folder}).")
    rows = [_row(trial) for trial in study.trials]
    best = max(finished, key=lambda t: t.value)
    result = {"best": {"number": best.number, "value": best.value, "params": dict(best.params)}, "trials": rows}
    write_outputs(folder, spec, base, overrides, result)
    skipped = [t for t in study.trials if t.state == TrialState.FAIL and t.user_attrs.get("invalid")]
    if skipped:
        log.warning(
            "sweep %s: %d sampled settings were refused by the config (summary.md lists them)", name, len(skipped)
        )
    return {**result, "folder": folder}


def _check_base(cfg: DictConfig) -> None:
    if cfg.trainer.devices not in (1, "1") or cfg.trainer.num_nodes != 1:
        raise SamoraError(
            f"samora sweep runs each trial's fine-tune in this process on one device (here trainer.devices="
            f"{cfg.trainer.devices}, trainer.num_nodes={cfg.trainer.num_nodes}); use DEVICES=1, and run the best "
            "settings on more devices with make finetune."
        )
    if cfg.data.fraction >= 1.0 and cfg.data.fraction_by != "list":
        raise SamoraError(
            "samora sweep scores each trial on labelled training slices the fraction did not select, and "
            "data.fraction=1 selects them all (the score would show fit, not generalisation): give FRACTION < 1, "
            "e.g. data.fraction=0.1 as the demo, or 0.9 to keep nine tenths for training."
        )
    if cfg.data.val_slices < 1:
        raise SamoraError(
            "samora sweep scores each trial on the fine-tune's monitoring slices (held-out labelled training "
            f"slices), but data.val_slices is {cfg.data.val_slices}; give data.val_slices >= 1 (e.g. 32)."
        )


def _check_study_settings(study, settings: dict, folder: Path) -> None:
    """A stored sweep continues only with the base settings it began with (else its trials do not compare)."""
    stored = study.user_attrs.get("base_settings")
    if stored is None:
        study.set_user_attr("base_settings", json.loads(json.dumps(settings, default=str)))
        return
    now = json.loads(json.dumps(settings, default=str))
    changed = sorted(key for key in set(stored) | set(now) if stored.get(key) != now.get(key))
    if changed:
        raise SamoraError(
            f"The sweep in {folder} was begun with other base settings ({', '.join(changed[:8])}): run it with the "
            "ARGS that began it, add overwrite=true to start it afresh, or use another RUN."
        )


def _requeue_interrupted(study, name: str) -> None:
    """Trials left RUNNING by a killed sweep, or failed by an interruption, are asked again with the same settings
    (their fine-tune folder, named by the settings, then continues from its last.ckpt)."""
    from optuna.trial import TrialState

    done = [t.params for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.WAITING)]
    for trial in study.trials:
        if trial.state == TrialState.RUNNING:
            study.tell(trial.number, state=TrialState.FAIL)
        elif trial.state != TrialState.FAIL or trial.user_attrs.get("invalid"):
            continue
        if trial.params and trial.params not in done:
            log.info("sweep %s: asking interrupted trial %d's settings again", name, trial.number)
            study.enqueue_trial(dict(trial.params))
            done.append(trial.params)


def _reused_value(plan: FinetunePlan):
    """The objective of a fine-tune that already finished with these settings (None: run it)."""
    folder = plan.folder
    manifest = read_manifest(folder) or {}
    if manifest.get("status") != "complete" or plan.overwrite:
        return None
    changed = plan.changed_in(folder, plan.tag, watch=("trainer.max_epochs", "trainer.stop_epoch"))
    if changed:
        raise SamoraError(
            f"{folder} holds a finished fine-tune of this sweep made with other settings ({', '.join(changed[:8])}): "
            "run the sweep with the ARGS that made it, add overwrite=true to redo it, or use another RUN."
        )
    return (manifest.get("metrics") or {}).get(OBJECTIVE)


def _complete(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _row(trial) -> dict:
    return {
        "number": trial.number,
        "state": trial.state.name.lower(),
        "value": trial.value,
        "params": dict(trial.params),
        "tag": trial.user_attrs.get("tag"),
        "note": trial.user_attrs.get("invalid", ""),
    }


def _params_text(params: dict) -> str:
    return " ".join(f"{key}={_value_text(value)}" for key, value in params.items())


def best_overrides_yaml(spec: dict, base: list, user: list, best: dict) -> str:
    """The best trial's settings as a nested YAML mapping for `overrides_file=`, with a header saying whence."""
    tree = OmegaConf.create()
    for key, value in best["params"].items():
        OmegaConf.update(tree, key, value, force_add=True)
    header = [
        f"# samora sweep {spec['name']}: best of its finished trials (trial {best['number']}), "
        f"val/mean_dice {best['value']:.4f} on held-out labelled training slices (never the test volumes).",
        f"# Searched with: {' '.join(user) or '(no command-line overrides)'}"
        + (f"; sweep-file overrides: {' '.join(spec['overrides'])}" if spec["overrides"] else ""),
        "# Use: make finetune ARGS=overrides_file=<this file> (add the same settings for the rest of the run).",
    ]
    return "\n".join(header) + "\n" + OmegaConf.to_yaml(tree)


def write_outputs(folder: Path, spec: dict, base: list, user: list, result: dict) -> None:
    keys = list(spec["space"])
    rows = sorted(result["trials"], key=lambda r: r["number"])
    best = result["best"]
    atomic_write_text(folder / "best.yaml", best_overrides_yaml(spec, base, list(user), best))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["number", "state", OBJECTIVE, *keys, "tag", "note"])
    for row in rows:
        writer.writerow(
            [row["number"], row["state"], row["value"], *(row["params"].get(k) for k in keys), row["tag"], row["note"]]
        )
    atomic_write_text(folder / "trials.csv", buffer.getvalue())
    atomic_write_text(folder / "summary.md", summary_markdown(spec, rows, best))
    write_plot(folder / "trials.png", spec, rows)
    log.info(
        "sweep %s: best val/mean_dice %.4f (trial %d: %s); settings in %s",
        spec["name"],
        best["value"],
        best["number"],
        _params_text(best["params"]),
        folder / "best.yaml",
    )


def summary_markdown(spec: dict, rows: list, best: dict) -> str:
    keys = list(spec["space"])
    finished = sorted((r for r in rows if r["state"] == "complete"), key=lambda r: -r["value"])
    others = [r for r in rows if r["state"] != "complete"]
    lines = [f"# Sweep {spec['name']}", ""]
    if spec["description"]:
        lines += [spec["description"], ""]
    lines += [
        f"Objective: {OBJECTIVE} (the fine-tune's last val/mean_dice on `data.val_slices` labelled training slices "
        "the fraction did not select); every trial ran with finetune.evaluate=false, so no test volume was read.",
        "",
        f"Best: trial {best['number']}, {100 * best['value']:.2f} % ({_params_text(best['params'])}); "
        "as an override file in best.yaml.",
        "",
        "| trial | val Dice (%) | " + " | ".join(keys) + " | fine-tune |",
        "|" + "---|" * (len(keys) + 3),
    ]
    for row in finished:
        cells = [str(row["number"]), f"{100 * row['value']:.2f}", *(_value_text(row["params"].get(k)) for k in keys)]
        lines.append("| " + " | ".join(cells) + f" | `{row['tag']}` |")
    if others:
        lines += ["", "Not finished (interrupted trials are asked again on the next run; refused settings are not):"]
        lines += [
            f"- trial {r['number']}: {r['state']} {_params_text(r['params'])} {r['note']}".rstrip() for r in others
        ]
    return "\n".join(lines) + "\n"


def write_plot(path: Path, spec: dict, rows: list) -> None:
    """trials.png: the objective per trial with the best so far, then the objective against each searched key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(spec["space"])
    done = [r for r in rows if r["state"] == "complete"]
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(3.6 * (1 + len(keys)), 3.2), squeeze=False)
    ax = axes[0][0]
    numbers = [r["number"] for r in done]
    values = [100 * r["value"] for r in done]
    best_so_far = [max(values[: i + 1]) for i in range(len(values))]
    ax.plot(numbers, values, "o", color="tab:blue", label="trial")
    ax.step(numbers, best_so_far, where="post", color="tab:orange", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("val Dice (%)")
    ax.legend(fontsize=7)
    for ax, key in zip(axes[0][1:], keys):
        dist = spec["space"][key]
        xs = [r["params"].get(key) for r in done]
        if dist["kind"] == "categorical":
            labels = [_value_text(c) for c in dist["choices"]]
            ax.scatter([labels.index(_value_text(x)) for x in xs], values, color="tab:blue")
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels)
        else:
            ax.scatter(xs, values, color="tab:blue")
            if dist["log"]:
                ax.set_xscale("log")
        ax.set_xlabel(key)
    fig.suptitle(f"sweep {spec['name']}: {len(done)} finished trial(s), objective {OBJECTIVE}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
