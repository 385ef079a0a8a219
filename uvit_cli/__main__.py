"""`python -m uvit_cli ...` (what torchrun launches) runs the same CLI as `uvit ...`."""

from uvit_cli.cli import main

if __name__ == "__main__":
    main()
