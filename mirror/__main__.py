"""`python -m mirror` is the same as the `mirror` console script."""

from mirror.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
