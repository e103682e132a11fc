"""``python -m ladmim_hf.data.synthetic --out DIR --seed 0 [--small]``."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
