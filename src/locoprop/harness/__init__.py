"""The experiment harness: data, models, baselines, training, tuning, plots and the command line."""
