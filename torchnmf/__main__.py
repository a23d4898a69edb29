"""``python -m torchnmf``: the command line."""
from .cli import exit_process, main

if __name__ == "__main__":
    exit_process(main())
