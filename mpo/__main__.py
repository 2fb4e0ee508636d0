from mpo.cli import run

run()
