"""Saved configs from before a key existed, read as their runs behaved then.

A stage folder's `config.yaml` is read on today's schema, so a key added since the folder was made takes
a value. Today's default is right for most new keys (they were added with the old behaviour as default),
but not for all: fine-tunes made before `optim.decay_all` existed decayed every trainable parameter.
`ADDED_KEYS` names, for every key added since saved configs began, the value the old runs behaved as, so a
finished stage is reused (and a changed one refused) for what it really did, not for a missing line.
"""

from omegaconf import DictConfig, OmegaConf

# dotted key -> the value of a run saved before the key existed
ADDED_KEYS = {
    "finetune.train_experts": False,
    "optim.decay_all": True,  # the fine-tune's AdamW decayed biases, norms and gates too
    "data.effective_batch_size": None,
    "data.train_size": None,
    "trainer.stop_epoch": None,
    "prepare.source": None,
    "data.subset_seed": None,  # the subset was redrawn for each run seed
}


def added_since(saved: DictConfig) -> DictConfig:
    """The `ADDED_KEYS` that `saved` (a config.yaml as loaded) lacks, with their old-run values."""
    missing = {
        key: value for key, value in ADDED_KEYS.items() if OmegaConf.select(saved, key, default=KeyError) is KeyError
    }
    tree = OmegaConf.create()
    for key, value in missing.items():
        OmegaConf.update(tree, key, value, force_add=True)
    return tree
