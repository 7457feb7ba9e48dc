from farmkeys.cli import entry

entry()
