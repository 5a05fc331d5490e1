"""`python -m lineage` runs the `lmerge` command line."""
from lineage.cli import main

main()
