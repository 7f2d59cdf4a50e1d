"""Print the CLI reference (docs/cli.md) from the commands' own --help text:
``python docs/cli_reference.py > docs/cli.md`` (a test checks that it is current)."""

import os

os.environ["COLUMNS"] = "100"  # argparse wraps help at the terminal width: fix it

from lowbit import cli  # noqa: E402  (after COLUMNS)

print("# lowbit command line reference\n")
print("Generated from `--help` by `python docs/cli_reference.py > docs/cli.md`. Every command "
      "takes the same names for the same things: `--data SPEC`, `--limit N`, `--batch-size N`, "
      "`-o/--output PATH`, `--threads N`, `--arch`/`--arch-kwargs`, `--bits W[/A]`, `-q`.\n")
top = cli.parser()
for name, sub in top._subparsers._group_actions[0].choices.items():
    print(f"## lowbit {name}\n\n```\n{sub.format_help().rstrip()}\n```\n")
print(f"## lowbit-export\n\nThe same command as `lowbit export`.\n\n```\n"
      f"{cli.export_parser().format_help().rstrip()}\n```")
