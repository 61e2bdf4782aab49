"""The training sampler the data modules make under DDP (data_modules/labelled/sampling.py); that resumed two-process
runs end on the uninterrupted weights is tested end to end in tests/samora_pl/test_resume.py."""

from types import SimpleNamespace

import lightning as L

from data_modules.labelled.sampling import epoch_about_to_run, training_sampler


def progress(processed: int) -> dict:
    return {"ready": processed, "started": processed, "processed": processed, "completed": processed - 1}


def fake_trainer(loaded: dict, processed: int) -> SimpleNamespace:
    current = SimpleNamespace(processed=processed)
    return SimpleNamespace(
        _checkpoint_connector=SimpleNamespace(_loaded_checkpoint=loaded),
        fit_loop=SimpleNamespace(epoch_progress=SimpleNamespace(current=current)),
    )


def test_the_epoch_comes_from_the_checkpoint_until_the_loops_are_restored():
    # configure_optimizers builds the loader after the checkpoint is read, before its loop progress is restored
    loaded = {"loops": {"fit_loop": {"epoch_progress": {"current": progress(3), "total": progress(3)}}}}
    assert epoch_about_to_run(fake_trainer(loaded, processed=0)) == 3
    assert epoch_about_to_run(fake_trainer({}, processed=2)) == 2  # a fresh fit, or after resume_end


def test_one_process_or_no_trainer_leaves_the_shuffling_to_the_data_loader():
    assert training_sampler(range(8), None) is None
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    assert training_sampler(range(8), trainer) is None
