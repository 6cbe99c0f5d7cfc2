import sys

from glasslstm.cli import main

sys.exit(main())
