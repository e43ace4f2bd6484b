"""MLflow pyfunc models of the trained checkpoints, for `mlflow models serve`, and the inference
the command line shares with them."""
