"""One training run: ``loop`` (epochs of meta-steps with guards), ``signals`` (clean stops on
SIGTERM/SIGINT), ``early_stopping`` (the best epoch's weights). Imports meta, parallel."""
