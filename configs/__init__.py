"""Training presets: one file each, each exporting get_config() -> TrainConfig. `--config=NAME` picks one."""
