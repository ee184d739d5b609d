"""``python -m softprompt`` (and ``accelerate launch -m softprompt``)."""

from softprompt.cli import main

if __name__ == "__main__":
    main()
