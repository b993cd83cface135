"""`python -m vpotool` (also what `accelerate launch -m vpotool` runs)."""

from vpotool.cli import main

if __name__ == "__main__":
    main()
