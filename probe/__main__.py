import sys

from probe.train import main

if __name__ == "__main__":
    sys.exit(main())
