"""`python -m pea.train`: one rank of the train stage, as the launcher starts it."""

from pea.train import main

main()
