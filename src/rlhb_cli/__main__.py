from rlhb_cli.cli import main

main()
