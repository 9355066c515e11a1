"""``python -m uapx`` (and ``torchrun -m uapx``) runs the CLI."""
from .cli import console_main

if __name__ == "__main__":
    console_main()
