"""python -m relay.cli: the relay command."""

from relay.cli import main as command

if __name__ == "__main__":
    command.main()
