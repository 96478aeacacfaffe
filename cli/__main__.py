from vaultflow.cli import console

console()
