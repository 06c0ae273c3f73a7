from plgk_cli.cli import main

main()
