"""The shipped config files: `--config=configs/NAME.py` (and `load_config("configs/NAME.py")`)
finds them here from any directory, unless a file of that path exists where it is run."""
