"""The training engine: distributed setup, FSDP2 parallelisation, optimizer and schedule,
checkpoints, metrics, loggers, loss-spike tracking and the training loop.

``kha_train.training.trainer.Trainer`` is the entry point; ``python -m kha_train.train`` and
``kha-train train`` run it.
"""
