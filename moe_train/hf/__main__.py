"""`python -m moe_train.hf import SRC DST | export SRC DST | config SRC`."""

from .cli import main

if __name__ == "__main__":
    main()
