"""Ray Tune + Optuna sweeps over the run config: search spaces, the sweep driver, the report."""
