"""Config files for `--config=configs/<name>.py`; installed with the package as `dwa_jax.configs`,
so the same flag works from any directory (dwa_jax.main resolves it there when the path does
not exist)."""
