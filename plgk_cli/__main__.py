from plgk_cli.cli import entry

entry()
