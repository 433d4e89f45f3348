"""`python -m pea.embed`: one rank of the embed stage, as the launcher starts it."""

from pea.embed import main

main()
