"""One training run: ``training`` (the run top to bottom: its context, training, evaluation,
outputs), ``build`` (the learners and the plain network), ``input`` (the training reader),
``loop`` (epochs of meta-steps with guards), ``epoch_state`` (the run's position, loss history and
running sums: what a checkpoint saves and a resume starts from), ``step_clock`` (input-wait timing
and the per-step log points), ``early_stopping`` (the best epoch's weights). Imports every part
below it in ``gmeta.trainer.LAYERS``."""
