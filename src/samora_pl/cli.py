"""`samora <command> key=value ...`: the command line every make target calls.

Commands: cpt, distill, finetune, evaluate, predict, bundle, probe, check, prepare, demo, ablation, sweep. A
user mistake (SamoraError) prints one message and exits 1; anything else is a bug and keeps its traceback.
"""

import argparse
import errno
import importlib
import logging
import sys
import time
import warnings

from samora_pl.errors import SamoraError

COMMANDS = {
    "cpt": "continual pre-training of the SimCLRv2 and MAE teachers (cpt.teacher=all|simclr|mae)",
    "distill": "distil a teacher into a LoRA expert (distill.level=all|image|patch|pixel)",
    "finetune": "stage 2 on a labelled fraction (data.fraction=0.1), then evaluation",
    "evaluate": "re-evaluate a finished fine-tuning run and rewrite its results",
    "predict": "label maps of new volumes from a fine-tuned run (predict.input=... predict.output=...)",
    "bundle": "a fine-tuned run as a MONAI bundle (TorchScript + inference.json): `samora bundle [out=FOLDER] ...`",
    "probe": "linear / k-NN probes and CKA of a run's teachers and experts on its labelled training slices",
    "check": "validate a dataset (every file, key, shape, label value) without training",
    "prepare": "public raw download -> the layout the data module reads (prepare.raw=... prepare.out=...)",
    "demo": "the whole chain (cpt, distill x3, finetune) on the built-in demo data",
    "ablation": "run the fine-tuning variants of experiments/ablations/NAME.yaml: `samora ablation NAME [seeds=N] ...`",
    "sweep": "Optuna over experiments/sweeps/NAME.yaml, on held-out training slices: `samora sweep NAME [trials=N]`",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samora",
        description="SAMora experiments. Settings are key=value overrides of experiments/*.yaml, e.g. "
        "`samora finetune data.name=synapse data.fraction=0.1 run=exp1`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<9} {text}" for name, text in COMMANDS.items()),
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="command")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser


def _rank_zero_or_warning(record: logging.LogRecord) -> bool:
    """Info lines from global rank zero only: under DDP every rank runs this CLI and would repeat them."""
    from samora_pl.records.manifest import is_rank_zero

    return record.levelno >= logging.WARNING or is_rank_zero()


def _quiet_libraries() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_rank_zero_or_warning)
    for noisy in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")


# command -> "module:function" that runs its plan; imported when the command runs
STAGE_RUNNERS = {
    "cpt": "samora_pl.stages.cpt.run:run",
    "distill": "samora_pl.stages.distill.run:run",
    "finetune": "samora_pl.stages.finetune.run:run",
    "probe": "samora_pl.stages.probe:run",
    "check": "samora_pl.stages.check:run",
    "predict": "samora_pl.stages.predict:run",
}


def _runner(command: str):
    module, name = STAGE_RUNNERS[command].split(":")
    return getattr(importlib.import_module(module), name)


def run_command(command: str, overrides) -> dict:
    """compose -> validate -> plan -> the stage runs its plan (the suites compose and plan every stage first)."""
    from samora_pl.config.compose import compose

    if command == "demo":
        from samora_pl.suites.demo import run_demo

        return run_demo(overrides)
    if command == "ablation":
        from samora_pl.suites.ablation import run_ablation

        names = [item for item in overrides if "=" not in item]
        if len(names) != 1:
            raise SamoraError("Usage: samora ablation NAME [seeds=N] key=value ... (NAME from experiments/ablations/).")
        seeds = [item.split("=", 1)[1] for item in overrides if item.startswith("seeds=")]
        if seeds and not seeds[-1].strip().isdigit():
            raise SamoraError(f"seeds={seeds[-1]}: give a whole number of seeds per variant, e.g. seeds=3.")
        rest = [item for item in overrides if "=" in item and not item.startswith("seeds=")]
        return run_ablation(names[0], rest, seeds=int(seeds[-1]) if seeds else 1)
    if command == "sweep":
        from samora_pl.suites.sweep import run_sweep

        names = [item for item in overrides if "=" not in item]
        if len(names) != 1:
            raise SamoraError("Usage: samora sweep NAME [trials=N] key=value ... (NAME from experiments/sweeps/).")
        trials = [item.split("=", 1)[1] for item in overrides if item.startswith("trials=")]
        if trials and not trials[-1].strip().isdigit():
            raise SamoraError(f"trials={trials[-1]}: give a whole number of finished trials, e.g. trials=20.")
        rest = [item for item in overrides if "=" in item and not item.startswith("trials=")]
        return run_sweep(names[0], rest, trials=int(trials[-1]) if trials else None)
    from samora_pl.config.finished import predict_plan
    from samora_pl.config.plans import build_plan
    from samora_pl.config.validate import check_stage_overrides

    if command == "bundle":  # composed as `samora predict` is, OUT apart
        from samora_pl.export.bundle import run as bundle

        outs = [item.split("=", 1)[1] for item in overrides if item.startswith("out=")]
        rest = [item for item in overrides if not item.startswith("out=")]
        if outs and not outs[-1].strip():
            raise SamoraError("out= is empty; give the folder the bundle is written to (OUT=...), or leave it out.")
        return bundle(predict_plan(compose("predict", rest), rest, needs_io=False), outs[-1] if outs else None)
    check_stage_overrides(command, overrides)
    cfg = compose(command, overrides)
    if command == "evaluate":  # reads a finished fine-tune, which the overrides may name
        from samora_pl.config.finished import evaluate_plan
        from samora_pl.stages.finetune.evaluate import run as evaluate

        return evaluate(*evaluate_plan(cfg, overrides))
    if command == "predict":
        return _runner(command)(predict_plan(cfg, overrides))
    if command == "prepare":
        from data_modules.prepare.raw import run as prepare

        plan = build_plan(cfg)
        return prepare(plan.dataset, plan.raw, plan.out, plan.source, overwrite=plan.overwrite)
    return _runner(command)(build_plan(cfg))


# errors of the file system rather than of the code: a read-only or full runs folder, a path under a file
_FOLDER_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR}


def _leave_process_group() -> None:
    """A DDP rank leaves its gloo / NCCL group before the interpreter exits: left to the interpreter's
    teardown, gloo's threads can abort a finished rank ('terminate called without an active exception')."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv=None) -> int:
    try:
        return _main(argv)
    finally:
        _leave_process_group()


def _main(argv=None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries()
    started = time.time()
    try:
        run_command(args.command, args.overrides)
    except SamoraError as err:
        print(f"samora {args.command}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        if err.errno not in _FOLDER_ERRORS:
            raise  # anything else is a bug: keep the traceback
        where = err.filename or "a file of the run"
        print(
            f"samora {args.command}: error: {where}: {err.strerror}. Under the runs folder: make it writable (and "
            "check free space) or write the run elsewhere with runs_dir=... / RUN=...; an input: make it readable.",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(f"samora {args.command}: interrupted.", file=sys.stderr)
        return 130
    logging.getLogger("samora_pl").info("samora %s finished in %.1f s", args.command, time.time() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
