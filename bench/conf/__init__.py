"""Hydra configs shipped with bench: the launchers of `bench run -m` (``hydra/launcher/bench_*.yaml``).

Each extends the plugin's own config (its defaults list names it) with defaults that suit a bench sweep;
`bench.sweep` selects them with ``launcher=joblib|submitit_local|submitit_slurm``.
"""
