"""CLI sub-commands, one module each; importing a module registers its command on `surgery.cli.app`."""
