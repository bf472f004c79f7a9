"""Run the analysis as a module:

python -m analysis --checkpoint models/trex.pt --out docs/analysis
"""

from analysis.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
