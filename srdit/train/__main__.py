import sys

from srdit.train.main import main

sys.exit(main())
