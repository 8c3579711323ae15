"""`python -m trainer.config FILE [key=value ...]`: prints the resolved config, or the one error line.

A command, not the schema: it checks model.arch against the registry as every command does, so it
lives beside the schema rather than in it (the schema, a lower room, imports nothing from models).
"""

import argparse

from trainer import cli, models
from trainer.config import load_config, to_yaml


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.config", description="Print the resolved config of a YAML file plus key=value overrides."
    )
    parser.add_argument("config", help="a YAML file, e.g. jobs/configs/resnet.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    cli.run(lambda: print(to_yaml(load_config(args.config, args.overrides, archs=models.names())), end=""))


if __name__ == "__main__":
    main()
